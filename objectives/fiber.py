"""FiberPO, fibration-gated policy optimisation (arXiv 2603.08239), and its domain → group → trajectory hierarchy.

Spec: ``specs/fiberpo.md``. Per valid token ``i`` of trajectory ``τ`` (``T_τ`` valid tokens), ``ℓ = logp − old_logp``:

* sign ``l = +1 if ℓ ≥ 0 else −1`` (two-valued: a three-valued sign triples the on-policy gradient);
* channel means ``P = Σ_{l=+1} ℓ / T``, ``N = −Σ_{l=−1} ℓ / T`` (``P − N`` is GSPO's log sequence ratio);
* aggregate gate ``g(x; C, k)``: ``x`` for ``|x| ≤ C``, rollback ``sign(x)(k+1)C − kx`` up to ``C* = (1 + 1/k)C``, then 0;
* base weight ``log w = Σ_levels [g(x⁺_m; C⁺_m, k_m) − g(x⁻_m; C⁻_m, k_m)]`` over residuals ``x_m = S_m − S_{m−1}`` of the
  level means (two-level FiberPO: only the trajectory, ``x = (P, N)``, ``k = T_τ``);
* fiber gate ``log r̃ = clip(ℓ − l·S^(l), ±ε) − clip(−l·S^(−l), ±ε)``;
* ``G = exp(log w + log r̃)`` (1 on padding), ``loss = −Σ_τ μ_τ Σ_t mask·G·Â`` with ``μ_τ = 1/(|Tj|·T_τ)``
  (``seq_mean_token_mean`` = TRL ``loss_type="grpo"``) or ``1/N_tok`` (``token_mean``).

No ``min`` with the raw ratio, no advantage-sign pessimism. Near on-policy (``|ℓ| ≤ min(C, ε)``) ``G = r`` exactly; at
``ℓ ≡ 0`` the gradient is the plain policy gradient, so FiberPO on-policy equals TRL's GRPO loss. ``token_weights`` is
the detached coefficient ``c = −∂loss/∂ℓ`` in per-sequence-mean units: it can be negative when ``Â > 0`` (the
restorative gradient of rollback). Upper levels are global over the optimizer step: rows of other micro-batches and
ranks enter their means through a detached :class:`FiberLevelContext`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .contract import ObjectiveOutput, TokenBatch, advantages_2d

PASS, ROLLBACK, ZEROED = 0, 1, 2
LEVEL_FIELDS = {"domain": "domain_ids", "group": "group_ids"}
AGGREGATIONS = ("seq_mean_token_mean", "token_mean")


def _gate(x: Tensor, c: float | Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``g_agg`` with its regime (0 pass, 1 rollback, 2 zeroed) and slope γ ∈ {1, −k, 0}."""
    k = torch.as_tensor(k, dtype=x.dtype, device=x.device).clamp(min=1.0)
    c = torch.as_tensor(c, dtype=x.dtype, device=x.device)
    a = x.abs()
    passing = a <= c
    c_star = (1.0 + 1.0 / k) * c
    zeroed = ~passing & (a >= c_star)
    c_fin = torch.where(torch.isfinite(c), c, torch.zeros_like(c))  # the rollback branch is unused when C = inf
    rollback = torch.sign(x.detach()) * (k + 1.0) * c_fin - k * x
    value = torch.where(passing, x, torch.where(zeroed, torch.zeros_like(x), rollback))
    regime = torch.where(passing, PASS, torch.where(zeroed, ZEROED, ROLLBACK))
    slope = torch.where(passing, torch.ones_like(a), torch.where(zeroed, torch.zeros_like(a), -k.expand_as(a)))
    return value, regime, slope.detach()


def g_agg(x: Tensor, C: float | Tensor, k: float | Tensor) -> Tensor:  # noqa: N803 - the paper's symbol
    """Aggregate gate (spec §3.2): pass ``|x| ≤ C``, rollback (slope ``−k``) up to ``(1 + 1/k)C``, then zero."""
    return _gate(x, C, torch.as_tensor(k))[0]


