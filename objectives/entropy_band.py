"""Entropy-band GRPO (SPINE, arXiv 2511.17938): train only the forking tokens and keep their entropy in a band.

Spec: ``specs/entropy_band_grpo.md``. Symbols (per token ``[i, t]``, ``Ĥ`` the detached old-policy entropy, ``H``
the current entropy with gradient):

* ``s`` — selection statistic: ``Ĥ`` (default) or ``window_entropy(Ĥ)`` (ARES);
* ``F = forking_mask(s, mask, keep, scope, method)`` — forking tokens, decided once per rollout batch;
* ``(L_i, U_i) = band_bounds(Ĥ, F)`` — per row, detached;
* ``ℓ = −min(ρA, clip(ρ, 1 − ε_lo, 1 + ε_hi)A)``, ``ρ = exp(logp − old_logp)`` — TRL's clipped policy loss;
* ``b = λ_lo·relu(L_i − H) + λ_hi·relu(H − U_i)`` — the band hinge (zero gradient inside and on an edge);
* ``k = exp(ref − logp) − (ref − logp) − 1`` — k3 KL to the pre-adaptation model.

Loss (counts global over the optimizer step: ``N_tok`` valid tokens, ``N_seq`` rows, ``N_F`` forking tokens)::

    u = F·(ℓ + b) [+ kl_coef·k            if kl_mask = "all"]
    loss = Agg_loss_type(u) [+ kl_coef·Σ F·k / max(1, N_F)   if kl_mask = "forking"]

with ``Agg`` the GRPO aggregation of ``objectives.grpo`` (``dapo`` default: ``Σ mask·u / N_tok``): masked tokens
dilute the policy term exactly as TRL's ``top_entropy_quantile`` does. Non-forking tokens get exactly zero
gradient (unless ``kl_mask="all"``). Reduction: ``keep = 1``, ``λ = 0``, ``kl_coef = 0`` is TRL 1.16's GRPO loss.

* ``forking_mask(s, mask, keep, scope, method)``: ``top_quantile`` keeps ``s ≥ quantile_linear(v, 1 − keep)`` per
  unit (``objectives.selection``); ``otsu`` (SPINE v2) thresholds each unit at the centre of the last low-class bin of
  the between-class-variance-maximising split of a ``bins``-bin histogram, ``keep`` ignored.
* ``band_bounds(Ĥ, F, mode)``: per sequence over its forking tokens, ``quantile`` → ``(Q_{q_lo}, Q_{q_hi})``;
  ``median_mad`` → ``(max(c − σ, 0), c)`` with ``c`` the median and ``σ = max(1.4826·MAD, 1e-6)``. Rows without
  forking tokens get ``(0, 0)``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .contract import ObjectiveOutput, StepSelection, TokenBatch, advantages_2d, masked_mean
from .grpo import LOSS_TYPES, aggregate, clipped_policy_loss, k3_kl
from .selection import SCOPES, Scope, check_finite, quantile_linear, top_fraction_mask, working_dtype

METHODS = ("top_quantile", "otsu")
BAND_MODES = ("quantile", "median_mad")
STATISTICS = ("entropy", "window_entropy")
KL_MASKS = ("forking", "all")
MAD_SCALE = 1.4826  # MAD → σ for a normal distribution


def otsu_threshold(values: Tensor, bins: int = 100) -> Tensor:
    """Otsu threshold of one unit's valid values (float32, §3.4): the centre of the last low-class bin."""
    v = values.to(torch.float32)
    lo, hi = v.min(), v.max()
    if hi == lo:
        return hi
    p = torch.histc(v, bins=bins, min=float(lo), max=float(hi)) / v.numel()
    centres = lo + (torch.arange(bins, dtype=torch.float32, device=v.device) + 0.5) * (hi - lo) / bins
    w0 = torch.cumsum(p, 0)[:-1]
    w1 = 1.0 - w0
    m0_sum = torch.cumsum(p * centres, 0)[:-1]
    mu0 = m0_sum / w0
    mu1 = ((p * centres).sum() - m0_sum) / w1
    sigma_b = torch.where((w0 > 0) & (w1 > 0), w0 * w1 * (mu0 - mu1) ** 2, torch.full_like(w0, -float("inf")))
    if not torch.isfinite(sigma_b).any():
        return hi
    return centres[int(torch.argmax(sigma_b))]  # argmax returns the first maximum


