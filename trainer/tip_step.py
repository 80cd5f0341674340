"""TIP's once-per-step decision on the gathered step (``specs/tip_opd.md`` §5, §7.2 steps 3–5).

Every rank gathers the step's per-token statistics (entropy, reverse KL, forward KL for ``q3_only``, the valid mask
and the rollout ids) in global row order, normalises, scores and selects on the whole step, and keeps its own rows:
identical decisions on every rank with no other communication, whatever the micro-batch split or world size. The
cost is one all-gather of ``[rows, T]`` fp32 tensors per statistic, small next to the scoring forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from objectives.tip import TipConfig, tip_norm_stats, tip_scores, tip_select, tip_step_metrics
from objectives.tip import row_generators as tip_row_generators

from .step_selection import RowGather


@dataclass
class TipStep:
    """This rank's kept tokens and the step's global counts and metrics."""

    keep: torch.Tensor  # [rows, T] bool, ⊆ the valid mask
    n_keep: float  # kept tokens of the step (all ranks)
    n_valid: float  # valid tokens of the step (all ranks)
    metrics: dict[str, float]


def keep_all(acc, mask: torch.Tensor) -> TipStep:
    """Rule ``all`` without diagnostics: every valid token, no scoring pass."""
    n = float(acc.reduce(mask.sum().double(), reduction="sum"))
    return TipStep(mask.bool(), n, n, {"kept_token_frac": 1.0, "skipped_step": float(n == 0)})


@torch.no_grad()
def tip_step(acc, mask: torch.Tensor, entropy: torch.Tensor, reverse_kl: torch.Tensor, rollout_ids: torch.Tensor,
             cfg: TipConfig, step: int, forward_kl: torch.Tensor | None = None) -> TipStep:
    """Global normalisation, scores and selection of one optimizer step (rows of this rank in, its keep out)."""
    rows = RowGather(acc, mask.shape[0], mask.device)
    g_mask = rows(mask.bool(), False)
    g_ent = rows(entropy.double(), 0.0)
    g_rkl = rows(reverse_kl.double(), 0.0)
    g_fkl = None if forward_kl is None else rows(forward_kl.double(), 0.0)
    g_ids = rows(rollout_ids, -1)
    stats = tip_norm_stats(g_ent, g_rkl, g_mask, vocab_size=cfg.vocab_size, entropy_clip_q=cfg.entropy_clip_q,
                           quadrant_q=cfg.quadrant_q)
    scores = tip_scores(g_ent, g_rkl, g_mask, rule=cfg.rule, forward_kl=g_fkl if cfg.needs_forward_kl else None,
                        vocab_size=cfg.vocab_size, entropy_clip_q=cfg.entropy_clip_q, stats=stats,
                        quadrants=cfg.quadrants, quadrant_q=cfg.quadrant_q)
    gens = tip_row_generators(cfg.seed, step, g_ids) if cfg.rule == "entropy_sample" else None
    keep = tip_select(scores.score, g_mask, cfg.fraction, rule=cfg.rule, budget_scope=cfg.budget_scope,
                      generator=gens)
    metrics = tip_step_metrics(scores, keep, g_mask, g_rkl, g_ent, cfg, g_fkl)
    local = rows.local(keep)[:, : mask.shape[1]] & mask.bool()
    return TipStep(local, float(keep.sum()), float(g_mask.sum()), metrics)
