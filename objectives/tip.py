"""TIP: token importance in on-policy distillation (``specs/tip_opd.md``).

The student samples rollouts; a frozen teacher scores every position. Each valid token gets two detached statistics,
the student entropy ``h`` (uncertainty) and the full-vocabulary reverse KL ``δ = KL(P_S‖P_T)`` (disagreement). Both
are min–max normalised over the scope ``S`` (entropy first clipped at its 0.98 quantile)::

    ĥ = (min(h, q) − min_S h̃) / (q − min_S h̃)          q = Quantile_0.98({h_t : t ∈ S}), linear interpolation
    δ̂ = (δ − min_S δ) / (max_S δ − min_S δ)             an axis that is constant over S is 0 everywhere

and a rule ranks tokens (descending; ``keep`` is the fraction kept, stable ties: lower position first):

    soft_or         s = ĥ + δ̂ − ĥ·δ̂ = 1 − (1−ĥ)(1−δ̂)     entropy_topk   ĥ
    q3_only         δ_fwd·(1 − ĥ)                        div_only       δ
    entropy_sample  k draws without replacement, P ∝ max(h, 1e-8) (Gumbel-top-k)
    bottom_soft_or  −s (sanity check: the lowest Soft-OR tokens)
    all             every valid token             quadrant_mask  tokens in the chosen entropy/divergence quadrants

Budget: ``per_sequence`` keeps ``⌊ρ·m_i + 1e-9⌋`` of rollout i's ``m_i`` valid tokens; ``global_batch`` keeps
``max(1, ⌊ρ·N + 1e-9⌋)`` of the scope's ``N``. Loss (every rule): the reverse KL averaged over the kept set,
``L = Σ_{t∈K} ω_t·δ_t / D`` with ``ω = 1`` and ``D = N_K`` (kept tokens of the optimizer step, all ranks and
micro-batches; a rank passes ``num_items = N_K / W`` and DDP's average restores ``L``, TRL's convention). With
``importance_weighting`` (entropy sampling only) ``ω_t = 1/(k·p_t)`` and ``D = N`` valid tokens. Gradient flows only
through ``δ`` on kept tokens; scores and selection are detached.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .contract import ObjectiveOutput, TokenBatch, masked_mean

RULES = ("all", "soft_or", "entropy_topk", "entropy_sample", "q3_only", "div_only", "bottom_soft_or", "quadrant_mask")
BUDGET_SCOPES = ("per_sequence", "global_batch")
NORM_SCOPES = ("global_batch", "micro_batch")
QUADRANTS = ("Q1", "Q2", "Q3", "Q4")
TEACHER_CACHES = ("kept_rows", "recompute")
DEFAULT_KEEP = 0.5
SAMPLE_FLOOR = 1e-8  # entropy_sample weight floor (authors' code): an all-zero rollout samples uniformly
BUDGET_EPS = 1e-9  # ⌊0.29·100⌋ must be 29, not 28


def _one_of(value: str, valid: Sequence[str], what: str) -> None:
    if value not in valid:
        raise ValueError(f"{what} must be one of {', '.join(valid)}; got {value!r}")


@dataclass
class TipConfig:
    """TIP selection and loss (spec §4 defaults). ``keep`` is the fraction kept (None → 0.5 for the top-k and
    sampling rules; it must stay unset for ``all`` and ``quadrant_mask``, which ignore it)."""

    rule: str = "soft_or"
    keep: float | None = None
    budget_scope: str = "per_sequence"
    norm_scope: str = "global_batch"
    entropy_clip_q: float = 0.98
    vocab_size: int | None = None
    quadrants: tuple[str, ...] = ("Q3",)
    quadrant_q: float = 0.5
    importance_weighting: bool = False
    seed: int = 0
    teacher_cache: str = "kept_rows"
    diagnostics: bool = False

    def __post_init__(self) -> None:
        _one_of(self.rule, RULES, "rule")
        _one_of(self.budget_scope, BUDGET_SCOPES, "budget_scope")
        _one_of(self.norm_scope, NORM_SCOPES, "norm_scope")
        _one_of(self.teacher_cache, TEACHER_CACHES, "teacher_cache")
        self.quadrants = tuple(self.quadrants)
        for q in self.quadrants:
            _one_of(q, QUADRANTS, "each of quadrants")
        if self.rule in ("all", "quadrant_mask") and self.keep is not None:
            raise ValueError(f"keep is ignored by rule {self.rule!r}: leave it unset")
        if self.keep is not None and not 0.0 < float(self.keep) <= 1.0:
            raise ValueError(f"keep is the fraction of tokens kept, in (0, 1]; got {self.keep}")
        if not 0.0 <= self.entropy_clip_q <= 1.0 or not 0.0 <= self.quadrant_q <= 1.0:
            raise ValueError("entropy_clip_q and quadrant_q are quantiles in [0, 1]")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.importance_weighting and self.rule != "entropy_sample":
            raise ValueError("importance_weighting applies to rule 'entropy_sample' only")
        if self.importance_weighting and self.budget_scope != "per_sequence":
            raise ValueError("importance_weighting is implemented for budget_scope 'per_sequence' (row pools) only")

    @property
    def fraction(self) -> float:
        """The kept fraction ρ (1.0 for ``all``)."""
        if self.rule == "all":
            return 1.0
        return DEFAULT_KEEP if self.keep is None else float(self.keep)

    @property
    def needs_forward_kl(self) -> bool:
        return self.rule == "q3_only"


# ---- statistics ------------------------------------------------------------------------------------------------
def linear_quantile(x: Tensor, q: float) -> float:
    """``torch.quantile(x, q)`` (linear interpolation) by sorting, so it has no 2^24-element limit; 0.0 if empty."""
    n = x.numel()
    if n == 0:
        return 0.0
    s = torch.sort(x.reshape(-1).double()).values
    p = q * (n - 1)
    lo, hi = math.floor(p), math.ceil(p)
    return float(s[lo] + (s[hi] - s[lo]) * (p - lo))


def check_finite(name: str, x: Tensor, mask: Tensor) -> None:
    """NaN or inf on a valid token is an error naming the count and the first (row, position)."""
    bad = ~torch.isfinite(x) & mask.bool()
    if bad.any():
        row, pos = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"{name} has {int(bad.sum())} non-finite value(s) on valid tokens, first at (row {row}, "
                         f"position {pos}); usually padding that reached the statistics or -inf logits")


def _entropy_scale(h: Tensor, vocab_size: int | None) -> Tensor:
    return h / math.log(vocab_size) if vocab_size else h


def _check_detached(**tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise ValueError(f"{name} must be detached: selection statistics carry no gradient (pass .detach())")


@dataclass(frozen=True)
class TipNormStats:
    """Normalisation of one scope: entropy range ``[h_lo, h_hi]`` (``h_hi`` = the clip value q), divergence range
    ``[d_lo, d_hi]``, quadrant thresholds on the normalised scale and the scope's valid-token count."""

    h_lo: float
    h_hi: float
    d_lo: float
    d_hi: float
    tau_h: float
    tau_d: float
    n_valid: int


