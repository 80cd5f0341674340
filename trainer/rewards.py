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


class MajorityVoteReward:
    """TRL reward function of label-free test-time RL: the group's majority answer is the pseudo-label.

    TRL calls reward functions on each rank's local rows, and its sampler may split one prompt's group over two
    ranks, so the answers are gathered from every rank (in rank order = global row order), voted per group of
    ``num_generations`` consecutive rows, and the local slice is returned. Labels in the dataset are never read.
    Groups where no completion parses return ``None`` (TRL: unscorable, zero advantage); ``unscorable`` holds the
    local rows of the last call so that the trainer can drop them from every loss term. The vote's diagnostics go
    to ``reward/majority_vote/*`` through TRL's ``log_metric``.
    """

    __name__ = "majority_vote"  # TRL logs rewards/<__name__>/mean

    def __init__(self, task: Task, num_generations: int, leave_one_out: bool = False) -> None:
        self.task = task
        self.num_generations = num_generations
        self.leave_one_out = leave_one_out
        self.unscorable: list[bool] = []

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        from accelerate import PartialState
        from accelerate.utils import gather_object

        answers = []
        for i, completion in enumerate(completions):
            try:
                answers.append(self.task.extract(_text(completion)))
            except Exception as e:  # noqa: BLE001 - re-raised with context
                raise RewardFunctionError(
                    f"majority_vote: task {self.task.name!r} failed to extract an answer on row {i} "
                    f"(completion {_text(completion)[:120]!r}): {type(e).__name__}: {e}"
                ) from e
        everyone = gather_object(answers) if PartialState().num_processes > 1 else answers
        g = self.num_generations
        if len(everyone) % g:
            raise RewardFunctionError(f"majority_vote: {len(everyone)} gathered rows are not groups of {g}")
        rewards: list[float | None] = []
        shares, unanimous, skipped = [], 0, 0
        for start in range(0, len(everyone), g):
            group = everyone[start : start + g]
            rewards.extend(majority_vote(group, self.leave_one_out))
            counts = Counter(a for a in group if a is not None)
            if not counts:
                skipped += 1
                continue
            top = counts.most_common(1)[0][1]
            shares.append(top / g)
            unanimous += top == g
        n_groups = len(everyone) // g
        log = kwargs.get("log_metric")
        if log is not None:  # every rank logs the same (gathered) values; TRL averages them
            log("reward/majority_vote/label_share", sum(shares) / len(shares) if shares else 0.0)
            log("reward/majority_vote/unanimous_frac", unanimous / max(1, n_groups))
            log("reward/majority_vote/unparseable_frac", sum(a is None for a in everyone) / max(1, len(everyone)))
            log("reward/majority_vote/skipped_group_frac", skipped / max(1, n_groups))
        first = PartialState().process_index * len(completions)
        local = rewards[first : first + len(completions)]
        self.unscorable = [r is None for r in local]
        return local


def _vote(answers: Sequence[Hashable | None]) -> Hashable | None:
    counts = Counter(a for a in answers if a is not None)
    return counts.most_common(1)[0][0] if counts else None
