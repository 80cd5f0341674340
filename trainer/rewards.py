"""Reward functions in TRL's signature, built from a task's verifiable scorer.

A reward function that raises is re-raised as :class:`RewardFunctionError` naming the function, the row and the
completion, instead of a bare traceback from deep inside the rollout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .tasks import Task


class RewardFunctionError(RuntimeError):
    pass


def task_reward(task: Task) -> Callable[..., list[float]]:
    """TRL reward function: 1.0 when the completion's extracted answer is verified correct, else 0.0."""

    def reward(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        rewards = []
        for i, completion in enumerate(completions):
            row = {k: v[i] for k, v in columns.items() if isinstance(v, list) and len(v) == len(completions)}
            rewards.append(task.score(_text(completion), row))
        return rewards

    reward.__name__ = f"{task.name}_correct"  # TRL logs rewards/<__name__>/mean
    return guarded(reward)


def guarded(fn: Callable[..., list[float]]) -> Callable[..., list[float]]:
    """Wrap a reward function so that an exception names the function, the row and the completion."""

    def wrapper(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        try:
            values = fn(prompts, completions, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised with context
            row = _failing_row(fn, prompts, completions, kwargs)
            where = f" on row {row} (completion {_text(completions[row])[:120]!r})" if row is not None else ""
            raise RewardFunctionError(f"reward function {fn.__name__!r} raised {type(e).__name__}: {e}{where}") from e
        if len(values) != len(completions):
            raise RewardFunctionError(
                f"reward function {fn.__name__!r} returned {len(values)} rewards for {len(completions)} completions"
            )
        return values

    wrapper.__name__ = fn.__name__
    return wrapper


def _failing_row(fn, prompts, completions, kwargs) -> int | None:
    """Re-run row by row to find the first row the reward function fails on."""
    for i in range(len(completions)):
        one = {k: [v[i]] if isinstance(v, list) and len(v) == len(completions) else v for k, v in kwargs.items()}
        try:
            fn(prompts[i : i + 1], completions[i : i + 1], **one)
        except Exception:  # noqa: BLE001
            return i
    return None


def _text(completion: Any) -> str:
    """Plain-text completion (conversational completions are lists of messages)."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)
