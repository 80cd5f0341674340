"""GRPO, the baseline objective (TRL 1.16 ``GRPOTrainer`` loss), with optional forking-token selection.

Symbols (TRL's names in brackets):

* ``ρ[i,t] = exp(logp − old_logp)`` — token-level importance ratio [``coef_1``];
* ``ℓ[i,t] = −min(ρ·A_i, clip(ρ, 1 − ε_low, 1 + ε_high)·A_i)`` — clipped policy loss;
* ``k[i,t] = exp(ref − logp) − (ref − logp) − 1`` — k3 KL estimator, weighted by ``beta``;
* ``F[i,t]`` — selection: all valid tokens when ``keep = 1``; otherwise the top ``keep`` fraction of valid tokens
  ranked by the detached old-policy entropy (**higher entropy is kept**), per ``scope``
  (the "forking tokens" of arXiv 2506.01939; TRL's ``top_entropy_quantile = keep``).
* ``u = F·ℓ + beta·k`` (the KL reaches every valid token, as in TRL).

Aggregation, with counts global over the optimizer step (``N_tok`` valid tokens, ``N_seq`` rows, all ranks and
micro-batches) so that each micro-batch returns its additive share of the step loss:

============  =====================================================  =========================
loss_type     loss                                                   TRL 1.16 counterpart
============  =====================================================  =========================
``dapo``      ``Σ mask·u / max(1, N_tok)``                           ``dapo``
``bnpo``      ``Σ mask·u / max(1, N_tok)``                           ``bnpo`` (local count)
``grpo``      ``(1/N_seq) Σ_i Σ_t mask·u / max(1, Σ_t mask_i)``      ``grpo``
``dr_grpo``   ``Σ mask·u / (N_seq · max_completion_length)``         ``dr_grpo``
============  =====================================================  =========================

Dropped tokens still count in the denominators (they dilute the policy term exactly as TRL's
``top_entropy_quantile`` does). Reduction: ``keep = 1`` is TRL's GRPO loss for the same ``loss_type`` and ``beta``;
``keep < 1`` with ``scope="global_batch"`` on one micro-batch is TRL with ``top_entropy_quantile = keep``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .contract import ObjectiveOutput, StepSelection, TokenBatch, advantages_2d, masked_mean
from .selection import SCOPES, top_fraction_mask

LOSS_TYPES: tuple[str, ...] = ("dapo", "bnpo", "grpo", "dr_grpo")


@dataclass
class GRPOConfig:
    """Knobs of the GRPO objective; defaults follow TRL 1.16 ``GRPOConfig``."""

    loss_type: str = "dapo"  # aggregation (table above); TRL 1.16 default
    epsilon_low: float = 0.2  # lower clip ε_low; TRL `epsilon`
    epsilon_high: float = 0.2  # upper clip ε_high; TRL `epsilon_high` (DAPO uses 0.28)
    beta: float = 0.0  # k3 KL coefficient to the reference policy; TRL default 0.0
    keep: float = 1.0  # fraction of valid tokens kept, ranked by old entropy (1.0 = plain GRPO)
    scope: str = "per_sequence"  # unit of the keep fraction: per_sequence | per_group | global_batch
    max_completion_length: int | None = None  # T_max, required by dr_grpo (the trainer fills it in)
    importance_sampling_level: str = "token"  # token | sequence (GSPO: one ratio per row, TRL's option)

    def __post_init__(self) -> None:
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(f"importance_sampling_level must be token or sequence, got {self.importance_sampling_level!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if not 0.0 <= self.keep <= 1.0:
            raise ValueError(f"keep must be in [0, 1], got {self.keep}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.epsilon_low < 0 or self.epsilon_high < 0:
            raise ValueError("epsilon_low and epsilon_high must be >= 0")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.loss_type == "dr_grpo" and not self.max_completion_length:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")

    @property
    def ref_coef(self) -> float:
        """Weight of the reference-model term (the trainer computes reference log-probs only when > 0)."""
        return self.beta


def importance_ratio(logp: Tensor, old_logp: Tensor, level: str = "token", over: Tensor | None = None) -> Tensor:
    """``ρ = exp(logp − old_logp)`` per token ([B, T]), or with ``level="sequence"`` (GSPO) one ratio per row
    ([B, 1]): ``exp`` of the mean log-ratio over the tokens in ``over`` (TRL: the valid tokens)."""
    log_ratio = logp - old_logp
    if level == "sequence":
        if over is None:
            raise ValueError("a sequence-level ratio needs the tokens to average over")
        w = over.to(log_ratio.dtype)
        log_ratio = torch.where(over.bool(), log_ratio, torch.zeros_like(log_ratio))
        log_ratio = ((log_ratio * w).sum(-1) / w.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    elif level != "token":
        raise ValueError(f"importance_sampling_level must be token or sequence, got {level!r}")
    return torch.exp(log_ratio)


def clipped_policy_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, eps_low: float, eps_high: float, *,
                        level: str = "token", over: Tensor | None = None) -> Tensor:
    """Per-token PPO-clip loss ``−min(ρA, clip(ρ)A)`` (TRL's sign: a loss to minimise); ``level="sequence"`` is
    GSPO's one ratio per row (``importance_ratio``)."""
    ratio = importance_ratio(logp, old_logp, level, over)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    return -torch.min(ratio * adv, clipped * adv)


def clip_fractions(ratio: Tensor, adv: Tensor, mask: Tensor, eps_low: float, eps_high: float) -> dict[str, float]:
    """Fractions of valid tokens whose clipped term is the active one (zero gradient), as TRL counts them."""
    valid = mask.bool()
    r = ratio.detach().expand_as(adv)
    low = valid & (r < 1 - eps_low) & (adv < 0)
    high = valid & (r > 1 + eps_high) & (adv > 0)
    n = max(1, int(valid.sum()))
    return {"clip_low_frac": float(low.sum()) / n, "clip_high_frac": float(high.sum()) / n,
            "clip_frac": float((low | high).sum()) / n}


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 estimator of KL(π‖π_ref) per token: ``exp(ref − logp) − (ref − logp) − 1``."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(
    per_token: Tensor,
    batch: TokenBatch,
    loss_type: str,
    max_completion_length: int | None = None,
    *,
    denom: Tensor | None = None,
    n_tokens: float | None = None,
    n_seqs: float | None = None,
) -> Tensor:
    """Reduce a per-token loss to this micro-batch's share of the step loss (table in the module docstring).

    ``denom`` ([B, T], default ``mask``) is what each row's mean divides by under ``grpo``; ``n_tokens`` /
    ``n_seqs`` override the batch's step counts (objectives whose denominators are the selected set pass them).
    """
    m = batch.mask.to(per_token.dtype)
    num = per_token * m
    n_tok = batch.token_count() if n_tokens is None else n_tokens
    n_seq = batch.seq_count() if n_seqs is None else n_seqs
    if loss_type in ("dapo", "bnpo"):
        return num.sum() / max(1.0, n_tok)
    if loss_type == "grpo":
        d = m if denom is None else denom.to(per_token.dtype)
        return (num.sum(-1) / d.sum(-1).clamp(min=1.0)).sum() / max(1.0, n_seq)
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        return num.sum() / (max(1.0, n_seq) * max_completion_length)
    raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")