def _normalise(x: Tensor, lo: float, hi: float) -> Tensor:
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def tip_norm_stats(student_entropy: Tensor, reverse_kl: Tensor, mask: Tensor, *, vocab_size: int | None = None,
                   entropy_clip_q: float = 0.98, quadrant_q: float = 0.5) -> TipNormStats:
    """The §3.2 normalisation over the valid tokens given (the trainer passes the gathered step)."""
    m = mask.bool()
    _check_detached(student_entropy=student_entropy, reverse_kl=reverse_kl)
    check_finite("student_entropy", student_entropy, m)
    check_finite("reverse_kl", reverse_kl, m)
    h = _entropy_scale(student_entropy[m].double(), vocab_size)
    d = reverse_kl[m].double().clamp(min=0.0)
    if h.numel() == 0:
        return TipNormStats(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)
    q = linear_quantile(h, entropy_clip_q)
    h_clip = h.clamp(max=q)
    h_lo, d_lo, d_hi = float(h_clip.min()), float(d.min()), float(d.max())
    tau_h = linear_quantile(_normalise(h_clip, h_lo, q), quadrant_q)
    tau_d = linear_quantile(_normalise(d, d_lo, d_hi), quadrant_q)
    return TipNormStats(h_lo, q, d_lo, d_hi, tau_h, tau_d, int(h.numel()))


