"""tokensel objectives: pure tensor functions, statistics in -> masks / weights / loss / metrics out.

Usable from any training loop: fill a :class:`TokenBatch`, call ``objectives.build(name, **cfg)(batch)``.
No TRL, Hydra or I/O imports here.
"""

from .contract import ObjectiveOutput, TokenBatch
from .registry import REGISTRY, Objective, build, names

__all__ = ["REGISTRY", "Objective", "ObjectiveOutput", "TokenBatch", "build", "names"]