@dataclass
class FiberLevelContext:
    """Detached per-trajectory statistics of the step's *other* rows (other micro-batches and ranks), so that upper
    level means are global: ``P``, ``N``, ``T`` and one id tensor per level, all ``[M]``."""

    P: Tensor
    N: Tensor
    T: Tensor
    ids: tuple[Tensor, ...]


@dataclass
class FiberGateState:
    """Everything the gates decided, for the loss, the coefficients and the diagnostics."""

    gated_ratio: Tensor  # [B, T] G (1 on padding)
    log_w: Tensor  # [B]
    P: Tensor  # [B]
    N: Tensor  # [B]
    T: Tensor  # [B] valid tokens
    sign: Tensor  # [B, T] ±1
    num_clipped: Tensor  # [B, T] |n| > ε
    den_clipped: Tensor  # [B, T] |d| > ε
    regime: list[tuple[Tensor, Tensor]]  # per level (coarsest → trajectory): (pos, neg) regime [B]
    slope: list[tuple[Tensor, Tensor]]  # per level: (pos, neg) slope γ [B]
    fully_censored: Tensor  # [B]
    level_means: list[tuple[Tensor, Tensor]] = field(default_factory=list)


def _check_nested(levels: Sequence[Tensor]) -> None:
    for m in range(1, len(levels)):
        pairs = torch.unique(torch.stack([levels[m], levels[m - 1]], 1), dim=0)
        if torch.unique(pairs[:, 0]).numel() != pairs.shape[0]:
            raise ValueError(f"levels are not nested: an id of level {m} belongs to several ids of level {m - 1}")


