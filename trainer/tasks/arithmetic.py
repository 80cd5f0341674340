"""Multi-digit arithmetic: ``"47+385="`` -> ``"432"``; exact integer match.

``demo_carry_noise`` makes the warm-up demonstrations imperfect in a structured way: that fraction of addition
demonstrations forgets every carry (``"47+385="`` -> ``"322"``), the commonest human addition error. The reward
and the held-out answers always use the true sum, so a verifier-driven RL phase has something real to fix: the
warm-started model knows both digits at a carry position and RL must learn which one is right.
"""

from __future__ import annotations

import operator
import random
from dataclasses import dataclass, field

from .base import Row, SyntheticSplit, Task

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
DOMAINS = {"+": "addition", "-": "subtraction", "*": "multiplication"}  # domain label of each operator


@dataclass
class ArithmeticConfig(SyntheticSplit):
    name: str = "arithmetic"
    min_digits: int = 1  # digits of the smaller operand range
    max_digits: int = 3  # operands are drawn with min_digits..max_digits digits
    operators: list[str] = field(default_factory=lambda: ["+"])  # subset of + - *
    demo_carry_noise: float = 0.0  # fraction of addition demonstrations that forget every carry

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")
        if not 0.0 <= self.demo_carry_noise <= 1.0:
            raise ValueError(f"demo_carry_noise must be in [0, 1], got {self.demo_carry_noise}")
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
        # Drawn for every row so that the problems do not depend on the noise setting.
        forget = rng.random() < self.config.demo_carry_noise
        solution = add_without_carry(a, b) if forget and op == "+" else result
        return {"prompt": f"{a}{op}{b}=", "answer": str(result), "solution": str(solution), "domain": DOMAINS[op]}


def add_without_carry(a: int, b: int) -> int:
    """Digit-wise sum mod 10: ``47 + 385 -> 322``."""
    out, place = 0, 1
    while a or b:
        out += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return out
