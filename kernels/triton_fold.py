"""Triton fold and gradient (``specs/kernels.md`` §3.2–3.4, §3.7): one program per row, online pass over V.

Used on CUDA (and on CPU under ``TRITON_INTERPRET=1`` for tests). The forward reads each row once in blocks of
``BLOCK_V`` columns and keeps the online state ``m, S, A`` (and, with a teacher, ``m_t, S_t, B_s, B_t``), merging
blocks as §3.2 prescribes: with ``d = (m − M)/T`` and ``r = e^d``, ``A ← r(A + d·S)`` (skipped while ``S = 0``),
``S ← r·S``, then add the block's terms relative to ``M``. The generalised JSD needs both normalisers, so it takes a
second pass. The backward writes ``dlogit = dz/T`` for the rows it is given; other rows are never touched.

At the hidden level the GEMM stays in cuBLAS (torch ``matmul`` into a reused fp32 tile) and these kernels fold the
tile, like TRL's design; fusing the statistics into the GEMM epilogue is the next step (``docs/roadmap.md``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .fold import ENT, FKL, JSD, KL_PM, LOGP, LOGSUM, NCOL, RKL, ROWMAX, T_LOGSUM, T_ROWMAX, Spec

NOUT = 5
NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))


@triton.jit
def _logaddexp(a, b):
    mx = tl.maximum(a, b)
    mx_safe = tl.where(mx > NEG_INF, mx, 0.0)
    return mx_safe + tl.log(tl.exp(a - mx_safe) + tl.exp(b - mx_safe))


@triton.jit
def _merge(m, s, a, x, T):
    """Merge a block of raw logits ``x`` into the online state ``(m, S, A)`` of the tempered shifted row."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    ref = tl.where(m_new > NEG_INF, m_new, 0.0)
    d = (m - ref) / T
    r = tl.exp(d)
    a = tl.where(s > 0, r * (a + d * s), 0.0)
    t = (x - ref) / T
    e = tl.exp(t)
    s = r * s + tl.sum(e, axis=0)
    a = a + tl.sum(tl.where(e > 0, e * t, 0.0), axis=0)
    return m_new, s, a, r, e


@triton.jit
def _fwd_kernel(z_ptr, z_stride, u_ptr, u_stride, rows_ptr, y_ptr, acc_ptr, V, T, beta, log_1mb, log_b,
                HAS_TEACHER: tl.constexpr, WANT_JSD: tl.constexpr, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.load(rows_ptr + pid).to(tl.int64)
    z_row = z_ptr + row * z_stride
    u_row = u_ptr + row * u_stride
    zero = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), axis=0)
    m, s, a = zero + NEG_INF, zero, zero
    mt, st, at, bs, bt = zero + NEG_INF, zero, zero, zero, zero
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inb = offs < V
        x = tl.load(z_row + offs, mask=inb, other=NEG_INF).to(tl.float32)
        m, s, a, r, e = _merge(m, s, a, x, T)
        if HAS_TEACHER:
            w = tl.load(u_row + offs, mask=inb, other=NEG_INF).to(tl.float32)
            mt, st, at, rt, et = _merge(mt, st, at, w, T)
            gap = (w - x) / T  # tempered gap u/T − z/T, independent of both maxima
            bs = r * bs + tl.sum(tl.where(e > 0, e * gap, 0.0), axis=0)
            bt = rt * bt + tl.sum(tl.where(et > 0, et * gap, 0.0), axis=0)
    m = tl.where(m > NEG_INF, m, 0.0)
    log_s = tl.log(s)
    y = tl.load(y_ptr + pid).to(tl.int64)
    zy = tl.load(z_row + y).to(tl.float32)
    out = acc_ptr + pid * 10
    tl.store(out + 0, tl.minimum((zy - m) / T - log_s, 0.0))  # exact logp ≤ 0 even if exp(0) rounds below 1
    tl.store(out + 1, tl.maximum(log_s - a / s, 0.0))
    tl.store(out + 5, m)
    tl.store(out + 6, log_s)
    if HAS_TEACHER:
        mt = tl.where(mt > NEG_INF, mt, 0.0)
        log_st = tl.log(st)
        tl.store(out + 2, -bs / s + (mt - m) / T + (log_st - log_s))
        tl.store(out + 3, bt / st + (m - mt) / T + (log_s - log_st))
        tl.store(out + 7, mt)
        tl.store(out + 8, log_st)
        if WANT_JSD:
            kqm, kpm = zero, zero
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                inb = offs < V
                lp = (tl.load(z_row + offs, mask=inb, other=NEG_INF).to(tl.float32) - m) / T - log_s
                lq = (tl.load(u_row + offs, mask=inb, other=NEG_INF).to(tl.float32) - mt) / T - log_st
                lm = _logaddexp(lp + log_1mb, lq + log_b)
                p, q = tl.exp(lp), tl.exp(lq)
                kpm += tl.sum(tl.where(p > 0, p * (lp - lm), 0.0), axis=0)
                kqm += tl.sum(tl.where(q > 0, q * (lq - lm), 0.0), axis=0)
            tl.store(out + 4, beta * kqm + (1 - beta) * kpm)
            tl.store(out + 9, kpm)