def fiberpo_gate_state(
    log_ratio: Tensor,
    mask: Tensor,
    *,
    eps: float = 0.2,
    c_pos: float = 0.2,
    c_neg: float = 0.2,
    levels: Sequence[Tensor] = (),
    level_budgets: Sequence[tuple[float, float]] | None = None,
    context: FiberLevelContext | None = None,
) -> FiberGateState:
    """The gates of spec §3 on ``log_ratio`` [B, T] (with grad); upper-level means over these rows plus ``context``."""
    if level_budgets is not None and len(level_budgets) != len(levels):
        raise ValueError(f"level_budgets has {len(level_budgets)} pairs for {len(levels)} levels")
    valid = mask.bool()
    dt = torch.promote_types(log_ratio.dtype, torch.float32)  # rollback slopes ~ −T need ≥ fp32
    ell = torch.where(valid, log_ratio.to(dt), torch.zeros((), dtype=dt, device=log_ratio.device))
    T = valid.sum(-1).to(dt)
    t1 = T.clamp(min=1.0)
    positive = ell.detach() >= 0  # two-valued sign: ℓ = 0 belongs to the positive channel
    sign = torch.where(positive, 1.0, -1.0).to(dt)
    pos, neg = valid & positive, valid & ~positive
    P = (ell * pos).sum(-1) / t1
    N = -(ell * neg).sum(-1) / t1

    # Level means (trajectory-weighted, over trajectories with T > 0; token-count k), coarsest first.
    live = T > 0
    budgets = list(level_budgets) if level_budgets is not None else [(c_pos, c_neg)] * len(levels)
    if levels:
        _check_nested(levels)
    means: list[tuple[Tensor, Tensor, Tensor]] = []
    for m, ids in enumerate(levels):
        S_p, S_n, n_tr, k = P[live], N[live], torch.ones_like(T[live]), T[live]
        all_ids = ids[live]
        if context is not None:
            c_live = context.T > 0
            S_p = torch.cat([S_p, context.P[c_live].to(dt)])
            S_n = torch.cat([S_n, context.N[c_live].to(dt)])
            n_tr = torch.cat([n_tr, torch.ones_like(context.T[c_live], dtype=dt)])
            k = torch.cat([k, context.T[c_live].to(dt)])
            all_ids = torch.cat([all_ids, context.ids[m][c_live]])
        if all_ids.numel() == 0:  # no trajectory with a valid token anywhere: nothing to gate at this level
            zeros_b = torch.zeros_like(P)
            means.append((zeros_b, zeros_b, torch.zeros_like(T)))
            continue
        units, inverse = torch.unique(all_ids, return_inverse=True)
        zeros = torch.zeros(units.numel(), dtype=dt, device=ell.device)
        cnt = zeros.index_add(0, inverse, n_tr)
        mean_p = zeros.index_add(0, inverse, S_p) / cnt.clamp(min=1.0)
        mean_n = zeros.index_add(0, inverse, S_n) / cnt.clamp(min=1.0)
        tokens = zeros.index_add(0, inverse, k)
        row_unit = torch.searchsorted(units, ids)  # rows with T = 0 map to some unit; their gates are unused
        row_unit = row_unit.clamp(max=units.numel() - 1)
        means.append((mean_p[row_unit], mean_n[row_unit], tokens[row_unit]))
    means.append((P, N, T))  # the trajectory level

    log_w = torch.zeros_like(P)
    regime, slope = [], []
    prev_p = prev_n = None
    for m, (s_p, s_n, k) in enumerate(means):
        x_p = s_p if prev_p is None else s_p - prev_p
        x_n = s_n if prev_n is None else s_n - prev_n
        cp, cn = budgets[m] if m < len(levels) else (c_pos, c_neg)
        g_p, r_p, y_p = _gate(x_p, cp, k)
        g_n, r_n, y_n = _gate(x_n, cn, k)
        log_w = log_w + g_p - g_n
        regime.append((r_p, r_n))
        slope.append((y_p, y_n))
        prev_p, prev_n = s_p, s_n

    own = torch.where(positive, P[:, None], N[:, None])
    other = torch.where(positive, N[:, None], P[:, None])
    n = ell - sign * own  # residual against the token's own channel mean
    d = -sign * other  # −l·S^(−l): for l = +1 it is −N, for l = −1 it is +P
    log_r = torch.clamp(n, -eps, eps) - torch.clamp(d, -eps, eps)
    log_g = log_w[:, None] + log_r
    G = torch.where(valid & live[:, None], torch.exp(log_g), torch.ones_like(log_g))
    num_clipped = valid & (n.detach().abs() > eps)
    den_clipped = valid & (d.detach().abs() > eps)

    pos_any, neg_any = pos.any(-1), neg.any(-1)
    r_p, r_n = regime[-1]
    censored = live & ((r_p == ZEROED) | ~pos_any) & ((r_n == ZEROED) | ~neg_any) & (pos_any | neg_any)
    for rp_m, rn_m in regime[:-1]:
        censored &= (rp_m == ZEROED) & (rn_m == ZEROED)
    opposite_nonempty = torch.where(positive, neg_any[:, None], pos_any[:, None])
    censored &= ((num_clipped | ~valid).all(-1)) & ((den_clipped | ~valid | ~opposite_nonempty).all(-1))
    return FiberGateState(G, log_w, P, N, T, sign, num_clipped, den_clipped, regime, slope, censored,
                          [(a, b) for a, b, _ in means])


def fiberpo_gated_ratio(log_ratio: Tensor, mask: Tensor, *, eps: float = 0.2, c_pos: float = 0.2,
                        c_neg: float = 0.2, levels: Sequence[Tensor] = (),
                        level_budgets: Sequence[tuple[float, float]] | None = None) -> Tensor:
    """The gated ratio ``G`` [B, T] (spec §3.5); 1 on padding."""
    return fiberpo_gate_state(log_ratio, mask, eps=eps, c_pos=c_pos, c_neg=c_neg, levels=levels,
                              level_budgets=level_budgets).gated_ratio


def _mu(T: Tensor, loss_agg: str, n_seqs: float | None, n_tokens: float | None) -> Tensor:
    """Per-trajectory weight μ_τ of the surrogate (0 on rows without valid tokens)."""
    live = T > 0
    if loss_agg == "seq_mean_token_mean":
        n = float(live.sum()) if n_seqs is None else n_seqs
        mu = 1.0 / (max(1.0, n) * T.clamp(min=1.0))
    else:
        n = float(T.sum()) if n_tokens is None else n_tokens
        mu = torch.full_like(T, 1.0 / max(1.0, n))
    return torch.where(live, mu, torch.zeros_like(mu))


