"""Public API: per-token statistics from hidden states + LM head, or from logits (``specs/kernels.md`` §7).

Shapes: ``hidden [*, d]``, ``weight [V, d]`` (as ``nn.Linear`` stores it), ``targets [*]`` → outputs ``[*]``.
The kernels do not shift: pass the hidden state at position t with the token it predicts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .chunked import DEFAULT_CHUNK, HiddenStats, LogitsStats

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenStats:
    logp: Tensor  # [*] log-prob of the target under softmax(z / T); 0 on masked rows
    entropy: Tensor  # [*] entropy of softmax(z / T) in nats; 0 on masked rows

    def detach(self) -> TokenStats:
        return TokenStats(**{f.name: getattr(self, f.name).detach() for f in fields(self)})


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (t > 0 and t < float("inf")):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return t


def _valid_rows(targets: Tensor, mask: Tensor | None, vocab: int) -> Tensor:
    """Flat indices of valid rows; a valid row must have a target in [0, V)."""
    flat = targets.reshape(-1)
    valid = flat != IGNORE_INDEX if mask is None else mask.reshape(-1).bool()
    if mask is not None and mask.numel() != flat.numel():
        raise ValueError(f"mask has {mask.numel()} elements, targets {flat.numel()}")
    bad = valid & ((flat < 0) | (flat >= vocab))
    if bad.any():
        raise ValueError(f"{int(bad.sum())} valid row(s) have a target outside [0, {vocab}) (vocab size V={vocab})")
    return valid.nonzero().squeeze(1)


def _grad_rows(grad_mask: Tensor | None, rows: Tensor, n_total: int) -> Tensor:
    """``grad_mask ∧ mask`` as a bool over the compacted valid rows."""
    if grad_mask is None:
        return torch.ones(rows.numel(), dtype=torch.bool, device=rows.device)
    if grad_mask.dtype == torch.bool:
        if grad_mask.numel() != n_total:
            raise ValueError(f"grad_mask has {grad_mask.numel()} elements, targets {n_total}")
        full = grad_mask.reshape(-1)
    else:
        idx = grad_mask.reshape(-1).to(torch.long)
        if idx.numel() and (idx.min() < 0 or idx.max() >= n_total or (idx[1:] <= idx[:-1]).any()):
            raise ValueError("grad_mask indices must be sorted, unique and in [0, N)")
        full = torch.zeros(n_total, dtype=torch.bool, device=rows.device)
        full[idx] = True
    return full[rows]


def _scatter(values: Tensor, rows: Tensor, shape: torch.Size) -> Tensor:
    out = values.new_zeros(shape.numel())
    return out.index_copy(0, rows, values).reshape(shape)


def token_stats(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    grad_mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> TokenStats:
    """Log-prob of ``targets`` and entropy under ``softmax((hidden @ weightᵀ + bias) / temperature)``.

    Never materialises ``[N, V]``: extra memory is O(N) fp32 scalars plus a ``[chunk, V]`` fp32 buffer.
    ``mask`` (default ``targets != -100``) picks the rows computed at all (others are 0, no gradient);
    ``grad_mask`` (bool ``[*]`` or sorted unique flat indices) picks the rows that may receive gradient — the
    backward recomputes only those rows whose upstream gradient is non-zero. A frozen head (weight without
    ``requires_grad``) skips the weight-gradient GEMM.
    """
    t = _check_temperature(temperature)
    chunk = DEFAULT_CHUNK if chunk_size is None else int(chunk_size)
    if chunk <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [*, d] and weight [V, d] disagree: {tuple(hidden.shape)} vs {tuple(weight.shape)}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} != hidden leading shape {tuple(hidden.shape[:-1])}")
    if weight.numel() == 0:
        raise ValueError("weight has no elements: gather a ZeRO-3 / DTensor head before calling token_stats")
    if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) dtypes differ outside autocast")
    rows = _valid_rows(targets, mask, weight.shape[0])
    flat = hidden.reshape(-1, hidden.shape[-1])
    h = flat.index_select(0, rows)
    logp, entropy = HiddenStats.apply(
        h, weight, bias, targets.reshape(-1)[rows], _grad_rows(grad_mask, rows, targets.numel()), t, chunk
    )
    return TokenStats(_scatter(logp, rows, targets.shape), _scatter(entropy, rows, targets.shape))


def token_stats_from_logits(
    logits: Tensor, targets: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None
) -> TokenStats:
    """The same statistics from given logits ``[*, V]``, for models whose head cannot be separated.

    One chunked pass; the backward writes a dense ``dlogits`` and computes only rows with non-zero upstream.
    """
    t = _check_temperature(temperature)
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} != logits leading shape {tuple(logits.shape[:-1])}")
    flat = logits.reshape(-1, logits.shape[-1])
    rows = _valid_rows(targets, mask, flat.shape[1])
    logp, entropy = LogitsStats.apply(flat, targets.reshape(-1), rows, t)
    return TokenStats(_scatter(logp, rows, targets.shape), _scatter(entropy, rows, targets.shape))


def reference_token_stats(
    targets: Tensor,
    *,
    hidden: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    logits: Tensor | None = None,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> TokenStats:
    """Naive float64 oracle (materialises the logits): for tests and benchmarks only."""
    if logits is None:
        logits = hidden.double() @ weight.double().t() + (0 if bias is None else bias.double())
    z = logits.double() / temperature
    valid = (targets != IGNORE_INDEX) if mask is None else mask.bool()
    logq = torch.log_softmax(z, dim=-1)
    logp = logq.gather(-1, targets.clamp(0, z.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    entropy = -(logq.exp() * torch.where(logq.isfinite(), logq, torch.zeros_like(logq))).sum(-1)
    zero = torch.zeros_like(logp)
    return TokenStats(torch.where(valid, logp, zero), torch.where(valid, entropy, zero))
