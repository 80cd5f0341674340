"""D³S, dynamic dual-level down-sampling (arXiv 2509.22115): train on the rollouts that maximise advantage variance
and, within them, on the tokens with the largest ``|A|·Ĥ``, with both budgets growing over training.

Spec: ``specs/d3s.md``. Three pure stages, run once per optimizer step on the whole (gathered) step:

1. ``select_samples`` — per prompt group keep the ``n_keep`` rollouts whose advantages have maximum variance
   (``maxvar_subset``), then a second max-variance pass over the pooled survivors keeps ``⌈cross_group_frac·|P|⌉``
   (drops groups still near zero). Advantages come from all ``G`` rollouts and are never re-normalised.
2. ``select_tokens`` — among kept samples keep the top ``⌈keep_frac·n⌉`` tokens by ``σ = |A|·Ĥ`` (ties: lower global
   (row, position) first), over the whole step by default.
3. ``schedule`` — ``n_keep`` and ``keep_frac`` interpolate linearly from (``n_init``, ``k_init``) at progress 0 to
   (``n_final``, ``k_final``) at progress 1.

Loss, with ``W`` the token selection, ``D`` the denominator mask (``W`` by default, ``"valid"``: every valid token of a
kept sample) and ``B_kept`` the kept samples, all counted over the step; dropped samples appear in no count::

    ℓ = −min(ρA, clip(ρ, 1 − ε_lo, 1 + ε_hi)A)        ρ = exp(logp − old_logp)  (GSPO: row mean over W)
    dapo / bnpo:  Σ W·ℓ / max(1, Σ D)
    grpo:         (1 / max(1, B_kept)) Σ_i Σ_t W·ℓ / max(1, Σ_t D_i)
    dr_grpo:      Σ W·ℓ / (max(1, B_kept)·T_max)

Reduction: ``n_keep ≥ G``, no cross stage, ``keep_frac = 1`` is TRL 1.16's GRPO (or GSPO) loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .contract import ObjectiveOutput, StepSelection, TokenBatch, advantages_2d, masked_mean, row_advantages
from .grpo import LOSS_TYPES, aggregate, clipped_policy_loss, k3_kl
from .selection import SCOPES, check_finite, working_dtype

SPLITS = ("optimal", "balanced")
NORMALIZERS = ("selected", "valid")
IS_LEVELS = ("token", "sequence")
VAR_TIE = 1e-9  # relative tolerance under which two candidate variances tie


def ceil_tol(x: float) -> int:
    """``⌈x⌉`` that floating noise cannot push up: ``0.14·50 = 7.000000000000001`` gives 7."""
    return math.ceil(x - 1e-6)


def maxvar_subset(values: Tensor, m: int, split: str = "optimal") -> Tensor:
    """Indices (ascending) of a size-``m`` subset of ``values`` with maximum population variance.

    A maximiser is always "the ``k`` largest ∪ the ``m − k`` smallest" (PODS), so only ``m + 1`` candidates are
    scored. ``split="optimal"``: best ``k``, ties (within ``1e-9·max(1, V_max)``) to the ``k`` closest to ``m/2``,
    then the smaller ``k``; ``"balanced"``: ``k = ⌈m/2⌉``. Value ties go to the lower index.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if values.dim() != 1:
        raise ValueError(f"maxvar_subset needs a 1-D tensor, got shape {tuple(values.shape)}")
    n = values.numel()
    if m >= n:
        return torch.arange(n, device=values.device)
    if m <= 0:
        return torch.zeros(0, dtype=torch.long, device=values.device)
    v = values.detach().double()
    idx = torch.arange(n, device=v.device)
    # (value desc, index asc) and (value asc, index asc): stable sorts of the index order
    dsc = idx[torch.sort(v, descending=True, stable=True).indices]
    asc = idx[torch.sort(v, stable=True).indices]
    if split == "balanced":
        k = math.ceil(m / 2)
    else:
        c = v - v.mean()  # centred: the prefix-sum variances below do not cancel catastrophically
        top = torch.cat([c.new_zeros(1), c[dsc].cumsum(0)])
        top2 = torch.cat([c.new_zeros(1), (c[dsc] ** 2).cumsum(0)])
        bot = torch.cat([c.new_zeros(1), c[asc].cumsum(0)])
        bot2 = torch.cat([c.new_zeros(1), (c[asc] ** 2).cumsum(0)])
        ks = torch.arange(m + 1, device=v.device)
        s1 = top[ks] + bot[m - ks]
        s2 = top2[ks] + bot2[m - ks]
        var = s2 / m - (s1 / m) ** 2
        best = float(var.max())
        ties = (var >= best - VAR_TIE * max(1.0, best)).nonzero().flatten().tolist()
        k = min(ties, key=lambda j: (abs(j - m / 2), j))
    chosen = dsc[:k]
    taken = torch.zeros(n, dtype=torch.bool, device=v.device)
    taken[chosen] = True
    rest = asc[~taken[asc]][: m - k]
    return torch.sort(torch.cat([chosen, rest])).values