@dataclass(frozen=True)
class TipScores:
    """``score`` ranks tokens for the rule (0 at invalid positions); ``h_hat`` / ``d_hat`` are the normalised axes."""

    score: Tensor
    h_hat: Tensor
    d_hat: Tensor
    stats: TipNormStats


def quadrant_labels(h_hat: Tensor, d_hat: Tensor, tau_h: float, tau_d: float) -> Tensor:
    """1..4 for Q1 (high h, high δ), Q2 (high h, low δ), Q3 (low h, high δ), Q4 (low, low); "high" means ≥ τ."""
    hi_h, hi_d = h_hat >= tau_h, d_hat >= tau_d
    return torch.where(hi_h, torch.where(hi_d, 1, 2), torch.where(hi_d, 3, 4))


def tip_scores(student_entropy: Tensor, reverse_kl: Tensor, mask: Tensor, *, rule: str = "soft_or",
               forward_kl: Tensor | None = None, vocab_size: int | None = None, entropy_clip_q: float = 0.98,
               stats: TipNormStats | None = None, quadrants: Sequence[str] = ("Q3",), quadrant_q: float = 0.5
               ) -> TipScores:
    """Per-token scores of ``rule`` (§3.3). ``stats`` holds the scope's normalisation (the trainer computes it on the
    gathered step); ``None`` normalises over the tensors given. Inputs must be detached."""
    _one_of(rule, RULES, "rule")
    _check_detached(student_entropy=student_entropy, reverse_kl=reverse_kl, forward_kl=forward_kl)
    if (forward_kl is None) == (rule == "q3_only"):
        raise ValueError("forward_kl is required by rule 'q3_only' and used by no other rule")
    m = mask.bool()
    if stats is None:
        stats = tip_norm_stats(student_entropy, reverse_kl, m, vocab_size=vocab_size, entropy_clip_q=entropy_clip_q,
                               quadrant_q=quadrant_q)
    else:
        check_finite("student_entropy", student_entropy, m)
        check_finite("reverse_kl", reverse_kl, m)
    h = _entropy_scale(student_entropy.double(), vocab_size)
    d = reverse_kl.double().clamp(min=0.0)
    h_hat = _normalise(h.clamp(max=stats.h_hi), stats.h_lo, stats.h_hi)
    d_hat = _normalise(d, stats.d_lo, stats.d_hi)
    if rule == "soft_or":
        score = h_hat + d_hat - h_hat * d_hat
    elif rule == "entropy_topk":
        score = h_hat
    elif rule == "entropy_sample":
        score = h.clamp(min=SAMPLE_FLOOR)
    elif rule == "q3_only":
        check_finite("forward_kl", forward_kl, m)
        score = forward_kl.double().clamp(min=0.0) * (1.0 - h_hat)
    elif rule == "div_only":
        score = d
    elif rule == "bottom_soft_or":
        score = -(h_hat + d_hat - h_hat * d_hat)
    elif rule == "quadrant_mask":
        labels = quadrant_labels(h_hat, d_hat, stats.tau_h, stats.tau_d)
        wanted = torch.tensor([int(q[1]) for q in quadrants], device=labels.device)
        score = torch.isin(labels, wanted).double()
    else:  # all
        score = torch.ones_like(h)
    zero = torch.zeros((), dtype=torch.float64, device=h.device)
    return TipScores(torch.where(m, score, zero), torch.where(m, h_hat, zero), torch.where(m, d_hat, zero), stats)


