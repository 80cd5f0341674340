"""One explicit registry: objective name -> (config dataclass, loss function).

``build("grpo", keep=0.2)`` validates the keyword arguments against the objective's config dataclass (unknown keys
name the closest valid ones) and returns a callable :class:`Objective`. No auto-discovery, no import side effects.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from .contract import ObjectiveOutput, TokenBatch
from .grpo import GRPOConfig, grpo_loss

REGISTRY: dict[str, tuple[type, Callable[[TokenBatch, Any], ObjectiveOutput]]] = {
    "grpo": (GRPOConfig, grpo_loss),
}


@dataclass(frozen=True)
class Objective:
    """A configured objective: ``objective(batch) -> ObjectiveOutput``."""

    name: str
    config: Any
    fn: Callable[[TokenBatch, Any], ObjectiveOutput]

    def __call__(self, batch: TokenBatch) -> ObjectiveOutput:
        return self.fn(batch, self.config)


def _lookup(name: str) -> tuple[type, Callable]:
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown objective {name!r}; registered: {', '.join(sorted(REGISTRY))}.{hint}")
    return REGISTRY[name]


def build(name: str, **cfg: Any) -> Objective:
    """Build objective ``name`` from keyword config; errors name the key and the closest valid ones."""
    cls, fn = _lookup(name)
    valid = [f.name for f in fields(cls)]
    unknown = [k for k in cfg if k not in valid]
    if unknown:
        parts = []
        for k in unknown:
            close = difflib.get_close_matches(k, valid, n=3)
            parts.append(f"{k!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise TypeError(f"unknown option(s) for objective {name!r}: {'; '.join(parts)}. Valid: {', '.join(valid)}")
    return Objective(name=name, config=cls(**cfg), fn=fn)


def names() -> list[str]:
    return sorted(REGISTRY)