def select_samples(
    advantages: Tensor, group_ids: Tensor, n_keep_per_group: int, cross_group_frac: float | None = 0.5,
    split: str = "optimal",
) -> Tensor:
    """Rows kept by D³S's two max-variance stages (§3.3) on the whole step's sequence advantages ``[N]``."""
    if advantages.dim() != 1 or group_ids.shape != advantages.shape:
        raise ValueError("select_samples needs 1-D advantages and group_ids of the same length")
    if n_keep_per_group < 2:
        raise ValueError(f"n_keep_per_group must be >= 2 (one rollout has no variance), got {n_keep_per_group}")
    if cross_group_frac is not None and cross_group_frac <= 0:
        raise ValueError(f"cross_group_frac must be > 0 (or None to skip the stage), got {cross_group_frac}")
    check_finite(advantages[None], torch.ones_like(advantages, dtype=torch.bool)[None], "advantage")
    keep = torch.zeros_like(advantages, dtype=torch.bool)
    for g in torch.unique(group_ids):  # groups in id order; members in batch order
        members = (group_ids == g).nonzero().flatten()
        keep[members[maxvar_subset(advantages[members], min(n_keep_per_group, members.numel()), split)]] = True
    if cross_group_frac is None or cross_group_frac >= 1:
        return keep
    pool = keep.nonzero().flatten()
    budget = min(pool.numel(), max(2, ceil_tol(cross_group_frac * pool.numel())))
    out = torch.zeros_like(keep)
    out[pool[maxvar_subset(advantages[pool], budget, split)]] = True
    return out


def select_tokens(
    advantages: Tensor,
    entropy: Tensor,
    mask: Tensor,
    keep_frac: float,
    scope: str = "global_batch",
    *,
    group_ids: Tensor | None = None,
    drop_zero_score: bool = False,
) -> Tensor:
    """Top ``⌈keep_frac·n⌉`` valid tokens of each unit by ``|A|·Ĥ`` (§3.4); ties to the lower flat index.

    ``mask`` holds the valid tokens of kept samples only. ``advantages`` is ``[B]`` or ``[B, T]``.
    """
    return _select_tokens(advantages, entropy, mask, keep_frac, scope, group_ids, drop_zero_score)[0]


def _scores(advantages: Tensor, entropy: Tensor, mask: Tensor) -> Tensor:
    valid = mask.bool()
    adv = advantages[:, None].expand_as(entropy) if advantages.dim() == 1 else advantages
    check_finite(entropy.detach(), valid, "entropy")
    check_finite(adv.detach(), valid, "advantage")
    dt = working_dtype(entropy)
    return (adv.detach().to(dt).abs() * entropy.detach().to(dt)).masked_fill(~valid, 0.0)