@triton.jit
def _bwd_kernel(z_ptr, z_stride, u_ptr, u_stride, rows_ptr, y_ptr, saved_ptr, g_ptr, out_ptr, out_stride, V, T,
                beta, log_1mb, log_b, HAS_TEACHER: tl.constexpr, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.load(rows_ptr + pid).to(tl.int64)
    z_row = z_ptr + row * z_stride
    u_row = u_ptr + row * u_stride
    o_row = out_ptr + row * out_stride
    sv = saved_ptr + pid * 10
    m, log_s, ent = tl.load(sv + 5), tl.load(sv + 6), tl.load(sv + 1)
    gp = g_ptr + pid * 5
    g_l, g_h = tl.load(gp + 0), tl.load(gp + 1)
    y = tl.load(y_ptr + pid).to(tl.int64)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inb = offs < V
        lp = (tl.load(z_row + offs, mask=inb, other=NEG_INF).to(tl.float32) - m) / T - log_s
        p = tl.exp(lp)
        lp = tl.maximum(lp, -1e4)  # where p underflows the term is 0 anyway; avoids 0·(−inf)
        coef = -g_l - g_h * (lp + ent)
        if HAS_TEACHER:
            lq = (tl.load(u_row + offs, mask=inb, other=NEG_INF).to(tl.float32) - tl.load(sv + 7)) / T \
                - tl.load(sv + 8)
            q = tl.exp(lq)
            lq = tl.maximum(lq, -1e4)
            coef += tl.load(gp + 2) * (lp - lq - tl.load(sv + 2))
            lm = _logaddexp(lp + log_1mb, lq + log_b)
            coef += tl.load(gp + 4) * (1 - beta) * (lp - lm - tl.load(sv + 9))
            dz = p * coef + tl.load(gp + 3) * (p - q)
        else:
            dz = p * coef
        dz += tl.where(offs == y, g_l, 0.0)
        tl.store(o_row + offs, (dz / T).to(out_ptr.dtype.element_ty), mask=inb)


def _block_v(V: int) -> int:
    return min(4096, triton.next_power_of_2(max(V, 16)))


def _beta_logs(spec: Spec) -> tuple[float, float]:
    b = spec.jsd_beta
    return math.log1p(-b), math.log(b)


def _row_index(z: Tensor, rows: Tensor | None) -> Tensor:
    return torch.arange(z.shape[0], device=z.device) if rows is None else rows


class TritonOps:
    """Same contract as ``chunked.EagerOps``; ``rows=None`` means every row of ``z`` in order."""

    name = "triton"

    @staticmethod
    def fold(z: Tensor, rows: Tensor | None, u: Tensor | None, y: Tensor, spec: Spec, acc: Tensor) -> None:
        assert acc.shape[1] == NCOL and acc.is_contiguous()
        idx = _row_index(z, rows)
        if idx.numel() == 0:
            return
        uu = z if u is None else u
        l1, lb = _beta_logs(spec)
        _fwd_kernel[(idx.numel(),)](
            z, z.stride(0), uu, uu.stride(0), idx, y.contiguous(), acc, z.shape[1], float(spec.temperature),
            float(spec.jsd_beta), l1, lb, HAS_TEACHER=u is not None, WANT_JSD="jsd" in spec.divergences,
            BLOCK_V=_block_v(z.shape[1]))

    @staticmethod
    def grad(z: Tensor, rows: Tensor | None, u: Tensor | None, y: Tensor, saved: Tensor, g: Tensor, spec: Spec,
             out: Tensor) -> None:
        idx = _row_index(z, rows)
        if idx.numel() == 0:
            return
        uu = z if u is None else u
        l1, lb = _beta_logs(spec)
        _bwd_kernel[(idx.numel(),)](
            z, z.stride(0), uu, uu.stride(0), idx, y.contiguous(), saved.contiguous(), g.contiguous(), out,
            out.stride(0), z.shape[1], float(spec.temperature), float(spec.jsd_beta), l1, lb,
            HAS_TEACHER=u is not None, BLOCK_V=_block_v(z.shape[1]))


assert tuple(range(10)) == (LOGP, ENT, RKL, FKL, JSD, ROWMAX, LOGSUM, T_ROWMAX, T_LOGSUM, KL_PM), \
    "the kernels hard-code the accumulator column layout of fold.py"