def forking_mask(
    entropy: Tensor,
    mask: Tensor,
    keep: float = 0.2,
    scope: Scope = "per_sequence",
    method: str = "top_quantile",
    *,
    group_ids: Tensor | None = None,
    bins: int = 100,
) -> Tensor:
    """Forking tokens ``F [B, T]``: the high-statistic tokens of each unit of ``scope`` (higher is kept)."""
    return _forking_with_thresholds(entropy, mask, keep, scope, method, group_ids=group_ids, bins=bins)[0]


def _forking_with_thresholds(
    entropy: Tensor, mask: Tensor, keep: float, scope: str, method: str, *, group_ids: Tensor | None, bins: int
) -> tuple[Tensor, Tensor]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if method == "top_quantile":
        return top_fraction_mask(entropy, mask, keep, scope, group_ids=group_ids)
    valid = mask.bool()
    s = entropy.detach()
    check_finite(s, valid)
    if scope == "per_sequence":
        units = torch.arange(s.shape[0], device=s.device)
    elif scope == "per_group":
        if group_ids is None:
            raise ValueError("scope='per_group' needs group_ids")
        units = group_ids
    else:
        units = torch.zeros(s.shape[0], dtype=torch.long, device=s.device)
    out = torch.zeros_like(valid)
    taus = []
    for u in torch.unique(units):
        rows = units == u
        sel = valid & rows[:, None]
        tau = otsu_threshold(s[sel], bins) if sel.any() else s.new_tensor(float("nan"), dtype=torch.float32)
        out |= sel & (s.to(torch.float32) >= tau)
        taus.append(tau)
    return out, torch.stack(taus)