def _select_tokens(advantages, entropy, mask, keep_frac, scope, group_ids, drop_zero_score) -> tuple[Tensor, float]:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if not 0.0 <= keep_frac <= 1.0:
        raise ValueError(f"keep_frac must be in [0, 1], got {keep_frac}")
    valid = mask.bool()
    score = _scores(advantages, entropy, valid)
    if keep_frac >= 1.0:
        out = valid & (score > 0) if drop_zero_score else valid.clone()
        return out, float("nan")
    if scope == "global_batch":
        units = torch.zeros(valid.shape[0], dtype=torch.long, device=valid.device)
    elif scope == "per_sequence":
        units = torch.arange(valid.shape[0], device=valid.device)
    else:
        if group_ids is None:
            raise ValueError("scope='per_group' needs group_ids")
        units = group_ids
    flat_valid, flat_score = valid.reshape(-1), score.reshape(-1)
    flat_units = units[:, None].expand_as(valid).reshape(-1)
    out = torch.zeros_like(flat_valid)
    kth = []
    for u in torch.unique(units):
        where = (flat_valid & (flat_units == u)).nonzero().flatten()  # ascending flat index
        n = where.numel()
        if n == 0:
            continue
        k = min(n, max(1, ceil_tol(keep_frac * n)))
        order = torch.sort(flat_score[where], descending=True, stable=True).indices[:k]
        chosen = where[order]
        if drop_zero_score:
            chosen = chosen[flat_score[chosen] > 0]
        out[chosen] = True
        kth.append(float(flat_score[where[order[-1]]]))
    threshold = float(sum(kth) / len(kth)) if kth else float("nan")
    return out.view_as(valid), threshold


def schedule(progress: float, n_init: int, n_final: int, k_init: float, k_final: float) -> tuple[int, float]:
    """Linear schedule (§3.5): ``(n_keep, keep_frac)`` at ``progress`` (clamped to [0, 1]); ``n_keep`` rounds half up."""
    p = min(1.0, max(0.0, float(progress)))
    n_keep = math.floor((1 - p) * n_init + p * n_final + 0.5 + 1e-6)
    return n_keep, (1 - p) * k_init + p * k_final


