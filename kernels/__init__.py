"""tokensel kernels: per-token log-prob, entropy and teacher divergences without ``[N, V]`` logits.

A chunked torch path (all devices, optionally compiled at the logits level) and a Triton path (CUDA; CPU under
``TRITON_INTERPRET=1``) share one contract: ``specs/kernels.md`` and ``docs/kernels.md``.
"""

from .api import TokenStats, active_backend, reference_token_stats, token_stats, token_stats_from_logits
from .backend import use_backend
from .chunked import counters, reset_counters

__all__ = ["TokenStats", "active_backend", "counters", "reference_token_stats", "reset_counters", "token_stats",
           "token_stats_from_logits", "use_backend"]