def fiberpo_token_coefficients(
    log_ratio: Tensor,
    mask: Tensor,
    advantages: Tensor,
    *,
    eps: float = 0.2,
    c_pos: float = 0.2,
    c_neg: float = 0.2,
    levels: Sequence[Tensor] = (),
    level_budgets: Sequence[tuple[float, float]] | None = None,
    loss_agg: str = "seq_mean_token_mean",
    n_seqs: float | None = None,
    n_tokens: float | None = None,
    context: FiberLevelContext | None = None,
) -> Tensor:
    """Detached ``c = −∂loss/∂ℓ`` [B, T] (spec §3.7): closed form for two levels, autograd on a leaf otherwise."""
    adv = advantages[:, None].expand_as(log_ratio) if advantages.dim() == 1 else advantages
    if levels:
        leaf = log_ratio.detach().clone().requires_grad_()
        with torch.enable_grad():
            st = fiberpo_gate_state(leaf, mask, eps=eps, c_pos=c_pos, c_neg=c_neg, levels=levels,
                                    level_budgets=level_budgets, context=context)
            mu = _mu(st.T, loss_agg, n_seqs, n_tokens)
            loss = -(mu[:, None] * mask.to(st.gated_ratio.dtype) * st.gated_ratio * adv.to(st.gated_ratio.dtype)).sum()
            (grad,) = torch.autograd.grad(loss, leaf)
        return -grad.detach()
    with torch.no_grad():
        st = fiberpo_gate_state(log_ratio.detach(), mask, eps=eps, c_pos=c_pos, c_neg=c_neg)
        return _closed_form_coefficients(st, mask, adv, _mu(st.T, loss_agg, n_seqs, n_tokens))


@torch.no_grad()
def _closed_form_coefficients(st: FiberGateState, mask: Tensor, adv: Tensor, mu: Tensor) -> Tensor:
    """``c_j = μ(a_j[|n_j| ≤ ε] + (γ^(l_j)·ΣA − U_{l_j} − V_{−l_j}) / T)`` with ``a = Â·G`` (spec §3.7, two levels)."""
    valid = mask.bool()
    G = st.gated_ratio.detach()
    a = torch.where(valid, adv.to(G.dtype) * G, torch.zeros_like(G))
    keep_n, keep_d = (~st.num_clipped).to(a.dtype), (~st.den_clipped).to(a.dtype)
    positive = st.sign > 0
    s_all = a.sum(-1, keepdim=True)

    def channel_sum(x: Tensor, chan: Tensor) -> Tensor:
        return (x * chan).sum(-1, keepdim=True)

    u_pos, u_neg = channel_sum(a * keep_n, positive), channel_sum(a * keep_n, ~positive)
    v_pos, v_neg = channel_sum(a * keep_d, positive), channel_sum(a * keep_d, ~positive)
    gamma_p, gamma_n = st.slope[-1]
    gamma = torch.where(positive, gamma_p[:, None], gamma_n[:, None])
    u_own = torch.where(positive, u_pos, u_neg)
    v_other = torch.where(positive, v_neg, v_pos)
    T = st.T.detach().clamp(min=1.0)[:, None]
    c = mu.detach()[:, None] * (a * keep_n + (gamma * s_all - u_own - v_other) / T)
    return torch.where(valid, c, torch.zeros_like(c))


