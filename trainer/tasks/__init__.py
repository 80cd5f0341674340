"""Task registry: name -> (config dataclass, task class). Synthetic tasks are generated locally (offline)."""

from __future__ import annotations

import difflib
from dataclasses import fields
from typing import Any

from .arithmetic import ArithmeticConfig, ArithmeticTask
from .base import Row, Task
from .countdown import CountdownConfig, CountdownTask
from .files import FileTask, FileTaskConfig, GSM8KConfig, gsm8k_answer, read_rows

TASKS: dict[str, tuple[type, type]] = {
    "arithmetic": (ArithmeticConfig, ArithmeticTask),
    "countdown": (CountdownConfig, CountdownTask),
    "gsm8k": (GSM8KConfig, FileTask),
    "file": (FileTaskConfig, FileTask),
}


def task_config_class(name: str) -> type:
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown task {name!r}; registered: {', '.join(TASKS)}.{hint}")
    return TASKS[name][0]


def build_task(cfg: dict[str, Any]) -> Task:
    """A task from its config node (``name`` selects the registry entry)."""
    cfg = dict(cfg)
    name = cfg.get("name", "")
    cls = task_config_class(name)
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(cfg) - valid)
    if unknown:
        raise TypeError(f"unknown option(s) for task {name!r}: {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    return TASKS[name][1](cls(**cfg))


__all__ = ["TASKS", "Row", "Task", "build_task", "gsm8k_answer", "read_rows", "task_config_class"]