def select_tokens(batch: TokenBatch, keep: float, scope: str) -> tuple[Tensor, Tensor]:
    """The step's token selection: ``batch.keep`` when precomputed, else ranked on this batch's old entropy."""
    if batch.keep is not None:
        return batch.keep.bool() & batch.valid, batch.logp.new_zeros(0)
    if keep >= 1.0:
        return batch.valid.clone(), batch.logp.new_zeros(0)
    stat = batch.old_entropy if batch.old_entropy is not None else batch.entropy
    if stat is None:
        raise ValueError("keep < 1 ranks tokens by entropy: TokenBatch needs old_entropy (or entropy)")
    return top_fraction_mask(stat, batch.mask, keep, scope, group_ids=batch.group_ids)


def grpo_select(batch: TokenBatch, cfg: GRPOConfig) -> StepSelection:
    """The step's entropy-ranked token selection, decided once on the whole (gathered) step."""
    keep, thresholds = select_tokens(batch, cfg.keep, cfg.scope)
    finite = thresholds[torch.isfinite(thresholds)]
    return StepSelection(
        rows={"keep": keep},
        counts={},
        metrics={"step_threshold_mean": float(finite.double().mean().item()) if finite.numel() else float("nan")},
    )


def grpo_needs_step_selection(cfg: GRPOConfig, num_iterations: int) -> bool:
    """A keep < 1 selection spanning rows (per_group / global_batch), or reused over several PPO epochs, must be
    decided once per step at rollout time; per_sequence with one epoch ranks each micro-batch exactly."""
    return cfg.keep < 1.0 and (cfg.scope != "per_sequence" or num_iterations > 1)