# ---- selection -------------------------------------------------------------------------------------------------
def row_budgets(mask: Tensor, keep: float) -> Tensor:
    """``k_i = ⌊ρ·m_i + 1e-9⌋`` per rollout (a one-token rollout at ρ = 0.5 keeps nothing)."""
    m = mask.bool().sum(-1).double()
    return torch.floor(keep * m + BUDGET_EPS).long()


def pool_budget(n_valid: int, keep: float) -> int:
    """``max(1, ⌊ρ·N + 1e-9⌋)`` for one pool of ``N`` valid tokens (0 when the pool is empty)."""
    return 0 if n_valid == 0 else max(1, math.floor(keep * n_valid + BUDGET_EPS))


def gumbel_noise(shape: torch.Size, generator: torch.Generator | Sequence[torch.Generator] | None,
                 device: torch.device) -> Tensor:
    """Gumbel(0, 1) noise: row-major from one generator, or row ``i`` from ``generator[i]``."""
    def uniform(n: int, g: torch.Generator | None) -> Tensor:
        return torch.rand(n, generator=g, dtype=torch.float64).clamp(min=1e-300)

    if generator is None or isinstance(generator, torch.Generator):
        u = uniform(shape.numel(), generator).reshape(shape)
    else:
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for {shape[0]} rows")
        u = torch.stack([uniform(shape[1], g) for g in generator])
    return (-torch.log(-torch.log(u))).to(device)


def _top_k_rows(key: Tensor, valid: Tensor, k: Tensor) -> Tensor:
    """Per row, the ``k[i]`` largest keys among valid positions (stable: an equal key goes to the lower position)."""
    key = key.masked_fill(~valid, float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(key.shape[-1], device=key.device).expand_as(order))
    return (rank < k[:, None]) & valid


