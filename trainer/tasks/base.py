"""What a task is: rows of (prompt, answer, solution), an answer extractor and a verifiable reward."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

Row = dict[str, Any]  # at least "prompt", "answer"; "solution" when the task has demonstrations

_INT = re.compile(r"^\s*(-?\d+)")


@dataclass
class SyntheticSplit:
    train_size: int = 2000
    eval_size: int = 200


class Task:
    """Base class: subclasses set ``name`` and implement ``make_row``, ``extract`` and ``score``."""

    name = "task"

    def __init__(self, config: Any) -> None:
        self.config = config

    # ---- data -------------------------------------------------------------------------------------------------
    def make_row(self, rng: random.Random) -> Row:
        raise TypeError(f"task {self.name!r} has no generator; give it a data source")

    def splits(self, seed: int) -> tuple[list[Row], list[Row]]:
        """Train and held-out rows. The held-out set is drawn first (an unbiased sample of the task's
        distribution, distinct prompts); training problems are fresh draws that skip the held-out prompts."""
        eval_rng = random.Random(seed + 7919)
        held_out: list[Row] = []
        seen: set[str] = set()
        for _ in range(100 * max(1, self.config.eval_size)):
            if len(held_out) == self.config.eval_size:
                break
            row = self.make_row(eval_rng)
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                held_out.append(row)
        if len(held_out) < self.config.eval_size:
            raise ValueError(
                f"task {self.name!r}: only {len(held_out)} distinct held-out problems exist; "
                "make the task harder or eval_size smaller"
            )
        rng = random.Random(seed)
        train: list[Row] = []
        for _ in range(100 * max(1, self.config.train_size)):
            if len(train) == self.config.train_size:
                break
            row = self.make_row(rng)
            if row["prompt"] not in seen:
                train.append(row)
        if len(train) < self.config.train_size:
            raise ValueError(f"task {self.name!r}: too few problems outside the held-out set; lower train_size")
        return train, held_out

    # ---- answers ----------------------------------------------------------------------------------------------
    def extract(self, completion: str) -> str | None:
        """Canonical answer in a completion, or ``None`` if none can be parsed."""
        m = _INT.match(completion)
        return str(int(m.group(1))) if m else None

    def domain_of(self, row: Row) -> str:
        """The row's domain label (FiberPO-Domain's top level): its ``domain`` field, else the task's name."""
        return str(row.get("domain", self.name))

    def score(self, completion: str, row: Row) -> float:
        """Verifiable reward in [0, 1]."""
        got = self.extract(completion)
        return 1.0 if got is not None and got == str(row["answer"]) else 0.0
