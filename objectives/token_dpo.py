"""Token-level DPO: weighted margins, TDPO's per-token KL, cDPO critical tokens and T-REG (``specs/token_dpo.md``).

Per response ``y`` with mask ``m``, token weights ``a`` (detached, ≥ 0) and ``ℓ_t = log π_θ(y_t|s_t) − log π_ref(y_t|s_t)``::

    Z(y) = Σ_t m_t a_t ℓ_t                      weights multiply policy AND reference (β·ℓ_t: DPO's token reward)
    K(y) = Σ_t m_t κ_t,  κ_t = KL(π_ref‖π_θ)    TDPO only (alpha_kl > 0), unweighted; sg(K_w) with stop_grad_chosen_kl
    h    = β·[Z(y^w) − Z(y^l)] − β·alpha_kl·[K(y^l) − K̃(y^w)]
    L_pref = −log σ(h)
    L_reg  = treg_alpha · sg(σ(−h)) · (R(y^w) + R(y^l)),   R(y) = −β Σ_t m_t r̂_t log π_θ(y_t)      (T-REG)
    L_i    = e_i · (L_pref + L_reg)             e_i = the pair weight, not renormalised

``loss = Σ_i L_i / B`` over the pairs given (the trainer rescales to the step's global pair count ``N_P``). The
per-position form (the cDPO authors' code) compares the two responses offset by offset instead:
``h_t = β(m^w a^w ℓ^w − m^l a^l ℓ^l)``, ``L_i = Σ_t v_t·(−log σ(h_t))`` with ``v = m^w ∨ m^l`` and
``loss = Σ_i e_i L_i / max(1, N_U)``, ``N_U = Σ v``. All-ones weights without extra terms is TRL 1.16's sigmoid DPO
loss; a token with weight 0 gets exactly zero gradient.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .contract import ObjectiveOutput, TokenBatch

PRESETS: dict[str, dict] = {
    "dpo": {"alpha_kl": 0.0, "stop_grad_chosen_kl": False, "treg_alpha": 0.0, "per_position": False},
    "tdpo1": {"alpha_kl": 1.0, "stop_grad_chosen_kl": False, "treg_alpha": 0.0, "per_position": False},
    "tdpo2": {"alpha_kl": 0.5, "stop_grad_chosen_kl": True, "treg_alpha": 0.0, "per_position": False},
    "cdpo": {"alpha_kl": 0.0, "stop_grad_chosen_kl": False, "treg_alpha": 0.0, "per_position": False},
    "cdpo_per_position": {"alpha_kl": 0.0, "stop_grad_chosen_kl": False, "treg_alpha": 0.0, "per_position": True},
    "treg": {"alpha_kl": 0.0, "stop_grad_chosen_kl": False, "treg_alpha": 0.25, "per_position": False},
}


def token_dpo_preset(name: str) -> dict:
    """The scalar keyword arguments of a preset (spec §3.6); weights and rewards always come from data."""
    if name not in PRESETS:
        raise ValueError(f"unknown token-DPO preset {name!r}; valid: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def _acc(x: Tensor) -> torch.dtype:
    """Sums accumulate in at least fp32 (long responses in bf16 lose the margin)."""
    return torch.promote_types(x.dtype, torch.float32)


def _check_weight(name: str, w: Tensor | None, mask: Tensor, shape: torch.Size) -> None:
    if w is None:
        return
    if w.shape != shape:
        raise ValueError(f"{name} has shape {tuple(w.shape)}, expected {tuple(shape)}")
    if w.requires_grad:
        raise ValueError(f"{name} must be detached: weights are constants of the loss")
    valid = w[mask.bool()] if w.shape == mask.shape else w
    bad = ~torch.isfinite(valid) | (valid < 0)
    if bad.any():
        raise ValueError(f"{name} has {int(bad.sum())} negative or non-finite value(s) on valid positions; weights "
                         "must be finite and >= 0")


def _check_rewards(rewards: tuple[Tensor, Tensor], masks: tuple[Tensor, Tensor]) -> None:
    for side, r, m in zip(("chosen", "rejected"), rewards, masks, strict=True):
        if r.shape != m.shape:
            raise ValueError(f"treg_rewards ({side}) has shape {tuple(r.shape)}, expected {tuple(m.shape)}")
        valid = r[m.bool()]
        if not torch.isfinite(valid).all():
            raise ValueError(f"treg_rewards ({side}) has non-finite values on valid positions")
        if (valid.abs() >= 0.5).any():
            warnings.warn(f"treg_rewards ({side}) has values outside (-1/2, 1/2), which σ(·) − 1/2 cannot produce",
                          stacklevel=3)


def _masked_mean(x: Tensor, m: Tensor) -> float:
    n = int(m.sum())
    return float((x * m).sum() / n) if n else 0.0


@dataclass(frozen=True)
class _Side:
    logp: Tensor
    ref: Tensor
    mask: Tensor  # float, accumulation dtype
    weight: Tensor  # a_t · m_t

    @property
    def ratio(self) -> Tensor:
        return (self.logp - self.ref).to(self.mask.dtype)


def _side(logp: Tensor, ref: Tensor, mask: Tensor, weight: Tensor | None) -> _Side:
    m = mask.to(_acc(logp))
    a = m if weight is None else weight.to(m.dtype) * m
    return _Side(logp, ref.detach(), m, a)


def token_dpo_loss(
    policy_chosen_logps: Tensor,
    ref_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    *,
    beta: float = 0.1,
    chosen_weights: Tensor | None = None,
    rejected_weights: Tensor | None = None,
    example_weight: Tensor | None = None,
    kl_chosen: Tensor | None = None,
    kl_rejected: Tensor | None = None,
    alpha_kl: float = 0.0,
    stop_grad_chosen_kl: bool = False,
    treg_rewards: tuple[Tensor, Tensor] | None = None,
    treg_alpha: float = 0.0,
    per_position: bool = False,
) -> ObjectiveOutput:
    """The unified token-level DPO loss of the module docstring over the ``B`` pairs given (``[B, T]`` per side)."""
    B = policy_chosen_logps.shape[0]
    _check_weight("chosen_weights", chosen_weights, chosen_mask, chosen_mask.shape)
    _check_weight("rejected_weights", rejected_weights, rejected_mask, rejected_mask.shape)
    _check_weight("example_weight", example_weight, torch.ones(B, dtype=torch.bool), torch.Size([B]))
    if alpha_kl > 0 and (kl_chosen is None or kl_rejected is None):
        raise ValueError("alpha_kl > 0 (TDPO) needs kl_chosen and kl_rejected: KL(π_ref‖π_θ) per token")
    if treg_alpha > 0 and treg_rewards is None:
        raise ValueError("treg_alpha > 0 (T-REG) needs treg_rewards (chosen, rejected)")
    if per_position:
        if alpha_kl > 0 or treg_alpha > 0:
            raise ValueError("per_position=True (the cDPO authors' form) takes neither alpha_kl nor treg_alpha")
        if chosen_mask.shape != rejected_mask.shape:
            raise ValueError(f"per_position=True needs one layout for both sides, got {tuple(chosen_mask.shape)} and "
                             f"{tuple(rejected_mask.shape)}")
    if treg_rewards is not None:
        _check_rewards(treg_rewards, (chosen_mask, rejected_mask))
    w = _side(policy_chosen_logps, ref_chosen_logps, chosen_mask, chosen_weights)
    lo = _side(policy_rejected_logps, ref_rejected_logps, rejected_mask, rejected_weights)
    dtype = w.mask.dtype
    e = torch.ones(B, dtype=dtype, device=w.mask.device) if example_weight is None else example_weight.to(dtype)
    metrics: dict[str, float] = {}
    if per_position:
        h_t = beta * (w.weight * w.ratio - lo.weight * lo.ratio)
        v = torch.maximum(w.mask, lo.mask)
        per_pair = (v * -F.logsigmoid(h_t)).sum(-1)
        loss = (e * per_pair).sum() / max(1.0, float(v.sum()))
        h = h_t.sum(-1)  # metrics only
        metrics["positions"] = float(v.sum())
    else:
        z_w, z_l = (w.weight * w.ratio).sum(-1), (lo.weight * lo.ratio).sum(-1)
        h = beta * (z_w - z_l)
        if alpha_kl > 0:
            k_w = (w.mask * kl_chosen.to(dtype)).sum(-1)
            k_l = (lo.mask * kl_rejected.to(dtype)).sum(-1)
            h = h - beta * alpha_kl * (k_l - (k_w.detach() if stop_grad_chosen_kl else k_w))
            metrics.update({"kl/chosen": float(k_w.detach().mean()), "kl/rejected": float(k_l.detach().mean()),
                            "kl/margin": float((k_l - k_w).detach().mean())})
        per_pair = -F.logsigmoid(h)
        if treg_alpha > 0:
            r_w, r_l = (r.to(dtype) for r in treg_rewards)
            reg_w = -beta * (w.mask * r_w * policy_chosen_logps.to(dtype)).sum(-1)
            reg_l = -beta * (lo.mask * r_l * policy_rejected_logps.to(dtype)).sum(-1)
            scale = torch.sigmoid(-h).detach()
            reg = treg_alpha * scale * (reg_w + reg_l)
            per_pair = per_pair + reg
            metrics.update({"treg/weight": float(scale.mean()), "treg/reg": float(reg.detach().mean()),
                            "treg/reward_chosen": _masked_mean(r_w, w.mask),
                            "treg/reward_rejected": _masked_mean(r_l, lo.mask)})
        loss = (e * per_pair).sum() / max(1, B)
        metrics.update(_reward_metrics(beta, z_w, z_l, w, lo))
    metrics.update(_weight_metrics(beta, h.detach(), w, lo, e))
    T = max(w.mask.shape[1], lo.mask.shape[1])
    token_weights = torch.cat([F.pad(w.weight, (0, T - w.mask.shape[1])),
                               F.pad(lo.weight, (0, T - lo.mask.shape[1]))]).detach()
    sample_keep = (e > 0) & ((w.weight > 0).any(-1) | (lo.weight > 0).any(-1))
    return ObjectiveOutput(loss=loss, token_weights=token_weights, sample_keep=sample_keep, metrics=metrics)


def _reward_metrics(beta: float, z_w: Tensor, z_l: Tensor, w: _Side, lo: _Side) -> dict[str, float]:
    with torch.no_grad():
        u_w, u_l = beta * (w.mask * w.ratio).sum(-1), beta * (lo.mask * lo.ratio).sum(-1)
        return {"rewards/chosen": float((beta * z_w).mean()), "rewards/rejected": float((beta * z_l).mean()),
                "rewards/margins": float((beta * (z_w - z_l)).mean()),
                "rewards_unweighted/chosen": float(u_w.mean()), "rewards_unweighted/rejected": float(u_l.mean()),
                "rewards_unweighted/margins": float((u_w - u_l).mean())}


def _weight_metrics(beta: float, h: Tensor, w: _Side, lo: _Side, e: Tensor) -> dict[str, float]:
    with torch.no_grad():
        n_tokens = float(w.mask.sum() + lo.mask.sum())
        kept = float((w.weight > 0).sum() + (lo.weight > 0).sum())
        valid_l = lo.mask.bool()
        a_l = lo.weight
        token_reward = beta * lo.ratio
        high, low = valid_l & (a_l >= 0.5), valid_l & (a_l < 0.5)
        return {
            "margin_h": float(h.mean()),
            "rewards/accuracies": float((h > 0).double().mean()),
            "token_weight/chosen_mean": _masked_mean(w.weight, w.mask),
            "token_weight/rejected_mean": _masked_mean(a_l, lo.mask),
            "token_weight/rejected_frac_above_0.5": float(high.sum()) / max(1, int(valid_l.sum())),
            "example_weight/mean": float(e.mean()),
            "kept_token_frac": kept / max(1.0, n_tokens),
            "kept_sample_frac": float((e > 0).double().mean()),
            "implicit_reward/high_weight": _masked_mean(token_reward, high),
            "implicit_reward/low_weight": _masked_mean(token_reward, low),
            "empty_pairs": float(((w.mask.sum(-1) == 0) | (lo.mask.sum(-1) == 0)).sum()),
        }


# ---- where token weights and rewards come from --------------------------------------------------------------------
@dataclass(frozen=True)
class CDPOWeights:
    """``score`` s_t (the chosen-side weight when ``only_neg`` is off) and ``weight`` = 1 − s_t (the rejected side)."""

    score: Tensor
    weight: Tensor


def _cdpo(log_s: Tensor, mask: Tensor) -> CDPOWeights:
    m = mask.bool()
    s = torch.where(m, log_s.float().exp(), torch.zeros_like(log_s, dtype=torch.float32))
    return CDPOWeights(score=s, weight=torch.where(m, 1.0 - s, torch.zeros_like(s)))


@torch.no_grad()
def cdpo_token_weights(positive_logits: Tensor, negative_logits: Tensor, tokens: Tensor, mask: Tensor, *,
                       lam: float = 1.0) -> CDPOWeights:
    """cDPO's contrastive score ``s_t = softmax((1+λ)·z^p − λ·z^q)[y_t]`` from the positive and negative CE models'
    logits ``[B, T, V]`` (``logits[:, t]`` scores ``tokens[:, t]``); fp32, 0 at masked positions."""
    mixed = (1.0 + lam) * positive_logits.float() - lam * negative_logits.float()
    log_s = torch.log_softmax(mixed, -1).gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return _cdpo(log_s, mask)


@torch.no_grad()
def cdpo_token_weights_from_hidden(h_pos: Tensor, h_neg: Tensor, lm_head_weight: Tensor, lm_head_bias: Tensor | None,
                                   tokens: Tensor, mask: Tensor, *, lam: float = 1.0) -> CDPOWeights:
    """The same score without ``[N, V]`` logits when both CE models share one linear ``lm_head``:
    ``(1+λ)z^p − λz^q = W·((1+λ)h_p − λh_q) + b``, so ``log s_t`` is the kernels' target log-prob of the mixed state."""
    import kernels

    mixed = (1.0 + lam) * h_pos - lam * h_neg
    stats = kernels.token_stats(mixed, lm_head_weight, tokens.clamp(min=0), bias=lm_head_bias, mask=mask.bool())
    return _cdpo(stats.logp, mask)