@dataclass
class FiberPOConfig:
    """Knobs of FiberPO; defaults and sources: ``specs/fiberpo.md`` §4."""

    eps: float = 0.2  # fiber gate half-width in log space (authors' code)
    c_pos: float = 0.2  # base budget C⁺ of the positive drift channel
    c_neg: float = 0.2  # base budget C⁻ of the negative channel (the paper recommends C⁻ < C⁺)
    levels: list[str] = field(default_factory=list)  # upper levels, coarsest first: [] | [group] | [domain, group]
    level_budgets: list[list[float]] | None = None  # one [C⁺, C⁻] per level; None = the shared pair
    loss_agg: str = "seq_mean_token_mean"  # = TRL loss_type="grpo"; token_mean divides by the step's tokens
    log_ratio_clamp: float | None = 20.0  # |ℓ| clamp before anything else (None = off)

    def __post_init__(self) -> None:
        self.levels = list(self.levels)
        for name in ("eps", "c_pos", "c_neg"):
            v = getattr(self, name)
            if math.isnan(v) or v < 0:
                raise ValueError(f"{name} must be >= 0 (inf allowed), got {v}")
        unknown = [lv for lv in self.levels if lv not in LEVEL_FIELDS]
        if unknown:
            raise ValueError(f"unknown level(s) {unknown}; valid: {', '.join(LEVEL_FIELDS)}")
        if self.level_budgets is not None:
            self.level_budgets = [[float(x) for x in pair] for pair in self.level_budgets]
            if len(self.level_budgets) != len(self.levels) or any(len(p) != 2 for p in self.level_budgets):
                raise ValueError(f"level_budgets needs one (c_pos, c_neg) pair per level {self.levels}")
            if any(math.isnan(x) or x < 0 for p in self.level_budgets for x in p):
                raise ValueError("level_budgets must be >= 0")
        if self.loss_agg not in AGGREGATIONS:
            raise ValueError(f"loss_agg must be one of {', '.join(AGGREGATIONS)}, got {self.loss_agg!r}")
        if self.log_ratio_clamp is not None and self.log_ratio_clamp <= 0:
            raise ValueError(f"log_ratio_clamp must be > 0 or None, got {self.log_ratio_clamp}")

    @property
    def ref_coef(self) -> float:
        return 0.0  # KL terms are additive and live outside this objective


def batch_levels(batch: TokenBatch, cfg: FiberPOConfig) -> tuple[Tensor, ...]:
    """The level id tensors the config asks for; a missing one is an error, never silently dropped."""
    out = []
    for name in cfg.levels:
        ids = getattr(batch, LEVEL_FIELDS[name])
        if ids is None:
            raise ValueError(f"FiberPO level {name!r} needs TokenBatch.{LEVEL_FIELDS[name]}")
        out.append(ids)
    return tuple(out)


def _log_ratio(batch: TokenBatch, cfg: FiberPOConfig) -> tuple[Tensor, Tensor]:
    """``ℓ`` on valid tokens (0 elsewhere), clamped to ±``log_ratio_clamp``, and where the clamp acted."""
    logp = batch.logp
    old = logp.detach() if batch.old_logp is None else batch.old_logp
    valid = batch.valid
    bad = valid & ~(torch.isfinite(logp.detach()) & torch.isfinite(old))
    if bad.any():
        rows = sorted({int(r) for r in bad.nonzero()[:, 0]})
        raise ValueError(f"non-finite logp/old_logp on {int(bad.sum())} valid token(s), rows {rows[:10]}")
    ell = torch.where(valid, logp - old, torch.zeros((), dtype=logp.dtype, device=logp.device))
    if cfg.log_ratio_clamp is None:
        return ell, torch.zeros_like(valid)
    return ell.clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp), ell.detach().abs() > cfg.log_ratio_clamp


