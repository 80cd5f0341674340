"""Multi-digit arithmetic: ``"47+385="`` -> ``"432"``; exact integer match."""

from __future__ import annotations

import operator
import random
from dataclasses import dataclass, field

from .base import Row, SyntheticSplit, Task

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


@dataclass
class ArithmeticConfig(SyntheticSplit):
    name: str = "arithmetic"
    min_digits: int = 1  # digits of the smaller operand range
    max_digits: int = 3  # operands are drawn with min_digits..max_digits digits
    operators: list[str] = field(default_factory=lambda: ["+"])  # subset of + - *

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")
        bad = [op for op in self.operators if op not in OPS]
        if bad or not self.operators:
            raise ValueError(f"operators must be a non-empty subset of {list(OPS)}, got {self.operators}")


class ArithmeticTask(Task):
    name = "arithmetic"

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.config.min_digits, self.config.max_digits)
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)

    def make_row(self, rng: random.Random) -> Row:
        a, b = self._operand(rng), self._operand(rng)
        op = rng.choice(self.config.operators)
        result = OPS[op](a, b)
        return {"prompt": f"{a}{op}{b}=", "answer": str(result), "solution": str(result)}
