"""The objective contract: what every objective receives and returns.

An objective is a pure function of tensors. The training loop (our TRL adapter, or verl, OpenRLHF, a notebook)
fills a :class:`TokenBatch` and calls the objective; it gets back an :class:`ObjectiveOutput`.

Shapes: ``B`` rows (completions), ``T`` completion positions. ``mask`` marks valid completion tokens; padding is
never selected, never counted in a statistic and never part of a denominator.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from torch import Tensor

ROW_FIELDS = frozenset({"group_ids", "domain_ids", "rollout_ids", "sample_keep", "band_lo", "band_hi"})


@dataclass
class TokenBatch:
    """Per-token statistics of one micro-batch, plus what was decided once for the whole optimizer step.

    Row tensors (``[B]`` / ``[B, T]``) are sliced with the batch; the ``*_global`` counts are not: they describe
    the whole optimizer step (all ranks, all micro-batches) so that every micro-batch returns its additive share
    of the step loss.
    """

    logp: Tensor  # [B, T] log-prob of the sampled token under the current policy (carries the gradient)
    mask: Tensor  # [B, T] 1 for valid completion tokens
    advantages: Tensor | None = None  # [B] or [B, T]
    old_logp: Tensor | None = None  # [B, T] behaviour policy; None -> logp.detach() (single PPO epoch)
    ref_logp: Tensor | None = None  # [B, T] reference policy, for KL terms
    entropy: Tensor | None = None  # [B, T] current-policy entropy (grad where a term acts on it)
    old_entropy: Tensor | None = None  # [B, T] detached entropy used for selection
    group_ids: Tensor | None = None  # [B] prompt group of each row
    domain_ids: Tensor | None = None  # [B]
    rollout_ids: Tensor | None = None  # [B] global row index, for tie-breaking identical on every rank
    progress: float = 0.0  # 0..1 through training, for schedules
    # Selections decided once per optimizer step (survive TRL's shuffling and slicing).
    keep: Tensor | None = None  # [B, T] bool
    sample_keep: Tensor | None = None  # [B] bool
    band_lo: Tensor | None = None  # [B] entropy-band lower edge (entropy_band)
    band_hi: Tensor | None = None  # [B] entropy-band upper edge (entropy_band)
    # Global counts of the optimizer step; None -> counted on this batch (exact only if it is the step).
    n_seqs_global: float | None = None
    n_tokens_global: float | None = None
    n_keep_global: float | None = None  # selected tokens of the step (the KL denominator of entropy_band)
    # Distillation (TIP): full-vocabulary divergences to the teacher, and TRL's per-rank loss denominator.
    reverse_kl: Tensor | None = None  # [B, T] KL(P_student‖P_teacher) per token (carries the gradient)
    forward_kl: Tensor | None = None  # [B, T] KL(P_teacher‖P_student), detached (q3_only scoring)
    num_items: float | None = None  # kept tokens of the step ÷ world size (TRL's num_items_in_batch convention)

    def __post_init__(self) -> None:
        if self.logp.dim() != 2:
            raise ValueError(f"TokenBatch.logp must be [B, T], got shape {tuple(self.logp.shape)}")
        shape = self.logp.shape
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in {"logp", "advantages"} or not isinstance(value, Tensor):
                continue
            expected = shape[:1] if f.name in ROW_FIELDS else shape
            if value.shape != expected:
                raise ValueError(f"TokenBatch.{f.name} has shape {tuple(value.shape)}, expected {tuple(expected)}")
        if self.advantages is not None and self.advantages.shape not in (shape[:1], shape):
            raise ValueError(
                f"TokenBatch.advantages has shape {tuple(self.advantages.shape)}, expected [B]={shape[0]} or [B, T]"
            )

    @property
    def valid(self) -> Tensor:
        """Boolean view of ``mask``."""
        return self.mask.bool()

    def seq_count(self) -> float:
        """Rows in the optimizer step (global when known)."""
        return float(self.n_seqs_global) if self.n_seqs_global is not None else float(self.logp.shape[0])

    def token_count(self) -> float:
        """Valid tokens in the optimizer step (global when known)."""
        if self.n_tokens_global is not None:
            return float(self.n_tokens_global)
        return float(self.mask.sum().item())


@dataclass
class ObjectiveOutput:
    """What an objective returns for one micro-batch.

    ``loss`` is this micro-batch's additive share of the step loss (summing the shares of all micro-batches and
    ranks gives the loss of the whole step). ``token_weights`` is 0 where a token gets no gradient.
    """

    loss: Tensor
    token_weights: Tensor
    sample_keep: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class StepSelection:
    """What an objective decides once per optimizer step, on the whole (gathered) step.

    ``rows`` are TokenBatch row fields (``keep``, ``sample_keep``, ``band_lo`` ...) over the step's rows in global
    order; the trainer slices them with each micro-batch. ``counts`` are TokenBatch ``*_global`` fields.
    ``metrics`` are step-level diagnostics, logged once per step.
    """

    rows: dict[str, Tensor]
    counts: dict[str, float]
    metrics: dict[str, float] = field(default_factory=dict)


def advantages_2d(batch: TokenBatch) -> Tensor:
    """Advantages broadcast to ``[B, T]`` (a ``[B]`` advantage applies to every token of its row)."""
    if batch.advantages is None:
        raise ValueError("this objective needs TokenBatch.advantages")
    adv = batch.advantages
    return adv.unsqueeze(1).expand_as(batch.logp) if adv.dim() == 1 else adv


def masked_mean(x: Tensor, m: Tensor) -> float:
    """Mean of ``x`` over ``m`` (0.0 when empty), as a Python float for metrics."""
    m = m.bool()
    n = int(m.sum().item())
    return float(x[m].double().mean().item()) if n else 0.0


def row_advantages(batch: TokenBatch) -> Tensor:
    """One advantage per row: ``[B]`` as is, ``[B, T]`` as the masked row mean."""
    if batch.advantages is None:
        raise ValueError("this objective needs TokenBatch.advantages")
    adv = batch.advantages
    if adv.dim() == 1:
        return adv
    m = batch.mask.to(adv.dtype)
    return (adv * m).sum(-1) / m.sum(-1).clamp(min=1.0)


__all__ = ["ObjectiveOutput", "StepSelection", "TokenBatch", "advantages_2d", "masked_mean", "row_advantages"]
