"""Shared selection primitives: quantiles, top-fraction token masks, scopes.

Every objective that keeps a fraction of tokens uses these, so that "keep", scope and tie rules mean the same
thing everywhere:

* ``keep`` is the fraction of valid tokens kept; the statistic is ranked **higher is kept**.
* The threshold of a unit is ``τ = quantile_linear(valid values, 1 − keep)`` and a token is kept iff
  ``stat ≥ τ`` (ties at ``τ`` are kept), so with distinct values a unit of ``n`` tokens keeps
  ``1 + ⌊keep·(n − 1)⌋`` of them: at least one, and ``keep = 0`` keeps the maximum.
* ``keep ≥ 1`` keeps every valid token and computes no threshold.
* A unit is one row (``per_sequence``), the rows of one prompt group (``per_group``) or every valid token of the
  tensor given (``global_batch``; for a step split over ranks and micro-batches the caller passes the gathered step).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Scope = Literal["per_sequence", "per_group", "global_batch"]
SCOPES: tuple[str, ...] = ("per_sequence", "per_group", "global_batch")


def working_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; every other float (bf16, fp16, fp32) is ranked in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def quantile_linear(values: Tensor, q: float, dim: int = -1) -> Tensor:
    """``torch.quantile(values, q, dim)`` with linear interpolation, ignoring NaN entries.

    Identical to ``torch.quantile`` on the non-NaN values (same rank arithmetic: ``r = q·(n−1)`` in the working
    dtype, ``lerp(v[⌊r⌋], v[⌈r⌉], r − ⌊r⌋)``) but without its 2^24-element limit. A slice with no value gives NaN.
    ``q`` is a Python float, formed by the caller (e.g. ``1 − keep``) as TRL does.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in [0, 1], got {q}")
    x = values.to(working_dtype(values)).movedim(dim, -1)
    ordered, _ = torch.sort(x, dim=-1)  # NaN sorts last
    last = (~torch.isnan(ordered)).sum(-1, keepdim=True) - 1  # [..., 1] long; -1 when empty
    ranks = torch.tensor(q, dtype=x.dtype, device=x.device) * last.clamp(min=0)
    below = ranks.to(torch.long)
    above = ranks.ceil().to(torch.long)
    lo = ordered.gather(-1, below)
    hi = ordered.gather(-1, above)
    out = torch.lerp(lo, hi, ranks - below).squeeze(-1)
    return out.masked_fill(last.squeeze(-1) < 0, float("nan"))


def check_finite(stat: Tensor, mask: Tensor, name: str = "statistic") -> None:
    """Raise ``ValueError`` naming the first row whose valid tokens hold a non-finite statistic."""
    bad = mask.bool() & ~torch.isfinite(stat)
    if bad.any():
        row, pos = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"non-finite {name} {stat[row, pos].item()} on a valid token (row {row}, position {pos})")


def top_fraction_mask(
    stat: Tensor,
    mask: Tensor,
    keep: float,
    scope: Scope = "per_sequence",
    *,
    group_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Keep the top ``keep`` fraction of valid tokens by ``stat`` within each unit of ``scope``.

    Returns ``(selected [B, T] bool, thresholds [units])``; units with no valid token select nothing and have a
    NaN threshold. ``stat`` is treated as detached; values at invalid positions are ignored (even NaN/inf).
    """
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be in [0, 1], got {keep}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; valid: {', '.join(SCOPES)}")
    valid = mask.bool()
    if keep >= 1.0:
        return valid.clone(), stat.new_zeros(0, dtype=working_dtype(stat))
    stat = stat.detach()
    check_finite(stat, valid)
    x = stat.to(working_dtype(stat)).masked_fill(~valid, float("nan"))
    q = 1.0 - keep
    if scope == "per_sequence":
        tau = quantile_linear(x, q, dim=1)  # [B]
        per_token_tau = tau.unsqueeze(1)
    elif scope == "global_batch":
        tau = quantile_linear(x.reshape(-1), q, dim=0).reshape(1)
        per_token_tau = tau.view(1, 1)
    else:
        if group_ids is None:
            raise ValueError("scope='per_group' needs group_ids")
        groups, inverse = torch.unique(group_ids, sorted=True, return_inverse=True)
        tau = torch.stack([quantile_linear(x[inverse == g].reshape(-1), q, dim=0) for g in range(len(groups))])
        per_token_tau = tau[inverse].unsqueeze(1)
    selected = valid & (x >= per_token_tau)  # NaN threshold (empty unit) compares False
    return selected, tau


__all__ = ["SCOPES", "Scope", "check_finite", "quantile_linear", "top_fraction_mask", "working_dtype"]