def fiberpo_loss(batch: TokenBatch, cfg: FiberPOConfig, *, context: FiberLevelContext | None = None
                 ) -> ObjectiveOutput:
    """FiberPO share of one micro-batch (module docstring); counts global when the batch carries them."""
    levels = batch_levels(batch, cfg)
    ell, clamped = _log_ratio(batch, cfg)
    kw = {"eps": cfg.eps, "c_pos": cfg.c_pos, "c_neg": cfg.c_neg, "levels": levels,
          "level_budgets": cfg.level_budgets}
    st = fiberpo_gate_state(ell, batch.mask, context=context, **kw)
    adv = advantages_2d(batch).to(st.gated_ratio.dtype)
    valid = batch.valid
    mu = _mu(st.T, cfg.loss_agg, batch.n_seqs_global, batch.n_tokens_global)
    loss = -(mu[:, None] * valid.to(adv.dtype) * st.gated_ratio * adv).sum()
    if levels:
        coef = fiberpo_token_coefficients(ell, batch.mask, adv, loss_agg=cfg.loss_agg, n_seqs=batch.n_seqs_global,
                                          n_tokens=batch.n_tokens_global, context=context, **kw)
    else:  # two levels: the closed form on the state already computed
        coef = _closed_form_coefficients(st, batch.mask, adv, mu)
    coef = torch.where(clamped, torch.zeros_like(coef), coef)  # clamped tokens get no gradient
    weights = torch.where(mu[:, None] > 0, coef / mu[:, None].clamp(min=1e-300), torch.zeros_like(coef))
    sample_keep = (st.T > 0) & (weights != 0).any(-1)
    metrics = fiber_metrics(st, ell.detach(), valid, adv.detach(), weights, cfg, sample_keep)
    if levels:
        # with levels, a non-pass base gate couples a trajectory to the other members of its group/domain; rows of
        # other micro-batches enter through the detached context, so that part of the gradient is dropped
        active = torch.zeros_like(st.T, dtype=torch.bool)
        for r_p, r_n in st.regime:
            active |= (r_p != PASS) | (r_n != PASS)
        live = st.T > 0
        has_context = context is not None and bool((context.T > 0).any())
        metrics["level_context_approx_frac"] = float((active & live).sum()) / max(1, int(live.sum())) if (
            has_context) else 0.0
    return ObjectiveOutput(loss=loss.to(batch.logp.dtype), token_weights=weights.detach().to(batch.logp.dtype),
                           sample_keep=sample_keep, metrics=metrics)


def fiberpo_step_stats(batch: TokenBatch, cfg: FiberPOConfig) -> FiberLevelContext | None:
    """Per-row ``(P, N, T, level ids)`` of ``batch`` (no grad), from which the trainer builds each micro-batch's
    :class:`FiberLevelContext` (the step's other rows). ``None`` for two-level FiberPO, which needs no other row."""
    if not cfg.levels:
        return None
    with torch.no_grad():
        st = fiberpo_gate_state(_log_ratio(batch, cfg)[0], batch.mask, eps=cfg.eps, c_pos=cfg.c_pos, c_neg=cfg.c_neg)
    return FiberLevelContext(P=st.P, N=st.N, T=st.T, ids=batch_levels(batch, cfg))