def treg_token_rewards(better_logps: Tensor, worse_logps: Tensor, mask: Tensor) -> Tensor:
    """T-REG's token reward ``σ(log π(y_t|x_better) − log π(y_t|x_worse)) − ½``, 0 at masked positions."""
    r = torch.sigmoid((better_logps - worse_logps).float()) - 0.5
    return torch.where(mask.bool(), r, torch.zeros_like(r)).detach()


# ---- the registry view: TokenBatch rows [chosen; rejected] ---------------------------------------------------------
@dataclass
class TokenDPOConfig:
    """A preset plus overrides (None = the preset's value)."""

    preset: str = "dpo"
    beta: float = 0.1
    alpha_kl: float | None = None
    stop_grad_chosen_kl: bool | None = None
    treg_alpha: float | None = None
    per_position: bool | None = None

    def __post_init__(self) -> None:
        token_dpo_preset(self.preset)
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.alpha_kl is not None and self.alpha_kl < 0 or self.treg_alpha is not None and self.treg_alpha < 0:
            raise ValueError("alpha_kl and treg_alpha must be >= 0")

    def resolved(self) -> dict:
        out = token_dpo_preset(self.preset)
        for k in out:
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out


def token_dpo_batch_loss(batch: TokenBatch, cfg: TokenDPOConfig, *, token_weights: Tensor | None = None,
                         example_weight: Tensor | None = None, kl: Tensor | None = None,
                         treg_rewards: Tensor | None = None) -> ObjectiveOutput:
    """``token_dpo_loss`` on a TokenBatch whose ``2B`` rows are ``[chosen; rejected]`` (TRL's collator layout);
    ``token_weights``, ``kl`` and ``treg_rewards`` are ``[2B, T]`` in the same layout, ``example_weight`` ``[B]``."""
    if batch.ref_logp is None:
        raise ValueError("token-level DPO needs TokenBatch.ref_logp (the reference model's per-token log-probs)")
    if batch.logp.shape[0] % 2:
        raise ValueError(f"expected [chosen; rejected] rows (an even count), got {batch.logp.shape[0]}")
    B = batch.logp.shape[0] // 2

    def halves(x: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        return (None, None) if x is None else (x[:B], x[B:])

    (pc, pr), (rc, rr), (mc, mr) = halves(batch.logp), halves(batch.ref_logp), halves(batch.mask)
    wc, wr = halves(token_weights)
    kc, kr = halves(kl)
    rewards = None if treg_rewards is None else halves(treg_rewards)
    return token_dpo_loss(pc, rc, pr, rr, mc, mr, beta=cfg.beta, chosen_weights=wc, rejected_weights=wr,
                          example_weight=example_weight, kl_chosen=kc, kl_rejected=kr, treg_rewards=rewards,
                          **cfg.resolved())