def tip_select(scores: Tensor, mask: Tensor, keep: float = DEFAULT_KEEP, *, rule: str = "soft_or",
               budget_scope: str = "per_sequence",
               generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Tensor:
    """The kept tokens (bool ``[B, T]`` ⊆ ``mask``) of ``rule`` from ``TipScores.score``. In ``global_batch`` scope the
    rows are one pool in row-major order (the trainer passes the step's rows in global rollout order)."""
    _one_of(rule, RULES, "rule")
    _one_of(budget_scope, BUDGET_SCOPES, "budget_scope")
    valid = mask.bool()
    if rule == "all":
        return valid.clone()
    if rule == "quadrant_mask":
        return (scores > 0) & valid
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep is the fraction of tokens kept, in (0, 1]; got {keep}")
    key = scores.double()
    if rule == "entropy_sample":
        key = torch.log(scores.double().clamp(min=SAMPLE_FLOOR)) + gumbel_noise(scores.shape, generator, scores.device)
    if budget_scope == "per_sequence":
        return _top_k_rows(key, valid, row_budgets(valid, keep))
    k = pool_budget(int(valid.sum()), keep)
    flat = _top_k_rows(key.reshape(1, -1), valid.reshape(1, -1), torch.tensor([k], device=key.device))
    return flat.reshape(valid.shape)


def row_generators(seed: int, step: int, rollout_ids: Tensor) -> list[torch.Generator]:
    """One generator per rollout seeded from ``(seed, step, rollout_id)``: draws do not depend on sharding."""
    gens = []
    for rid in rollout_ids.tolist():
        g = torch.Generator()
        g.manual_seed((int(seed) * 1_000_003 + int(step)) * 1_000_033 + int(rid) & 0x7FFF_FFFF_FFFF_FFFF)
        gens.append(g)
    return gens


def importance_weights(student_entropy: Tensor, keep_mask: Tensor, mask: Tensor, keep: float,
                       vocab_size: int | None = None) -> Tensor:
    """``ω_t = 1/(k_i·p_t)`` with ``p_t = w_t / Σ_row w`` (per-rollout pools): weights of the sampled tokens."""
    valid = mask.bool()
    w = _entropy_scale(student_entropy.double(), vocab_size).clamp(min=SAMPLE_FLOOR).masked_fill(~valid, 0.0)
    p = w / w.sum(-1, keepdim=True).clamp(min=1e-300)
    k = row_budgets(valid, keep).double()[:, None]
    omega = 1.0 / (k * p).clamp(min=1e-300)
    return torch.where(keep_mask & valid, omega, torch.zeros_like(omega))


# ---- diagnostics -----------------------------------------------------------------------------------------------
def quadrant_fractions(h_hat: Tensor, d_hat: Tensor, mask: Tensor, *, keep: Tensor | None = None,
                       tau_h: float | None = None, tau_d: float | None = None, q: float = 0.5) -> dict[str, float]:
    """Shares of Q1..Q4 among valid tokens; with ``keep`` also among kept tokens and ``q3_share_kept``."""
    m = mask.bool()
    tau_h = linear_quantile(h_hat[m], q) if tau_h is None else tau_h
    tau_d = linear_quantile(d_hat[m], q) if tau_d is None else tau_d
    labels = quadrant_labels(h_hat, d_hat, tau_h, tau_d)
    n = max(1, int(m.sum()))
    out = {f"q{i}": float(((labels == i) & m).sum()) / n for i in range(1, 5)}
    if keep is not None:
        kept = keep.bool() & m
        nk = max(1, int(kept.sum()))
        for i in range(1, 5):
            out[f"kept_q{i}"] = float(((labels == i) & kept).sum()) / nk
        out["q3_share_kept"] = out["kept_q3"]
    return out


def tip_step_metrics(scores: TipScores, keep: Tensor, mask: Tensor, reverse_kl: Tensor, student_entropy: Tensor,
                     cfg: TipConfig, forward_kl: Tensor | None = None) -> dict[str, float]:
    """The §10 metrics of one scope (the trainer passes the gathered step, so they are global)."""
    m = mask.bool()
    kept = keep.bool() & m
    dropped = m & ~kept
    n, nk = int(m.sum()), int(kept.sum())
    rows_valid = m.any(-1)
    budgets = row_budgets(m, cfg.fraction)
    st = scores.stats
    out = {
        "kept_token_frac": nk / max(1, n),
        "kept_sample_frac": float(kept.any(-1).sum()) / max(1, int(rows_valid.sum())),
        "zero_budget_rollout_frac": float(((budgets == 0) & rows_valid).sum()) / max(1, int(rows_valid.sum())),
        "skipped_step": float(nk == 0),
        "entropy_clip": st.h_hi,
        "h_lo": st.h_lo,
        "d_lo": st.d_lo,
        "d_hi": st.d_hi,
        "tau_h": st.tau_h,
        "tau_d": st.tau_d,
        "h_hat_kept": masked_mean(scores.h_hat, kept),
        "h_hat_dropped": masked_mean(scores.h_hat, dropped),
        "d_hat_kept": masked_mean(scores.d_hat, kept),
        "d_hat_dropped": masked_mean(scores.d_hat, dropped),
        "rkl_kept": masked_mean(reverse_kl, kept),
        "rkl_all": masked_mean(reverse_kl, m),
        "entropy_all": masked_mean(student_entropy, m),
    }
    if cfg.rule not in ("all", "quadrant_mask", "entropy_sample"):
        cut = [float(scores.score[i][kept[i]].min()) for i in range(kept.shape[0]) if kept[i].any()]
        out["score_cut"] = sum(cut) / len(cut) if cut else 0.0
    fr = quadrant_fractions(scores.h_hat, scores.d_hat, m, keep=kept, tau_h=st.tau_h, tau_d=st.tau_d)
    out.update({f"quadrant/q{i}": fr[f"q{i}"] for i in range(1, 5)})
    out.update({f"quadrant_kept/q{i}": fr[f"kept_q{i}"] for i in range(1, 5)})
    out["q3_share_kept"] = fr["q3_share_kept"]
    if forward_kl is not None:
        out["fkl_kept"] = masked_mean(forward_kl, kept)
    return out


# ---- loss ------------------------------------------------------------------------------------------------------
def select_in_batch(batch: TokenBatch, cfg: TipConfig, step: int = 0) -> tuple[Tensor, TipScores]:
    """Score and select on the batch itself (the ``micro_batch`` scope, or a loop without a step-level pass)."""
    if batch.entropy is None or batch.reverse_kl is None:
        raise ValueError("tip_loss needs TokenBatch.entropy and TokenBatch.reverse_kl (or a precomputed keep)")
    fkl = None if batch.forward_kl is None or not cfg.needs_forward_kl else batch.forward_kl.detach()
    scores = tip_scores(batch.entropy.detach(), batch.reverse_kl.detach(), batch.mask, rule=cfg.rule,
                        forward_kl=fkl, vocab_size=cfg.vocab_size, entropy_clip_q=cfg.entropy_clip_q,
                        quadrants=cfg.quadrants, quadrant_q=cfg.quadrant_q)
    gens = None
    if cfg.rule == "entropy_sample":
        ids = batch.rollout_ids if batch.rollout_ids is not None else torch.arange(batch.mask.shape[0])
        gens = row_generators(cfg.seed, step, ids)
    keep = tip_select(scores.score, batch.mask, cfg.fraction, rule=cfg.rule, budget_scope=cfg.budget_scope,
                      generator=gens)
    return keep, scores


def tip_loss(batch: TokenBatch, cfg: TipConfig, *, step: int = 0) -> ObjectiveOutput:
    """``Σ_{t∈K} ω_t·δ_t / D`` (module docstring): one micro-batch's additive share of the step loss.

    Uses ``batch.keep`` when the trainer decided the selection on the whole step, else selects on this batch
    (``step`` then seeds entropy sampling, with the rollout ids).
    ``D = batch.num_items`` (the step's kept count ÷ world size; valid count with importance weighting), else the
    local kept (valid) count. Nothing kept: a graph-connected zero.
    """
    if batch.reverse_kl is None:
        raise ValueError("tip_loss needs TokenBatch.reverse_kl (full-vocabulary KL(P_S‖P_T) per token)")
    rkl = batch.reverse_kl
    valid = batch.mask.bool()
    metrics: dict[str, float] = {}
    if batch.keep is not None:
        keep = batch.keep.bool() & valid
    else:
        keep, scores = select_in_batch(batch, cfg, step)
        metrics = tip_step_metrics(scores, keep, valid, rkl.detach(), batch.entropy.detach(), cfg)
    if cfg.importance_weighting:
        if batch.entropy is None:
            raise ValueError("importance_weighting needs TokenBatch.entropy (the sampling weights)")
        omega = importance_weights(batch.entropy.detach(), keep, valid, cfg.fraction, cfg.vocab_size).to(rkl.dtype)
        local_d = float(valid.sum())
    else:
        omega = keep.to(rkl.dtype)
        local_d = float(keep.sum())
    denom = float(batch.num_items) if batch.num_items is not None else max(1.0, local_d)
    if not keep.any():
        loss = (rkl * 0).sum()
    else:
        loss = (torch.where(keep, rkl, torch.zeros_like(rkl)) * omega).sum() / max(denom, 1e-12)
    if cfg.importance_weighting and keep.any():
        metrics["iw_mean"] = float(omega[keep].double().mean())
        metrics["iw_max"] = float(omega[keep].double().max())
    metrics["norm_scope_exact"] = float(cfg.norm_scope == "global_batch" and batch.keep is not None)
    return ObjectiveOutput(loss=loss, token_weights=omega.detach(), sample_keep=keep.any(-1), metrics=metrics)


def tip_needs_step_selection(cfg: TipConfig, num_iterations: int = 1) -> bool:
    """The trainer decides the selection once per step unless the opt-in ``micro_batch`` normalisation is chosen."""
    return cfg.norm_scope == "global_batch"