def fiber_metrics(st: FiberGateState, ell: Tensor, valid: Tensor, adv: Tensor, weights: Tensor, cfg: FiberPOConfig,
                  sample_keep: Tensor) -> dict[str, float]:
    """Diagnostics of spec §10 on this micro-batch (fractions over valid tokens / trajectories with T > 0)."""
    live = st.T > 0
    n_live, n_tok = max(1, int(live.sum())), max(1, int(valid.sum()))
    kept = valid & ~st.num_clipped

    def frac(x: Tensor, over: Tensor, n: int) -> float:
        return float((x & over).sum()) / n

    def mean(x: Tensor, over: Tensor) -> float:
        return float(x.detach()[over].double().mean()) if over.any() else 0.0

    resid = (ell - st.sign * torch.where(st.sign > 0, st.P[:, None], st.N[:, None])).abs()
    m = {
        "kept_token_frac": frac(kept, valid, n_tok),
        "kept_sample_frac": frac(sample_keep, live, n_live),
        "eps": cfg.eps, "c_pos": cfg.c_pos, "c_neg": cfg.c_neg,
        "fiber_num_clip_frac": frac(st.num_clipped, valid, n_tok),
        "fiber_den_clip_frac": frac(st.den_clipped, valid, n_tok),
        "fiber_resid_abs_kept_mean": mean(resid, kept),
        "fiber_resid_abs_dropped_mean": mean(resid, st.num_clipped),
        "abs_log_ratio_kept_mean": mean(ell.abs(), kept),
        "abs_log_ratio_dropped_mean": mean(ell.abs(), st.num_clipped),
        "traj_fully_censored_frac": frac(st.fully_censored, live, n_live),
        "restorative_token_frac": frac((weights * adv) < 0, valid, n_tok),
        "drift_pos_mean": mean(st.P.detach(), live), "drift_neg_mean": mean(st.N.detach(), live),
        "drift_pos_max": float(st.P.detach()[live].max()) if live.any() else 0.0,
        "drift_neg_max": float(st.N.detach()[live].max()) if live.any() else 0.0,
        "drift_abs_mean": mean((st.P + st.N).detach(), live), "drift_rkl_mean": mean((st.N - st.P).detach(), live),
        "log_w_mean": mean(st.log_w.detach(), live),
        "log_w_min": float(st.log_w.detach()[live].min()) if live.any() else 0.0,
        "log_w_max": float(st.log_w.detach()[live].max()) if live.any() else 0.0,
        "gated_ratio_mean": mean(st.gated_ratio.detach(), valid),
        "gated_ratio_min": float(st.gated_ratio.detach()[valid].min()) if valid.any() else 1.0,
        "gated_ratio_max": float(st.gated_ratio.detach()[valid].max()) if valid.any() else 1.0,
        "ratio_mean": mean(ell.exp(), valid), "ratio_max": float(ell.exp()[valid].max()) if valid.any() else 1.0,
        "on_policy_token_frac": frac(ell == 0, valid, n_tok),
        "n_tokens": float(valid.sum()), "n_seqs": float(live.sum()),
    }
    names = [*cfg.levels, None]
    for name, (r_p, r_n) in zip(names, st.regime, strict=True):
        prefix = "base" if name is None else f"level/{name}"
        for chan, r in (("pos", r_p), ("neg", r_n)):
            for label, code in (("pass", PASS), ("rollback", ROLLBACK), ("zeroed", ZEROED)):
                m[f"{prefix}/{chan}_{label}_frac"] = frac(r == code, live, n_live)
    r_p, r_n = st.regime[-1]
    pairs = {"G1": (r_p == PASS) & (r_n == PASS),
             "G2r": ((r_p == PASS) & (r_n == ROLLBACK)) | ((r_p == ROLLBACK) & (r_n == PASS)),
             "G2": ((r_p == PASS) & (r_n == ZEROED)) | ((r_p == ZEROED) & (r_n == PASS)),
             "G3r": (r_p == ROLLBACK) & (r_n == ROLLBACK), "G3": (r_p == ZEROED) & (r_n == ZEROED),
             "G3rz": ((r_p == ROLLBACK) & (r_n == ZEROED)) | ((r_p == ZEROED) & (r_n == ROLLBACK))}
    for k, v in pairs.items():
        m[f"regime/{k}_frac"] = frac(v, live, n_live)
    clipped_rows = (st.num_clipped & valid).sum(-1)
    m["regime/L1_frac"] = frac(clipped_rows == 0, live, n_live)
    m["regime/L3_frac"] = frac(clipped_rows == st.T, live, n_live)
    m["regime/L2_frac"] = 1.0 - m["regime/L1_frac"] - m["regime/L3_frac"] if live.any() else 0.0
    for a_name, a_sel in (("adv_pos", adv > 0), ("adv_neg", adv < 0)):
        for l_name, l_sel in (("lr_pos", st.sign > 0), ("lr_neg", st.sign < 0)):
            m[f"quadrant/{a_name}_{l_name}_frac"] = frac(a_sel & l_sel, valid, n_tok)
    return m


__all__ = [
    "FiberGateState",
    "FiberLevelContext",
    "FiberPOConfig",
    "batch_levels",
    "fiberpo_gate_state",
    "fiberpo_gated_ratio",
    "fiberpo_loss",
    "fiberpo_step_stats",
    "fiberpo_token_coefficients",
    "g_agg",
]
