"""Chunked torch implementation (all devices): per-token statistics without ``[N, V]`` logits.

Forward: for blocks of ``chunk`` (1024) rows, one GEMM into a reused fp32 buffer, then a fold in cache-sized
sub-tiles into per-row scalars (``fold.py``). A buffer never exceeds ``MAX_TILE_ELEMS`` = 2^25 elements (128 MB fp32):
when ``chunk·V`` would, the student-only forward splits the vocabulary into column tiles merged online, and a
forward with a teacher shrinks the row block instead. Memory never grows with N.

Backward (§3.4): only rows in ``R = grad_rows ∧ (nonzero upstream)`` are recomputed; ``dh = dlogit W``,
``dW = dlogitᵀ h`` (skipped when the head is frozen), ``db = Σ dlogit`` (only when the bias needs grad). Rows outside R
get exactly 0. Teacher tensors are constants: they never receive gradient.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from .fold import (
    NCOL,
    OUTPUTS,
    SUBTILE,
    Spec,
    finish_tiles,
    fold_student,
    fold_teacher,
    fold_tile,
    grad_tile,
    merge_tile,
    subtile_rows,
)

DEFAULT_CHUNK = 1024  # rows per GEMM on CPU: 1024-row GEMMs run ~25 % faster than 256-row ones
MAX_TILE_ELEMS = 1 << 25  # cap on chunk·V so that large vocabularies shrink the row block instead of the memory

_lock = threading.Lock()
_counts = {"rows_forward": 0, "rows_backward": 0}


def count(key: str, n: int) -> None:
    with _lock:
        _counts[key] += n


def counters() -> dict[str, int]:
    """Rows computed in forward and recomputed in backward since the last reset (process-wide)."""
    with _lock:
        return dict(_counts)


def reset_counters() -> None:
    with _lock:
        for k in _counts:
            _counts[k] = 0


def accum_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rows_per_block(chunk: int | None, vocab: int) -> int:
    if chunk is not None:
        return chunk
    return min(DEFAULT_CHUNK, max(SUBTILE, MAX_TILE_ELEMS // max(1, vocab)))


def upstream(grads: tuple[Tensor | None, ...], like: Tensor) -> Tensor:
    """Upstream gradients as ``[n, 5]`` (columns = OUTPUTS); a missing one is 0."""
    g = torch.zeros(like.shape[0], len(OUTPUTS), dtype=like.dtype, device=like.device)
    for k, gk in enumerate(grads):
        if gk is not None:
            g[:, k] = gk
    return g


def split_outputs(acc: Tensor, spec: Spec, ctx) -> tuple[Tensor, ...]:
    outs = tuple(acc[:, k].clone() for k in range(len(OUTPUTS)))
    unused = [o for name, o in zip(OUTPUTS[2:], outs[2:], strict=True) if name not in spec.divergences]
    ctx.mark_non_differentiable(*unused)
    return outs


class _Head:
    """A head in the accumulation dtype: weight (+ bias) and a reused logits buffer of ``rows × cols`` elements."""

    def __init__(self, weight: Tensor, bias: Tensor | None, acc: torch.dtype, rows: int, cols: int | None = None):
        self.w = weight.to(acc)
        self.b = None if bias is None else bias.to(acc)
        self.buf = torch.empty(rows * (cols or weight.shape[0]), dtype=acc, device=weight.device)

    def logits(self, h: Tensor, cols: slice = slice(None)) -> Tensor:
        """Raw logits of ``h`` for the vocabulary columns ``cols``, in the reused buffer (the temperature is applied
        after the max shift, in the fold)."""
        w = self.w[cols]
        z = self.buf[: h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0])
        torch.matmul(h.to(w.dtype), w.t(), out=z)
        if self.b is not None:
            z.add_(self.b[cols])
        return z


class EagerOps:
    """The torch fold/grad on ``[*, V]`` sources: ``rows=None`` means all rows of ``z`` in order (a reused GEMM
    buffer, folded in place); otherwise rows are gathered ``SUBTILE`` at a time into cache-sized buffers (a 1024-row
    gather was 1.5x slower)."""

    name = "torch"

    @staticmethod
    def fold(z: Tensor, rows: Tensor | None, u: Tensor | None, y: Tensor, spec: Spec, acc: Tensor) -> None:
        V = z.shape[1]
        if rows is None:
            if u is None:
                fold_student(z, y, spec, acc, torch.empty(min(subtile_rows(V), z.shape[0]), V, dtype=acc.dtype,
                                                         device=z.device))
            else:
                fold_teacher(z, u, y, spec, acc)
            return
        step = subtile_rows(V)
        buf = torch.empty(min(step, rows.numel()), V, dtype=acc.dtype, device=z.device)
        tbuf = None if u is None else torch.empty_like(buf)
        scratch = torch.empty_like(buf)
        for s in range(0, rows.numel(), step):
            idx, part = rows[s : s + step], slice(s, s + step)
            zt = _gather(z, idx, buf)
            if u is None:
                fold_student(zt, y[part], spec, acc[part], scratch)
            else:
                fold_teacher(zt, _gather(u, idx, tbuf), y[part], spec, acc[part])

    @staticmethod
    def grad(z: Tensor, rows: Tensor | None, u: Tensor | None, y: Tensor, saved: Tensor, g: Tensor, spec: Spec,
             out: Tensor) -> None:
        if rows is None:  # z is a recomputed GEMM buffer: turn it into dlogit in place, cache-sized rows at a time
            step = subtile_rows(z.shape[1])
            for s in range(0, z.shape[0], step):
                part = slice(s, s + step)
                grad_tile(z[part], None if u is None else u[part], y[part], saved[part], g[part], spec)
            return
        for s in range(0, rows.numel(), SUBTILE * 8):
            idx, part = rows[s : s + SUBTILE * 8], slice(s, s + SUBTILE * 8)
            ut = None if u is None else u[idx].to(saved.dtype)
            d = grad_tile(z[idx].to(saved.dtype), ut, y[part], saved[part], g[part], spec)
            out[idx] = d.to(out.dtype)


class HiddenStats(torch.autograd.Function):
    """Statistics of valid, compacted rows ``h [n, d]`` against ``weight [V, d]`` (teacher rows ``th [n, d_t]``)."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, grad_rows, spec, chunk, ops, th, tw, tb):
        acc_dtype = accum_dtype(h)
        n, V = h.shape[0], weight.shape[0]
        acc = torch.zeros(n, NCOL, dtype=acc_dtype, device=h.device)
        r_b = min(DEFAULT_CHUNK if chunk is None else chunk, max(n, 1))
        if n and ops is EagerOps and not spec.teacher and r_b * V > MAX_TILE_ELEMS:
            _forward_vocab_tiles(h, weight, bias, targets, spec, r_b, acc)
        elif n:
            block = rows_per_block(chunk, V)
            head = _Head(weight, bias, acc_dtype, min(block, n))
            teacher = _Head(tw, tb, acc_dtype, min(block, n)) if spec.teacher else None
            for s in range(0, n, block):
                part = slice(s, s + block)
                u = None if teacher is None else teacher.logits(th[part])
                ops.fold(head.logits(h[part]), None, u, targets[part], spec, acc[part])
        count("rows_forward", n)
        ctx.save_for_backward(h, weight, bias, targets, grad_rows, acc, th, tw, tb)
        ctx.spec, ctx.chunk, ctx.ops = spec, chunk, ops
        return split_outputs(acc, spec, ctx)

    @staticmethod
    def backward(ctx, *grads):
        h, weight, bias, targets, grad_rows, acc, th, tw, tb = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g = upstream(grads, acc)
        rows = (grad_rows & (g != 0).any(dim=1)).nonzero().squeeze(1)
        count("rows_backward", rows.numel())
        dh = torch.zeros(h.shape, dtype=acc.dtype, device=h.device) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc.dtype, device=h.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=acc.dtype, device=h.device) if need_b else None
        if rows.numel():
            _backward_tiles(ctx, rows, h, weight, bias, targets, acc, g, th, tw, tb, dh, dw, db)
        return (
            None if dh is None else dh.to(h.dtype),
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype),
            *([None] * 8),
        )