def band_bounds(
    old_entropy: Tensor, forking: Tensor, mode: str = "quantile", q_lo: float = 0.1, q_hi: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Per-sequence band ``(lo [B], hi [B])`` from the old entropy of each row's forking tokens (detached)."""
    if mode not in BAND_MODES:
        raise ValueError(f"unknown band mode {mode!r}; valid: {', '.join(BAND_MODES)}")
    x = old_entropy.detach().to(working_dtype(old_entropy)).masked_fill(~forking.bool(), float("nan"))
    if mode == "quantile":
        lo, hi = quantile_linear(x, q_lo, dim=1), quantile_linear(x, q_hi, dim=1)
    else:
        centre = quantile_linear(x, 0.5, dim=1)
        mad = quantile_linear((x - centre[:, None]).abs(), 0.5, dim=1)
        sigma = (MAD_SCALE * mad).clamp(min=1e-6)
        lo, hi = (centre - sigma).clamp(min=0.0), centre
    return torch.nan_to_num(lo, nan=0.0), torch.nan_to_num(hi, nan=0.0)


def window_entropy(entropy: Tensor, mask: Tensor, w: int = 4, *, offset: int = 0) -> Tensor:
    """ARES window statistic (§7.3): the mean of ``w`` consecutive *valid* tokens starting ``offset`` valid tokens
    after each valid token; the window shrinks at the end of a row, an empty window falls back to the token's own
    value, masked positions are skipped and output 0."""
    if w < 1 or offset not in (0, 1):
        raise ValueError(f"window needs w >= 1 and offset in (0, 1), got w={w}, offset={offset}")
    valid = mask.bool()
    s = entropy.detach().to(working_dtype(entropy)).masked_fill(~valid, 0.0)
    rank = valid.long().cumsum(1) - 1  # position of each valid token among its row's valid tokens
    n = valid.sum(1, keepdim=True)
    # valid values packed to the left in order; masked positions go to a spare last column that is dropped
    slot = torch.where(valid, rank, torch.full_like(rank, s.shape[1]))
    packed = torch.zeros(s.shape[0], s.shape[1] + 1, dtype=s.dtype, device=s.device).scatter(1, slot, s)[:, :-1]
    prefix = torch.cat([torch.zeros_like(s[:, :1]), packed.cumsum(1)], dim=1)  # prefix[:, j] = Σ packed[:, :j]
    start = (rank + offset).clamp(max=n)
    end = (rank + offset + w).clamp(max=n)
    total = prefix.gather(1, end.clamp(min=0)) - prefix.gather(1, start.clamp(min=0))
    size = (end - start).clamp(min=0)
    out = torch.where(size > 0, total / size.clamp(min=1), s)
    return torch.where(valid, out, torch.zeros_like(out))


@dataclass
class EntropyBandConfig:
    """Knobs of entropy-band GRPO; defaults and their sources: ``specs/entropy_band_grpo.md`` §4."""

    keep: float = 0.2  # fraction of each unit's valid tokens kept as forking tokens [paper]
    scope: str = "per_sequence"  # unit of the keep fraction: per_sequence | per_group | global_batch
    method: str = "top_quantile"  # top_quantile (SPINE v1) | otsu (SPINE v2; keep ignored)
    otsu_bins: int = 100  # histogram bins of the Otsu split
    statistic: str = "entropy"  # entropy | window_entropy (ARES): what ranks tokens
    window: int = 4  # window_entropy width w
    window_offset: int = 0  # 0 = paper formula, 1 = ARES code (the following w tokens)
    band: str = "quantile"  # quantile | median_mad | off
    q_lo: float = 0.1  # lower band edge quantile of each row's forking entropies
    q_hi: float = 0.5  # upper band edge quantile (the median)
    lambda_lo: float = 0.01  # weight of the pull-up hinge below the band
    lambda_hi: float = 0.01  # weight of the pull-down hinge above the band
    kl_coef: float = 0.0  # k3 KL to the reference (pre-adaptation) model
    kl_mask: str = "forking"  # forking: mean over forking tokens | all: TRL's placement on every valid token
    loss_type: str = "dapo"  # dapo | bnpo | grpo | dr_grpo (objectives.grpo)
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    max_completion_length: int | None = None  # T_max for dr_grpo (the trainer fills it in)

    def __post_init__(self) -> None:
        def one_of(name: str, options: tuple[str, ...]) -> None:
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {', '.join(options)}, got {getattr(self, name)!r}")

        one_of("scope", SCOPES)
        one_of("method", METHODS)
        one_of("statistic", STATISTICS)
        one_of("band", (*BAND_MODES, "off"))
        one_of("kl_mask", KL_MASKS)
        one_of("loss_type", LOSS_TYPES)
        if not 0.0 <= self.keep <= 1.0:
            raise ValueError(f"keep must be in [0, 1], got {self.keep}")
        if not 0.0 <= self.q_lo <= self.q_hi <= 1.0:
            raise ValueError(f"band quantiles need 0 <= q_lo <= q_hi <= 1, got q_lo={self.q_lo}, q_hi={self.q_hi}")
        for name in ("lambda_lo", "lambda_hi", "kl_coef", "epsilon_low", "epsilon_high"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.otsu_bins < 2:
            raise ValueError(f"otsu_bins must be >= 2, got {self.otsu_bins}")
        if self.window < 1 or self.window_offset not in (0, 1):
            raise ValueError(f"window must be >= 1 and window_offset 0 or 1, got {self.window}, {self.window_offset}")
        if self.loss_type == "dr_grpo" and not self.max_completion_length:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        if self.method == "otsu" and self.keep != 0.2:
            warnings.warn("entropy_band: method='otsu' ignores keep", stacklevel=2)

    @property
    def band_on(self) -> bool:
        return self.band != "off" and (self.lambda_lo > 0 or self.lambda_hi > 0)

    @property
    def ref_coef(self) -> float:
        """Weight of the reference-model term (the trainer computes reference log-probs only when > 0)."""
        return self.kl_coef


def _old_entropy(batch: TokenBatch) -> Tensor:
    stat = batch.old_entropy if batch.old_entropy is not None else batch.entropy
    if stat is None:
        raise ValueError("entropy_band ranks tokens by entropy: TokenBatch needs old_entropy (or entropy)")
    return stat.detach()


def entropy_band_select(batch: TokenBatch, cfg: EntropyBandConfig) -> StepSelection:
    """Forking mask, band edges and step counts, decided once per rollout batch on the whole step.

    ``batch`` is the whole optimizer step (gathered over ranks for ``per_group`` / ``global_batch``). Returns
    ``rows = {keep, band_lo, band_hi}``, ``counts = {n_tokens_global, n_seqs_global, n_keep_global}`` and the
    step-level metrics of §10 (kept fractions, thresholds, statistic of kept vs dropped tokens, band edges).
    """
    h_old = _old_entropy(batch)
    valid = batch.valid
    check_finite(h_old, valid, "old entropy")
    stat = h_old if cfg.statistic == "entropy" else window_entropy(h_old, valid, cfg.window, offset=cfg.window_offset)
    forking, taus = _forking_with_thresholds(
        stat, valid, cfg.keep, cfg.scope, cfg.method, group_ids=batch.group_ids, bins=cfg.otsu_bins
    )
    if cfg.band == "off":
        lo = hi = h_old.new_zeros(h_old.shape[0], dtype=working_dtype(h_old))
    else:
        lo, hi = band_bounds(h_old, forking, cfg.band, cfg.q_lo, cfg.q_hi)
    n_tok, n_f = float(valid.sum().item()), float(forking.sum().item())
    # rows the trainer dropped (unscorable groups) leave N_seq; rows merely without valid tokens stay (TRL parity)
    n_seq = float(batch.sample_keep.sum().item()) if batch.sample_keep is not None else float(valid.shape[0])
    rows_with_tokens = valid.any(-1)
    finite = taus[torch.isfinite(taus)].double()
    has_f = forking.any(-1)
    nan = float("nan")
    metrics = {
        "kept_token_frac": n_f / n_tok if n_tok else 0.0,
        "kept_sample_frac": float(has_f[rows_with_tokens].float().mean().item()) if rows_with_tokens.any() else 0.0,
        # NaN (not absent) when no threshold exists, so every rank logs the same keys
        "threshold_mean": float(finite.mean().item()) if finite.numel() else nan,
        "threshold_min": float(finite.min().item()) if finite.numel() else nan,
        "threshold_max": float(finite.max().item()) if finite.numel() else nan,
        "stat_kept_mean": masked_mean(stat, forking),
        "stat_dropped_mean": masked_mean(stat, valid & ~forking),
        "band_lo_mean": float(lo[has_f].double().mean().item()) if has_f.any() else 0.0,
        "band_hi_mean": float(hi[has_f].double().mean().item()) if has_f.any() else 0.0,
    }
    return StepSelection(
        rows={"keep": forking, "band_lo": lo, "band_hi": hi},
        counts={"n_tokens_global": n_tok, "n_seqs_global": n_seq, "n_keep_global": n_f},
        metrics=metrics,
    )


def entropy_band_needs_step_selection(cfg: EntropyBandConfig, num_iterations: int) -> bool:
    """The selection must be decided once per step on the whole step when its unit spans rows, when several PPO
    epochs reuse it (it must come from the old policy), or when the forking-token KL needs the step's ``N_F``."""
    selective = cfg.keep < 1.0 or cfg.method == "otsu"
    forking_kl = cfg.kl_coef > 0 and cfg.kl_mask == "forking"
    return forking_kl or (selective and (cfg.scope != "per_sequence" or num_iterations > 1)) or (
        cfg.band_on and num_iterations > 1
    )


def band_penalty(entropy: Tensor, lo: Tensor, hi: Tensor, lambda_lo: float, lambda_hi: float) -> Tensor:
    """``λ_lo·relu(L − H) + λ_hi·relu(H − U)`` per token (``relu``: zero gradient exactly on an edge)."""
    lo, hi = lo.to(entropy.dtype)[:, None], hi.to(entropy.dtype)[:, None]
    return lambda_lo * torch.relu(lo - entropy) + lambda_hi * torch.relu(entropy - hi)


def entropy_band_loss(batch: TokenBatch, cfg: EntropyBandConfig) -> ObjectiveOutput:
    """SPINE loss of one micro-batch (module docstring). Uses the step's precomputed ``keep`` / ``band_lo`` /
    ``band_hi`` / ``n_keep_global`` when present, else selects on this batch (exact only when it is the step)."""
    logp = batch.logp
    old_logp = logp.detach() if batch.old_logp is None else batch.old_logp
    adv = advantages_2d(batch).to(logp.dtype)
    valid = batch.valid
    metrics: dict[str, float] = {}
    if batch.keep is not None:
        forking = batch.keep.bool() & valid
        lo, hi = batch.band_lo, batch.band_hi
        if cfg.band_on and (lo is None or hi is None):
            raise ValueError("a precomputed entropy_band selection must carry band_lo and band_hi")
        n_f = batch.n_keep_global if batch.n_keep_global is not None else float(forking.sum().item())
    else:
        sel = entropy_band_select(batch, cfg)
        forking, lo, hi = sel.rows["keep"], sel.rows["band_lo"], sel.rows["band_hi"]
        n_f = sel.counts["n_keep_global"]
        metrics.update(sel.metrics)
    f = forking.to(logp.dtype)

    policy = clipped_policy_loss(logp, old_logp, adv, cfg.epsilon_low, cfg.epsilon_high)
    policy_share = aggregate(f * policy, batch, cfg.loss_type, cfg.max_completion_length)
    per_token = f * policy
    band_share = logp.new_zeros(())
    if cfg.band_on:
        if batch.entropy is None or not batch.entropy.requires_grad and logp.requires_grad:
            raise ValueError("the entropy band needs TokenBatch.entropy with gradient (the current policy's entropy)")
        band = f * band_penalty(batch.entropy, lo, hi, cfg.lambda_lo, cfg.lambda_hi)
        band_share = aggregate(band, batch, cfg.loss_type, cfg.max_completion_length)
        per_token = per_token + band
        h = batch.entropy.detach()
        n_local = float(forking.sum().item())
        metrics["frac_below_band"] = float((forking & (h < lo.to(h.dtype)[:, None])).sum().item()) / max(1.0, n_local)
        metrics["frac_above_band"] = float((forking & (h > hi.to(h.dtype)[:, None])).sum().item()) / max(1.0, n_local)
    weights = f
    kl_share = logp.new_zeros(())
    if cfg.kl_coef > 0:
        if batch.ref_logp is None:
            raise ValueError("kl_coef > 0 needs TokenBatch.ref_logp (log-probs of the reference model)")
        kl = k3_kl(logp, batch.ref_logp)
        if cfg.kl_mask == "all":
            per_token = per_token + cfg.kl_coef * kl
            kl_share = aggregate(cfg.kl_coef * kl, batch, cfg.loss_type, cfg.max_completion_length)
            weights = batch.mask.to(logp.dtype)  # the KL then reaches every valid token
        else:
            kl_share = cfg.kl_coef * (f * kl).sum() / max(1.0, n_f)
        metrics["kl"] = masked_mean(kl.detach(), forking if cfg.kl_mask == "forking" else valid)
    loss = aggregate(per_token, batch, cfg.loss_type, cfg.max_completion_length)
    if cfg.kl_coef > 0 and cfg.kl_mask == "forking":
        loss = loss + kl_share
    metrics.update(
        {
            "policy_loss": float(policy_share.detach().item()),
            "band_loss": float(band_share.detach().item()),
            "kl_loss": float(kl_share.detach().item()),
            "zero_adv_frac": float((adv.detach() == 0).all(-1).float().mean().item()),
        }
    )
    sample_keep = weights.detach().gt(0).any(-1)
    return ObjectiveOutput(loss=loss, token_weights=weights.detach(), sample_keep=sample_keep, metrics=metrics)


__all__ = [
    "EntropyBandConfig",
    "band_bounds",
    "band_penalty",
    "entropy_band_loss",
    "entropy_band_needs_step_selection",
    "entropy_band_select",
    "forking_mask",
    "otsu_threshold",
    "window_entropy",
]
