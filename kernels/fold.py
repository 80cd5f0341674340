"""The per-row math shared by the chunked torch path (``specs/kernels.md`` §3.2–3.4).

A *tile* is a block of rows with the full vocabulary. Forward statistics use the shifted forms
``logp = (z_y − m) − log S`` and ``H = log S − A/S`` with ``m = max z``, ``S = Σ e^{z−m}``, ``A = Σ e^{z−m}(z−m)``
(after the temperature), so ``logp ≤ 0`` and ``H ≥ 0`` hold exactly. The max is subtracted *before* dividing by the
temperature: ``(z − m)/T`` keeps full precision at large logit offsets, where ``z/T − m/T`` in fp32 loses ~1e-3.

Per-row results live in one ``[n, NCOL]`` accumulator whose columns are named below; the backward needs only the
saved columns (at most 7 scalars per row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
OUTPUTS = ("logp", "entropy", *DIVERGENCES)
# column layout of the per-row accumulator: outputs first, then what the backward re-uses
LOGP, ENT, RKL, FKL, JSD, ROWMAX, LOGSUM, T_ROWMAX, T_LOGSUM, KL_PM = range(10)
NCOL = 10
SUBTILE = 32  # rows per fold: keeps the [rows, V] exp buffer in cache (1.8x faster than 512-row folds at V = 32k)
SUBTILE_ELEMS = 1 << 20  # ... and at most 4 MB fp32 per sub-tile: at V = 152k, 32-row sub-tiles fell out of cache


def subtile_rows(vocab: int) -> int:
    """Rows per cache-resident sub-tile for a vocabulary (or vocabulary tile) of ``vocab`` columns."""
    return max(1, min(SUBTILE, SUBTILE_ELEMS // max(1, vocab)))


@dataclass(frozen=True)
class Spec:
    """What to compute: temperature (student and teacher), requested divergences, JSD mixture weight."""

    temperature: float = 1.0
    divergences: tuple[str, ...] = ()
    jsd_beta: float = 0.5

    @property
    def teacher(self) -> bool:
        return bool(self.divergences)


def _shift(t: Tensor) -> Tensor:
    """Row max, with non-finite maxima (all −inf rows) replaced by 0 so the shift stays NaN-free."""
    m = t.amax(dim=1, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def fold_student(z: Tensor, y: Tensor, spec: Spec, out: Tensor, scratch: Tensor) -> None:
    """Statistics of the raw logits rows ``z`` (overwritten in place) into the accumulator rows ``out``."""
    step = subtile_rows(z.shape[1])
    for s in range(0, z.shape[0], step):
        t = z[s : s + step]
        e = scratch[: t.shape[0]]
        m = _shift(t)
        t.sub_(m)
        if spec.temperature != 1.0:
            t.div_(spec.temperature)
        torch.exp(t, out=e)
        big_s = e.sum(dim=1)
        o = out[s : s + t.shape[0]]
        target = t.gather(1, y[s : s + t.shape[0], None]).squeeze(1)
        # A = Σ e·(z − m), in place; a −inf logit gives 0·(−inf) = NaN there, which nansum counts as its true 0
        a = e.mul_(t).nansum(dim=1)
        log_s = torch.log(big_s)
        o[:, LOGP] = target - log_s
        o[:, ENT] = log_s - a / big_s
        o[:, ROWMAX] = m.squeeze(1)
        o[:, LOGSUM] = log_s


def fold_tile(z: Tensor, y: Tensor, spec: Spec, out: Tensor) -> None:
    """Partial statistics of one vocabulary tile of raw logits ``z`` (overwritten; ``y`` relative to the tile's first
    column) into ``out [r, 4]`` = (shift m_t, S_t, A_t relative to m_t, raw target logit or −inf if not in the tile).
    ``merge_tile`` combines tiles (the §3.2 online merge)."""
    step = subtile_rows(z.shape[1])
    inside = (y >= 0) & (y < z.shape[1])
    for s in range(0, z.shape[0], step):
        t, o, rows = z[s : s + step], out[s : s + step], slice(s, s + step)
        o[:, 3] = torch.where(inside[rows], t.gather(1, y[rows].clamp(0, z.shape[1] - 1)[:, None]).squeeze(1),
                              torch.full_like(o[:, 3], float("-inf")))
        m = _shift(t)
        t.sub_(m)
        if spec.temperature != 1.0:
            t.div_(spec.temperature)
        e = torch.exp(t)
        o[:, 0], o[:, 1] = m.squeeze(1), e.sum(dim=1)
        o[:, 2] = e.mul_(t).nansum(dim=1)


def merge_tile(state: Tensor, tile: Tensor, temperature: float) -> None:
    """Online merge of ``tile [r, 4]`` into ``state [r, 4]`` (same layout; start: m = −inf, S = A = 0, z_y = −inf).

    With ``M = max(m, m_t)``, ``d = (m − M)/T``: ``A ← e^d (A + d·S)``, ``S ← e^d S`` for both sides, then summed;
    a side with ``S = 0`` contributes nothing (its ``d·S`` would be −inf·0).
    """
    m, big_s, a = state[:, 0], state[:, 1], state[:, 2]
    m_t = torch.where(tile[:, 1] > 0, tile[:, 0], torch.full_like(m, float("-inf")))
    big_m = torch.maximum(m, m_t)
    ref = torch.where(torch.isfinite(big_m), big_m, torch.zeros_like(big_m))
    parts = []
    for mm, ss, aa in ((m, big_s, a), (m_t, tile[:, 1], tile[:, 2])):
        d = (mm - ref) / temperature
        r = torch.exp(d)
        parts.append((r * ss, torch.where(ss > 0, r * (aa + d * ss), torch.zeros_like(aa))))
    state[:, 0] = big_m
    state[:, 1] = parts[0][0] + parts[1][0]
    state[:, 2] = parts[0][1] + parts[1][1]
    state[:, 3] = torch.maximum(state[:, 3], tile[:, 3])


def finish_tiles(state: Tensor, temperature: float, out: Tensor) -> None:
    """Accumulator columns (logp, H, row max, log S) from a merged tile state."""
    m = torch.where(torch.isfinite(state[:, 0]), state[:, 0], torch.zeros_like(state[:, 0]))
    log_s = torch.log(state[:, 1])
    out[:, LOGP] = (state[:, 3] - m) / temperature - log_s
    out[:, ENT] = log_s - state[:, 2] / state[:, 1]
    out[:, ROWMAX], out[:, LOGSUM] = m, log_s


def _plogp_diff(p: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Σ_j p_j (a_j − b_j) with 0·anything = 0 (a probability that underflowed contributes nothing)."""
    return torch.where(p > 0, p * (a - b), torch.zeros_like(p)).sum(dim=1)