def grpo_loss(batch: TokenBatch, cfg: GRPOConfig) -> ObjectiveOutput:
    """GRPO loss with optional entropy-ranked token selection; see the module docstring for the equations."""
    logp = batch.logp
    old_logp = logp.detach() if batch.old_logp is None else batch.old_logp
    adv = advantages_2d(batch).to(logp.dtype)
    selected, thresholds = select_tokens(batch, cfg.keep, cfg.scope)

    level, valid = cfg.importance_sampling_level, batch.valid
    policy = clipped_policy_loss(logp, old_logp, adv, cfg.epsilon_low, cfg.epsilon_high, level=level, over=valid)
    per_token = policy * selected.to(logp.dtype)
    policy_share = aggregate(per_token, batch, cfg.loss_type, cfg.max_completion_length)
    loss = policy_share
    weights = selected.to(logp.dtype)
    metrics = clip_fractions(importance_ratio(logp.detach(), old_logp, level, valid), adv, batch.mask,
                             cfg.epsilon_low, cfg.epsilon_high)
    if cfg.beta > 0:
        if batch.ref_logp is None:
            raise ValueError("beta > 0 needs TokenBatch.ref_logp")
        kl = k3_kl(logp, batch.ref_logp)
        loss = aggregate(per_token + cfg.beta * kl, batch, cfg.loss_type, cfg.max_completion_length)
        weights = batch.mask.to(logp.dtype)  # the KL term reaches every valid token
        metrics["kl"] = masked_mean(kl.detach(), batch.mask)

    n_valid = int(valid.sum().item())
    n_kept = int(selected.sum().item())
    rows_with_tokens = valid.any(-1)
    sample_keep = weights.detach().gt(0).any(-1)
    stat = batch.old_entropy if batch.old_entropy is not None else batch.entropy
    metrics.update(
        {
            "kept_token_frac": n_kept / n_valid if n_valid else 0.0,
            "kept_sample_frac": float(sample_keep[rows_with_tokens].float().mean().item())
            if rows_with_tokens.any()
            else 0.0,
            "policy_loss": float(policy_share.detach().item()),
            "zero_adv_frac": float((adv.detach() == 0).all(-1).float().mean().item()),
        }
    )
    finite = thresholds[torch.isfinite(thresholds)]
    # NaN (not absent) when no threshold was computed, so every rank logs the same keys.
    metrics["threshold_mean"] = float(finite.double().mean().item()) if finite.numel() else float("nan")
    if stat is not None:
        metrics["stat_kept_mean"] = masked_mean(stat.detach(), selected)
        metrics["stat_dropped_mean"] = masked_mean(stat.detach(), valid & ~selected)
    return ObjectiveOutput(loss=loss, token_weights=weights.detach(), sample_keep=sample_keep, metrics=metrics)


__all__ = [
    "GRPOConfig",
    "LOSS_TYPES",
    "aggregate",
    "clip_fractions",
    "clipped_policy_loss",
    "importance_ratio",
    "grpo_loss",
    "grpo_needs_step_selection",
    "grpo_select",
    "k3_kl",
    "select_tokens",
]
