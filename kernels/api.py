"""Public API: per-token statistics from hidden states + LM head, or from logits (``specs/kernels.md`` §7).

Shapes: ``hidden [*, d]``, ``weight [V, d]`` (as ``nn.Linear`` stores it), ``targets [*]`` → outputs ``[*]``.
The kernels do not shift: pass the hidden state at position t with the token it predicts.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from . import backend, compiled
from .chunked import HiddenStats, LogitsStats
from .fold import DIVERGENCES, Spec

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenStats:
    logp: Tensor  # [*] log-prob of the target under softmax(z / T); 0 on masked rows
    entropy: Tensor  # [*] entropy of softmax(z / T) in nats; 0 on masked rows
    reverse_kl: Tensor | None = None  # KL(p‖q), student p, teacher q; None unless requested
    forward_kl: Tensor | None = None  # KL(q‖p)
    jsd: Tensor | None = None  # β·KL(q‖M) + (1−β)·KL(p‖M), mixture M = (1−β)p + βq

    def detach(self) -> TokenStats:
        return TokenStats(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).detach()
                             for f in fields(self)})


def _spec(temperature: float, divergences: Sequence[str], jsd_beta: float, has_teacher: bool) -> Spec:
    t = float(temperature)
    if not (t > 0 and t < float("inf")):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if isinstance(divergences, str):
        divergences = (divergences,)
    for name in divergences:
        if name not in DIVERGENCES:
            close = difflib.get_close_matches(name, DIVERGENCES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown divergence {name!r}{hint}; valid: {', '.join(DIVERGENCES)}")
    if divergences and not has_teacher:
        raise ValueError(f"divergences {tuple(divergences)} need a teacher (teacher_hidden/teacher_weight or "
                         "teacher_logits)")
    if has_teacher and not divergences:
        raise ValueError("a teacher was given but divergences=() — request at least one of "
                         f"{', '.join(DIVERGENCES)} (a silently ignored teacher wastes a run)")
    beta = float(jsd_beta)
    if "jsd" in divergences and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd_beta must be in (0, 1), got {jsd_beta}; for beta 0 or 1 request 'forward_kl' or "
                         "'reverse_kl' (the JSD itself tends to 0 there)")
    return Spec(t, tuple(dict.fromkeys(divergences)), beta if 0.0 < beta < 1.0 else 0.5)


def _valid_rows(targets: Tensor, mask: Tensor | None, vocab: int) -> Tensor:
    """Flat indices of valid rows; a valid row must have a target in [0, V)."""
    flat = targets.reshape(-1)
    if mask is not None and mask.numel() != flat.numel():
        raise ValueError(f"mask has {mask.numel()} elements, targets {flat.numel()}")
    valid = flat != IGNORE_INDEX if mask is None else mask.reshape(-1).bool()
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


def _result(outs: Sequence[Tensor], rows: Tensor, shape: torch.Size, spec: Spec) -> TokenStats:
    def scatter(values: Tensor) -> Tensor:
        return values.new_zeros(shape.numel()).index_copy(0, rows, values).reshape(shape)

    logp, entropy, rkl, fkl, jsd = outs
    named = {"reverse_kl": rkl, "forward_kl": fkl, "jsd": jsd}
    extra = {k: scatter(v) for k, v in named.items() if k in spec.divergences}
    return TokenStats(scatter(logp), scatter(entropy), **extra)


def _check_head(hidden: Tensor, weight: Tensor, bias: Tensor | None, who: str) -> None:
    if weight.numel() == 0 or type(weight).__name__ == "DTensor":
        raise ValueError(f"{who} weight is partitioned (0 elements: a ZeRO-3 shard, or a DTensor): gather it first "
                         "(DTensor.full_tensor() or deepspeed.zero.GatheredParameters)")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{who} hidden [*, d] and weight [V, d] disagree: {tuple(hidden.shape)} vs "
                         f"{tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{who} bias shape {tuple(bias.shape)} != [V] = [{weight.shape[0]}]")
    if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise ValueError(f"{who} hidden ({hidden.dtype}) and weight ({weight.dtype}) dtypes differ outside autocast")


def token_stats(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    grad_mask: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    divergences: Sequence[str] = (),
    jsd_beta: float = 0.5,
    chunk_size: int | None = None,
) -> TokenStats:
    """Log-prob of ``targets``, entropy and (on request) divergences to a teacher, from
    ``z = (hidden @ weightᵀ + bias) / temperature`` and ``u = (teacher_hidden @ teacher_weightᵀ + teacher_bias) / T``.

    Never materialises ``[N, V]``: extra memory is O(N) fp32 scalars plus ``[chunk, V]`` fp32 tiles.
    ``mask`` (default ``targets != -100``) picks the rows computed at all (others are 0, no gradient);
    ``grad_mask`` (bool ``[*]`` or sorted unique flat indices) picks the rows that may receive gradient — the
    backward recomputes only those rows whose upstream gradient is non-zero. A frozen head (weight without
    ``requires_grad``) skips the weight-gradient GEMM. Teacher tensors never receive gradient.
    """
    has_teacher = teacher_hidden is not None or teacher_weight is not None
    spec = _spec(temperature, divergences, jsd_beta, has_teacher)
    if chunk_size is not None and int(chunk_size) <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    _check_head(hidden, weight, bias, "student")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} != hidden leading shape {tuple(hidden.shape[:-1])}")
    th = None
    if has_teacher:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("a teacher needs both teacher_hidden and teacher_weight")
        _check_head(teacher_hidden, teacher_weight, teacher_bias, "teacher")
        if teacher_weight.shape[0] != weight.shape[0]:
            raise ValueError(f"teacher vocab {teacher_weight.shape[0]} != student vocab {weight.shape[0]}: the "
                             "tokenizers must share one vocabulary (padded vocabularies must be sliced explicitly)")
        if teacher_hidden.shape[:-1] != hidden.shape[:-1]:
            raise ValueError(f"teacher_hidden leading shape {tuple(teacher_hidden.shape[:-1])} != hidden's "
                             f"{tuple(hidden.shape[:-1])}")
    rows = _valid_rows(targets, mask, weight.shape[0])
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    if has_teacher:
        th = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, rows)
    tw = None if teacher_weight is None else teacher_weight.detach()
    tb = None if teacher_bias is None else teacher_bias.detach()
    outs = HiddenStats.apply(h, weight, bias, targets.reshape(-1)[rows], _grad_rows(grad_mask, rows, targets.numel()),
                             spec, None if chunk_size is None else int(chunk_size), backend.resolve(h), th, tw, tb)
    return _result(outs, rows, targets.shape, spec)


def token_stats_from_logits(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    divergences: Sequence[str] = (),
    jsd_beta: float = 0.5,
) -> TokenStats:
    """The same statistics from given logits ``[*, V]`` (and teacher logits, no gradient), for models whose head
    cannot be separated. One pass per row; the backward writes a dense ``dlogits`` and computes only rows with
    non-zero upstream gradient. Large no-grad inputs (N·V ≥ 2^24) use a compiled fold (``TOKENSEL_KERNELS_COMPILE``).
    """
    spec = _spec(temperature, divergences, jsd_beta, teacher_logits is not None)
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} != logits leading shape {tuple(logits.shape[:-1])}")
    flat = logits.reshape(-1, logits.shape[-1])
    t_flat = None
    if teacher_logits is not None:
        if teacher_logits.shape != logits.shape:
            raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} != logits shape "
                             f"{tuple(logits.shape)} (teacher and student must share one vocabulary)")
        t_flat = teacher_logits.detach().reshape(flat.shape)
    rows = _valid_rows(targets, mask, flat.shape[1])
    ops = backend.resolve(flat)
    fast = None
    if ops.name == "torch" and compiled.wants_compile(flat, rows.numel()):
        fast = compiled.compiled_fold()
    outs = LogitsStats.apply(flat, targets.reshape(-1), rows, spec, t_flat, ops, fast)
    return _result(outs, rows, targets.shape, spec)


def active_backend(x: Tensor) -> str:
    """The backend tensors like ``x`` go to: ``torch`` or ``triton`` (the trainer records it once per run). The
    compiled fold is a logits-level detail of ``torch`` and is not reported here."""
    ops = backend.resolve(x)
    return ops.name


def reference_token_stats(
    targets: Tensor,
    *,
    hidden: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    logits: Tensor | None = None,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    divergences: Sequence[str] = (),
    jsd_beta: float = 0.5,
) -> TokenStats:
    """Naive float64 oracle (materialises the logits): for tests and benchmarks only."""
    if logits is None:
        logits = hidden.double() @ weight.double().t() + (0 if bias is None else bias.double())
    if teacher_logits is None and teacher_hidden is not None:
        teacher_logits = (teacher_hidden.double() @ teacher_weight.double().t()
                          + (0 if teacher_bias is None else teacher_bias.double()))
    valid = (targets != IGNORE_INDEX) if mask is None else mask.bool()
    logq = torch.log_softmax(logits.double() / temperature, dim=-1)
    p = logq.exp()

    def xlogy_diff(w: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return torch.where(w > 0, w * (a - b), torch.zeros_like(w)).sum(-1)

    logp = logq.gather(-1, targets.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    entropy = -xlogy_diff(p, logq, torch.zeros_like(logq))
    extra = {}
    if divergences:
        log_t = torch.log_softmax(teacher_logits.double() / temperature, dim=-1)
        q = log_t.exp()
        if "reverse_kl" in divergences:
            extra["reverse_kl"] = xlogy_diff(p, logq, log_t)
        if "forward_kl" in divergences:
            extra["forward_kl"] = xlogy_diff(q, log_t, logq)
        if "jsd" in divergences:
            b = jsd_beta
            log_m = torch.log((1 - b) * p + b * q)
            extra["jsd"] = b * xlogy_diff(q, log_t, log_m) + (1 - b) * xlogy_diff(p, logq, log_m)
    zero = torch.zeros_like(logp)
    return TokenStats(*(torch.where(valid, v, zero) for v in (logp, entropy)),
                      **{k: torch.where(valid, v, zero) for k, v in extra.items()})
