"""Entropy-band GRPO (SPINE) selection pieces: forking-token masks, band bounds, window entropy.

Spec: ``specs/entropy_band_grpo.md`` (§3.4 forking mask, §3.5 band bounds, §7.3 window entropy). The loss
(``entropy_band_loss``) lands with the rest of issue 4; these functions are pure, detached and exact.

* ``forking_mask(s, mask, keep, scope, method)``: ``top_quantile`` keeps ``s ≥ quantile_linear(v, 1 − keep)`` per
  unit (``objectives.selection``); ``otsu`` (SPINE v2) thresholds each unit at the centre of the last low-class bin of
  the between-class-variance-maximising split of a ``bins``-bin histogram, ``keep`` ignored.
* ``band_bounds(Ĥ, F, mode)``: per sequence over its forking tokens, ``quantile`` → ``(Q_{q_lo}, Q_{q_hi})``;
  ``median_mad`` → ``(max(c − σ, 0), c)`` with ``c`` the median and ``σ = max(1.4826·MAD, 1e-6)``. Rows without
  forking tokens get ``(0, 0)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .selection import Scope, check_finite, quantile_linear, top_fraction_mask, working_dtype

METHODS = ("top_quantile", "otsu")
BAND_MODES = ("quantile", "median_mad")
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
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if method == "top_quantile":
        return top_fraction_mask(entropy, mask, keep, scope, group_ids=group_ids)[0]
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
    for u in torch.unique(units):
        rows = units == u
        sel = valid & rows[:, None]
        if sel.any():
            out |= sel & (s.to(torch.float32) >= otsu_threshold(s[sel], bins))
    return out


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


__all__ = ["band_bounds", "forking_mask", "otsu_threshold", "window_entropy"]