def _forward_vocab_tiles(h, weight, bias, targets, spec, r_b, acc) -> None:
    """Student-only forward in tiles of ``r_b`` rows × ``V_b`` columns with the online merge (large vocabularies):
    GEMMs keep 1024 rows (220-row GEMMs ran 2x slower at V = 152k) while the tile stays ≤ 2^25 elements."""
    n, V = h.shape[0], weight.shape[0]
    v_b = max(1, MAX_TILE_ELEMS // r_b)
    head = _Head(weight, bias, acc.dtype, r_b, v_b)
    inf = float("-inf")
    for r0 in range(0, n, r_b):
        part = slice(r0, r0 + r_b)
        rows = h[part]
        state = torch.tensor([inf, 0.0, 0.0, inf], dtype=acc.dtype, device=h.device).repeat(rows.shape[0], 1)
        tile = torch.empty_like(state)
        for c0 in range(0, V, v_b):
            fold_tile(head.logits(rows, slice(c0, c0 + v_b)), targets[part] - c0, spec, tile)
            merge_tile(state, tile, spec.temperature)
        finish_tiles(state, spec.temperature, acc[part])


def _backward_tiles(ctx, rows, h, weight, bias, targets, acc, g, th, tw, tb, dh, dw, db) -> None:
    """Recompute and back-propagate the rows ``rows`` in tiles of ``R_b`` rows × ``V_b`` vocabulary columns.

    Vocabulary-tile-major: each ``dW`` slice is accumulated with GEMMs of K = ``R_b`` rows (at V = 152k and
    N = 1024, row blocks of 220 full rows made the ``dW`` update bandwidth-bound and 1.2x slower). A tile needs only
    the saved per-row scalars, so no online merge is needed here.
    """
    n, V = rows.numel(), weight.shape[0]
    r_b = min(DEFAULT_CHUNK if ctx.chunk is None else ctx.chunk, n)
    v_b = min(V, max(1, MAX_TILE_ELEMS // r_b))
    head = _Head(weight, bias, acc.dtype, r_b, v_b)
    teacher = _Head(tw, tb, acc.dtype, r_b, v_b) if ctx.spec.teacher else None
    hc = h.index_select(0, rows).to(acc.dtype)
    tc = None if teacher is None else th.index_select(0, rows)
    y, saved, gr = targets[rows], acc[rows], g[rows]
    dh_c = torch.zeros_like(hc) if dh is not None else None
    for c0 in range(0, V, v_b):
        cols = slice(c0, c0 + v_b)
        for r0 in range(0, n, r_b):
            part = slice(r0, r0 + r_b)
            d = head.logits(hc[part], cols)
            u = None if teacher is None else teacher.logits(tc[part], cols)
            ctx.ops.grad(d, None, u, y[part] - c0, saved[part], gr[part], ctx.spec, d)
            if dh_c is not None:
                dh_c[part] += d @ head.w[cols]  # (addmm_ is reserved for dW: the frozen-head test spies on it)
            if dw is not None:
                dw[cols].addmm_(d.t(), hc[part])
            if db is not None:
                db[cols] += d.sum(0)
    if dh is not None:
        dh.index_copy_(0, rows, dh_c)


class LogitsStats(torch.autograd.Function):
    """Statistics of rows ``rows`` of ``logits [N, V]``; the backward writes a dense ``dlogits``.

    ``fast_fold`` (a compiled student-only fold, or None) replaces ``ops.fold`` when there is no teacher.
    """

    @staticmethod
    def forward(ctx, logits, targets, rows, spec, teacher_logits, ops, fast_fold):
        n = rows.numel()
        y = targets.index_select(0, rows)
        acc = None
        if n and fast_fold is not None and not spec.teacher:
            acc = fast_fold(logits, rows, targets, spec.temperature)
        if acc is None:
            acc = torch.zeros(n, NCOL, dtype=accum_dtype(logits), device=logits.device)
            if n:
                ops.fold(logits, rows, teacher_logits, y, spec, acc)
        count("rows_forward", n)
        ctx.save_for_backward(logits, y, rows, acc, teacher_logits)
        ctx.spec, ctx.ops = spec, ops
        return split_outputs(acc, spec, ctx)

    @staticmethod
    def backward(ctx, *grads):
        logits, y, rows, acc, teacher_logits = ctx.saved_tensors
        g = upstream(grads, acc)
        live = (g != 0).any(dim=1).nonzero().squeeze(1)
        count("rows_backward", live.numel())
        dlogits = torch.zeros_like(logits)
        if live.numel():
            ctx.ops.grad(logits, rows[live], teacher_logits, y[live], acc[live], g[live], ctx.spec, dlogits)
        return dlogits, *([None] * 6)


def _gather(x: Tensor, idx: Tensor, buf: Tensor) -> Tensor:
    z = buf[: idx.numel()]
    if x.dtype == buf.dtype:
        return torch.index_select(x, 0, idx, out=z)
    return z.copy_(x.index_select(0, idx))