def _log_mixture(logp: Tensor, logq: Tensor, beta: float) -> Tensor:
    return torch.logaddexp(logp + math.log(1 - beta), logq + math.log(beta))


def fold_teacher(z: Tensor, u: Tensor, y: Tensor, spec: Spec, out: Tensor) -> None:
    """Student statistics plus the requested divergences to the teacher tile ``u`` (both overwritten)."""
    step = subtile_rows(z.shape[1])
    for s in range(0, z.shape[0], step):
        rows = slice(s, s + step)
        t, tu, o = z[rows], u[rows], out[rows]
        m, mt = _shift(t), _shift(tu)
        t.sub_(m).div_(spec.temperature)
        tu.sub_(mt).div_(spec.temperature)
        e = torch.exp(t)
        big_s = e.sum(dim=1)
        log_s = torch.log(big_s)
        log_st = torch.logsumexp(tu, dim=1)
        o[:, LOGP] = t.gather(1, y[rows, None]).squeeze(1) - log_s
        o[:, ENT] = log_s - e.mul_(t).nansum(dim=1) / big_s
        o[:, ROWMAX], o[:, LOGSUM] = m.squeeze(1), log_s
        o[:, T_ROWMAX], o[:, T_LOGSUM] = mt.squeeze(1), log_st
        logp, logq = t.sub_(log_s[:, None]), tu.sub_(log_st[:, None])
        p, q = torch.exp(logp), torch.exp(logq)
        if "reverse_kl" in spec.divergences:
            o[:, RKL] = _plogp_diff(p, logp, logq)
        if "forward_kl" in spec.divergences:
            o[:, FKL] = _plogp_diff(q, logq, logp)
        if "jsd" in spec.divergences:
            beta = spec.jsd_beta
            log_m = _log_mixture(logp, logq, beta)
            o[:, KL_PM] = _plogp_diff(p, logp, log_m)
            o[:, JSD] = beta * _plogp_diff(q, logq, log_m) + (1 - beta) * o[:, KL_PM]


def grad_tile(z: Tensor, u: Tensor | None, y: Tensor, saved: Tensor, g: Tensor, spec: Spec) -> Tensor:
    """Turn raw logits ``z`` (a tile of whole rows or of vocabulary columns; ``y`` relative to its first column) into
    ``dlogit`` in place, for upstream gradients ``g [r, 5]`` (columns = OUTPUTS).

    ``dz = γ_ℓ(δ_y − p) − γ_H p(log p + H) + γ_r p(log p − log q − KL(p‖q)) + γ_f (p − q)
    + γ_J (1−β) p(log p − log M − KL(p‖M))``, then ``dlogit = dz / T``.
    """
    T = spec.temperature
    logp = z.sub_(saved[:, ROWMAX, None]).div_(T).sub_(saved[:, LOGSUM, None])
    p = torch.exp(logp)
    logp.clamp_(min=-1e4)  # where p underflows to 0 (incl. −inf logits) the term is 0 anyway; avoids 0·(−inf) = NaN
    if u is None:  # student only: everything in place, one [r, V] temporary (p)
        dz = logp.add_(saved[:, ENT, None]).mul_(g[:, ENT, None]).add_(g[:, LOGP, None]).mul_(p).neg_()
    else:
        coef = (logp + saved[:, ENT, None]).mul_(-g[:, ENT, None]).sub_(g[:, LOGP, None])
        logq = u.sub_(saved[:, T_ROWMAX, None]).div_(T).sub_(saved[:, T_LOGSUM, None]).clamp_(min=-1e4)
        if g[:, RKL].any():
            coef += g[:, RKL, None] * (logp - logq - saved[:, RKL, None])
        if g[:, JSD].any():
            log_m = _log_mixture(logp, logq, spec.jsd_beta)
            coef += (g[:, JSD, None] * (1 - spec.jsd_beta)) * (logp - log_m - saved[:, KL_PM, None])
        coef.mul_(p)
        if g[:, FKL].any():
            coef += g[:, FKL, None] * (p - torch.exp(logq))
        dz = z.copy_(coef)
    # y is relative to this tile's first vocabulary column: only targets inside the tile get the δ term
    inside = ((y >= 0) & (y < dz.shape[1])).nonzero().squeeze(1)
    dz[inside, y[inside]] += g[inside, LOGP]
    if T != 1.0:
        dz.div_(T)
    return dz