@dataclass
class D3SConfig:
    """Knobs of D³S; defaults and their sources: ``specs/d3s.md`` §4 (``None`` sizes derive from the group size)."""

    n_init: int | None = None  # rollouts kept per group at progress 0; None -> max(2, G // 4)
    n_final: int | None = None  # ... at progress 1; None -> max(2, G // 2)
    k_init: float = 0.2  # fraction of the kept samples' tokens kept at progress 0
    k_final: float = 0.5  # ... at progress 1
    schedule: bool = True  # false -> fixed n_init, k_init (the paper's D2S)
    cross_group_frac: float | None = 0.5  # budget of the cross-group stage; None = D³S-I (no cross stage)
    split: str = "optimal"  # optimal | balanced (k = ⌈m/2⌉ largest + rest smallest)
    token_scope: str = "global_batch"  # unit of the token budget: global_batch | per_sequence | per_group
    drop_zero_score: bool = False  # never keep tokens with |A|·Ĥ = 0
    token_normalizer: str = "selected"  # selected (Σ W) | valid (all valid tokens of kept samples)
    loss_type: str = "dapo"  # dapo | bnpo | grpo | dr_grpo
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    kl_coef: float = 0.0  # k3 KL to the reference model on selected tokens (TRL's placement)
    num_generations: int | None = None  # group size G (the trainer fills it in)
    max_completion_length: int | None = None  # T_max for dr_grpo (the trainer fills it in)

    def __post_init__(self) -> None:
        for name, options in (("split", SPLITS), ("token_scope", SCOPES), ("token_normalizer", NORMALIZERS),
                              ("loss_type", LOSS_TYPES), ("importance_sampling_level", IS_LEVELS)):
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {', '.join(options)}, got {getattr(self, name)!r}")
        if self.num_generations is not None:
            g = self.num_generations
            self.n_init = max(2, g // 4) if self.n_init is None else self.n_init
            self.n_final = max(2, g // 2) if self.n_final is None else self.n_final
        for name in ("n_init", "n_final"):
            v = getattr(self, name)
            if v is not None and v < 2:
                raise ValueError(f"{name} must be >= 2 (a one-rollout subset has no variance), got {v}")
        for name in ("k_init", "k_final"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.cross_group_frac is not None and self.cross_group_frac <= 0:
            raise ValueError(f"cross_group_frac must be > 0 (or null to skip the stage), got {self.cross_group_frac}")
        if min(self.epsilon_low, self.epsilon_high, self.kl_coef) < 0:
            raise ValueError("epsilon_low, epsilon_high and kl_coef must be >= 0")
        if self.loss_type == "dr_grpo" and not self.max_completion_length:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")

    @property
    def ref_coef(self) -> float:
        return self.kl_coef

    def budgets(self, progress: float) -> tuple[int, float]:
        """``(n_keep_per_group, keep_frac)`` at ``progress``."""
        if self.n_init is None or self.n_final is None:
            raise ValueError("D3SConfig needs n_init/n_final or num_generations to derive them")
        if not self.schedule:
            return self.n_init, self.k_init
        return schedule(progress, self.n_init, self.n_final, self.k_init, self.k_final)


def d3s_sample_keep(batch: TokenBatch, cfg: D3SConfig) -> tuple[Tensor, dict[str, float]]:
    """Stage 1 on the whole step: ``sample_keep [B]`` and its metrics (needs advantages and group ids only, so the
    trainer runs it before the statistics pass and drops the other rollouts from all further work)."""
    if batch.group_ids is None:
        raise ValueError("D³S needs TokenBatch.group_ids (rows of one prompt share an id)")
    n_keep, _ = cfg.budgets(batch.progress)
    adv = row_advantages(batch).detach()
    keep = select_samples(adv, batch.group_ids, n_keep, cfg.cross_group_frac, cfg.split)
    a = adv.double()
    metrics = {
        "n_keep_per_group": float(n_keep),
        "cross_budget": float(keep.sum().item()) if cfg.cross_group_frac is not None and cfg.cross_group_frac < 1
        else float("nan"),
        "kept_sample_frac": float(keep.float().mean().item()) if keep.numel() else 0.0,
        "adv_var_all": float(a.var(unbiased=False).item()) if a.numel() else 0.0,
        "adv_var_kept": float(a[keep].var(unbiased=False).item()) if keep.any() else 0.0,
        "useful_frac_all": float((a != 0).double().mean().item()) if a.numel() else 0.0,
        "useful_frac_kept": float((a[keep] != 0).double().mean().item()) if keep.any() else 0.0,
    }
    return keep, metrics


def d3s_select(batch: TokenBatch, cfg: D3SConfig, *, n_rows_all: int | None = None,
               n_valid_all: float | None = None) -> StepSelection:
    """Both stages on the whole step (``batch.sample_keep`` = stage 1 already applied); ``n_rows_all`` /
    ``n_valid_all`` describe the step before dropped rows were removed (for the metrics only)."""
    sample_metrics: dict[str, float] = {}
    if batch.sample_keep is None:
        sample_keep, sample_metrics = d3s_sample_keep(batch, cfg)
    else:
        sample_keep = batch.sample_keep.bool()
    _, keep_frac = cfg.budgets(batch.progress)
    valid = batch.valid
    kept_valid = valid & sample_keep[:, None]
    h = batch.old_entropy if batch.old_entropy is not None else batch.entropy
    if h is None:
        raise ValueError("D³S scores tokens by |A|·entropy: TokenBatch needs old_entropy (or entropy)")
    adv = advantages_2d(batch)
    tokens, threshold = _select_tokens(adv, h, kept_valid, keep_frac, cfg.token_scope, batch.group_ids,
                                       cfg.drop_zero_score)
    denom = tokens if cfg.token_normalizer == "selected" else kept_valid
    score = _scores(adv, h, kept_valid)
    n_valid = float(valid.sum().item()) if n_valid_all is None else n_valid_all
    n_sel, n_kept_valid = float(tokens.sum().item()), float(kept_valid.sum().item())
    metrics = {
        **sample_metrics,
        "keep_frac": keep_frac,
        "kept_token_frac": n_sel / n_valid if n_valid else 0.0,
        "kept_token_frac_of_kept": n_sel / n_kept_valid if n_kept_valid else 0.0,
        "score_threshold": threshold,
        "entropy_kept_mean": masked_mean(h.detach(), tokens),
        "entropy_dropped_mean": masked_mean(h.detach(), kept_valid & ~tokens),
        "score_kept_mean": masked_mean(score, tokens),
        "score_dropped_mean": masked_mean(score, kept_valid & ~tokens),
        "zero_score_kept": float((tokens & (score == 0)).sum().item()),
        "zero_signal_step": float(not bool((score[kept_valid] > 0).any())),
    }
    if n_rows_all is not None:
        metrics["kept_sample_frac"] = float(sample_keep.sum().item()) / max(1, n_rows_all)
    return StepSelection(
        rows={"keep": tokens, "sample_keep": sample_keep},
        counts={"n_tokens_global": float(denom.sum().item()), "n_seqs_global": float(sample_keep.sum().item())},
        metrics=metrics,
    )


def d3s_loss(batch: TokenBatch, cfg: D3SConfig) -> ObjectiveOutput:
    """D³S loss of one micro-batch (module docstring). Uses the step's precomputed ``sample_keep`` / ``keep`` and
    counts when present, else runs the whole selection on this batch (exact only when it is the step)."""
    logp = batch.logp
    old_logp = logp.detach() if batch.old_logp is None else batch.old_logp
    metrics: dict[str, float] = {}
    if batch.keep is not None:
        sample_keep = batch.sample_keep.bool() if batch.sample_keep is not None else batch.keep.any(-1)
        tokens = batch.keep.bool() & batch.valid & sample_keep[:, None]
        n_tokens, n_seqs = batch.n_tokens_global, batch.n_seqs_global
    else:
        sel = d3s_select(batch, cfg)
        tokens, sample_keep = sel.rows["keep"], sel.rows["sample_keep"]
        n_tokens, n_seqs = sel.counts["n_tokens_global"], sel.counts["n_seqs_global"]
        metrics.update(sel.metrics)
    if n_tokens is None or n_seqs is None:  # precomputed masks without counts: count this batch
        denom_local = tokens if cfg.token_normalizer == "selected" else batch.valid & sample_keep[:, None]
        n_tokens = float(denom_local.sum().item()) if n_tokens is None else n_tokens
        n_seqs = float(sample_keep.sum().item()) if n_seqs is None else n_seqs
    w = tokens.to(logp.dtype)
    denom = w if cfg.token_normalizer == "selected" else (batch.valid & sample_keep[:, None]).to(logp.dtype)
    adv = advantages_2d(batch).to(logp.dtype)

    # GSPO: the row's mean log-ratio over its selected tokens (TRL averages over the valid ones: equal when W = mask)
    per_token = w * clipped_policy_loss(logp, old_logp, adv, cfg.epsilon_low, cfg.epsilon_high,
                                        level=cfg.importance_sampling_level, over=tokens)
    policy_share = aggregate(per_token, batch, cfg.loss_type, cfg.max_completion_length, denom=denom,
                             n_tokens=n_tokens, n_seqs=n_seqs)
    loss = policy_share
    if cfg.kl_coef > 0:
        if batch.ref_logp is None:
            raise ValueError("kl_coef > 0 needs TokenBatch.ref_logp (log-probs of the reference model)")
        kl = k3_kl(logp, batch.ref_logp)
        loss = aggregate(per_token + cfg.kl_coef * kl * w, batch, cfg.loss_type, cfg.max_completion_length,
                         denom=denom, n_tokens=n_tokens, n_seqs=n_seqs)
        metrics["kl"] = masked_mean(kl.detach(), tokens)
    metrics["policy_loss"] = float(policy_share.detach().item())
    return ObjectiveOutput(loss=loss, token_weights=w.detach(), sample_keep=sample_keep, metrics=metrics)


__all__ = [
    "D3SConfig",
    "ceil_tol",
    "d3s_loss",
    "d3s_sample_keep",
    "d3s_select",
    "maxvar_subset",
    "schedule",
    "select_samples",
    "select_tokens",
]
