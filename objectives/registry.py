"""One explicit registry: objective name -> its config dataclass, loss and once-per-step selection.

``build("grpo", keep=0.2)`` validates the keyword arguments against the objective's config dataclass (unknown keys
name the closest valid ones) and returns a callable :class:`Objective`. No auto-discovery, no import side effects.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from .contract import ObjectiveOutput, StepSelection, TokenBatch
from .d3s import D3SConfig, d3s_loss, d3s_sample_keep, d3s_select
from .entropy_band import (
    EntropyBandConfig,
    entropy_band_loss,
    entropy_band_needs_step_selection,
    entropy_band_select,
)
from .fiber import FiberPOConfig, fiberpo_loss, fiberpo_step_stats
from .grpo import GRPOConfig, grpo_loss, grpo_needs_step_selection, grpo_select
from .tip import TipConfig, tip_loss, tip_needs_step_selection
from .token_dpo import TokenDPOConfig, token_dpo_batch_loss


@dataclass(frozen=True)
class Entry:
    """What a trainer needs to know about an objective.

    * ``loss(batch, cfg)`` — one micro-batch's share of the step loss;
    * ``select(step, cfg)`` — the selection decided once per optimizer step on the whole gathered step (after the
      statistics pass), or ``None``;
    * ``sample_select(step, cfg)`` — ``(sample_keep [N], metrics)`` from advantages and group ids alone, run before
      the statistics pass so that dropped rollouts do no further work, or ``None``;
    * ``needs_step_selection(cfg, num_iterations)`` — whether ``select`` must run (else the loss selects exactly on
      each micro-batch);
    * ``step_stats(batch, cfg)`` — per-row statistics of the *current* policy that other micro-batches need (FiberPO's
      upper-level means), computed by a no-grad pass at the start of every optimizer step; the trainer passes the
      other rows' values to ``loss`` as ``context=``. ``None`` when the loss needs no other rows;
    * ``kind`` — the training loop it plugs into: ``rl`` (GRPO family, rewards and advantages), ``distill``
      (on-policy distillation against a teacher) or ``preference`` (chosen/rejected pairs).
    """

    config: type
    loss: Callable[[TokenBatch, Any], ObjectiveOutput]
    select: Callable[[TokenBatch, Any], StepSelection] | None = None
    sample_select: Callable[[TokenBatch, Any], tuple[Any, dict[str, float]]] | None = None
    needs_step_selection: Callable[[Any, int], bool] = lambda cfg, num_iterations: False
    step_stats: Callable[[TokenBatch, Any], Any] | None = None
    kind: str = "rl"


REGISTRY: dict[str, Entry] = {
    "grpo": Entry(GRPOConfig, grpo_loss, grpo_select, None, grpo_needs_step_selection),
    "entropy_band": Entry(EntropyBandConfig, entropy_band_loss, entropy_band_select, None,
                          entropy_band_needs_step_selection),
    "d3s": Entry(D3SConfig, d3s_loss, d3s_select, d3s_sample_keep, lambda cfg, num_iterations: True),
    "fiberpo": Entry(FiberPOConfig, fiberpo_loss, step_stats=fiberpo_step_stats),
    "tip": Entry(TipConfig, tip_loss, needs_step_selection=tip_needs_step_selection, kind="distill"),
    "token_dpo": Entry(TokenDPOConfig, token_dpo_batch_loss, kind="preference"),
}


@dataclass(frozen=True)
class Objective:
    """A configured objective: ``objective(batch) -> ObjectiveOutput``; ``entry`` has its step-level hooks."""

    name: str
    config: Any
    entry: Entry

    def __call__(self, batch: TokenBatch, **kwargs: Any) -> ObjectiveOutput:
        return self.entry.loss(batch, self.config, **kwargs)

    def needs_step_selection(self, num_iterations: int) -> bool:
        return self.entry.needs_step_selection(self.config, num_iterations)


def lookup(name: str) -> Entry:
    """The registry entry of ``name``; an unknown name lists the registered ones and the closest matches."""
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown objective {name!r}; registered: {', '.join(sorted(REGISTRY))}.{hint}")
    return REGISTRY[name]


def build(name: str, **cfg: Any) -> Objective:
    """Build objective ``name`` from keyword config; errors name the key and the closest valid ones."""
    entry = lookup(name)
    valid = [f.name for f in fields(entry.config)]
    unknown = [k for k in cfg if k not in valid]
    if unknown:
        parts = []
        for k in unknown:
            close = difflib.get_close_matches(k, valid, n=3)
            parts.append(f"{k!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise TypeError(f"unknown option(s) for objective {name!r}: {'; '.join(parts)}. Valid: {', '.join(valid)}")
    return Objective(name=name, config=entry.config(**cfg), entry=entry)


def names() -> list[str]:
    return sorted(REGISTRY)
