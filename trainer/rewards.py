"""Reward functions in TRL's signature, built from a task's verifiable scorer.

A reward function that raises is re-raised as :class:`RewardFunctionError` naming the function, the row and the
completion, instead of a bare traceback from deep inside the rollout.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Sequence
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


def majority_vote(answers: Sequence[Hashable | None], leave_one_out: bool = False) -> list[float | None]:
    """Label-free reward of test-time RL (TTRL, SPINE; ``specs/entropy_band_grpo.md`` §3.1) for one group.

    ``answers`` are the canonical answers of the group's completions in sample order (``None`` = unparseable). The
    pseudo-label is the most voted answer, ties going to the tied answer that occurs first in sample order
    (``Counter.most_common`` order: ``[B, A, A, B]`` gives ``B``). ``r_i = 1`` if ``a_i`` equals the label, else 0;
    unparseable answers get 0. With ``leave_one_out`` each completion is scored against the label of the other
    ``G − 1`` (0 when none of them parses). A group with no parseable answer returns ``None`` for every member:
    TRL reads ``None`` as "unscorable" and gives those rows zero advantage.
    """
    if all(a is None for a in answers):
        return [None] * len(answers)
    if not leave_one_out:
        label = _vote(answers)
        return [float(a is not None and a == label) for a in answers]
    rewards: list[float | None] = []
    for i, a in enumerate(answers):
        label = _vote([b for j, b in enumerate(answers) if j != i])
        rewards.append(float(a is not None and label is not None and a == label))
    return rewards


def _vote(answers: Sequence[Hashable | None]) -> Hashable | None:
    counts = Counter(a for a in answers if a is not None)
    return counts.most_common(1)[0][0] if counts else None
