"""Countdown: reach a target with the given numbers, ``"3 5 7>22:"`` -> ``"3*5+7"``.

The reward verifies the expression: only the given numbers (each at most once), ``+ - *`` and parentheses, and it
evaluates to the target. Every problem is solvable by construction (the target comes from a random expression).
"""

from __future__ import annotations

import ast
import operator
import random
import re
from collections import Counter
from dataclasses import dataclass

from .base import Row, SyntheticSplit, Task

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_EXPR = re.compile(r"^\s*([0-9+\-*() ]+)")


@dataclass
class CountdownConfig(SyntheticSplit):
    name: str = "countdown"
    num_count: int = 3  # numbers given per problem
    max_number: int = 9  # numbers are drawn from 1..max_number

    def __post_init__(self) -> None:
        if self.num_count < 2 or self.max_number < 1:
            raise ValueError("countdown needs num_count >= 2 and max_number >= 1")


def evaluate(expr: str) -> tuple[int, list[int]] | None:
    """Value and the literals used, for expressions of integers, + - * and parentheses; ``None`` otherwise."""
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError):
        return None
    used: list[int] = []

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return node.value
        raise ValueError("not allowed")

    try:
        return walk(tree), used
    except (ValueError, RecursionError):
        return None


class CountdownTask(Task):
    name = "countdown"

    def make_row(self, rng: random.Random) -> Row:
        nums = [rng.randint(1, self.config.max_number) for _ in range(self.config.num_count)]
        expr = str(nums[0])
        for n in nums[1:]:
            expr = f"{expr}{rng.choice('+-*')}{n}"
        target = evaluate(expr)[0]
        return {
            "prompt": f"{' '.join(map(str, nums))}>{target}:",
            "answer": str(target),
            "numbers": " ".join(map(str, nums)),
            "solution": expr,
        }

    def extract(self, completion: str) -> str | None:
        m = _EXPR.match(completion)
        return m.group(1).strip() if m and m.group(1).strip() else None

    def score(self, completion: str, row: Row) -> float:
        expr = self.extract(completion)
        result = evaluate(expr) if expr else None
        if result is None:
            return 0.0
        value, used = result
        allowed = Counter(int(x) for x in str(row["numbers"]).split())
        return 1.0 if value == int(row["answer"]) and not Counter(used) - allowed else 0.0
