"""tokensel kernels: per-token log-prob and entropy from hidden states + LM head, without ``[N, V]`` logits.

Chunked torch path (all devices). Teacher divergences and the Triton path follow (``docs/roadmap.md``).
"""

from .api import TokenStats, reference_token_stats, token_stats, token_stats_from_logits
from .chunked import counters, reset_counters

__all__ = ["TokenStats", "counters", "reference_token_stats", "reset_counters", "token_stats",
           "token_stats_from_logits"]
