"""TRL adapter: a ``DPOTrainer`` whose loss is ``objectives.token_dpo`` with weights and rewards from the data.

TRL 1.16 internals we rely on (``tests/test_trl_internals.py``):

* ``DPOTrainer._prepare_dataset`` tokenizes into ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` (EOS appended to
  non-conversational data; the completion starts at the common token prefix) and keeps the other columns;
* ``DataCollatorForPreference`` stacks ``[chosen; rejected]`` rows (``input_ids``, ``attention_mask``,
  ``completion_mask``), truncates with ``max_length`` / ``truncation_mode`` and right-pads;
* ``DPOTrainer._compute_loss(model, inputs, return_outputs)`` — replaced here.

Optional dataset columns (validated once, after tokenization; a mismatch names the row, the column and both
lengths): ``weight`` (pair weight ≥ 0), ``chosen_token_weights`` / ``rejected_token_weights`` (one value ≥ 0 per
completion token, EOS included), ``chosen_token_rewards`` / ``rejected_token_rewards`` (T-REG). The collator lays them
out like ``completion_mask`` (prompt 0, same truncation, right-padded, shifted like the labels).

The loss pass runs each model's backbone once and ``kernels.token_stats`` on its last hidden states: the policy's
per-token log-probs (with grad) and, for TDPO, ``κ_t = KL(π_ref‖π_θ)`` over the full vocabulary in the same pass (the
reference in the teacher slot, ``forward_kl``); the reference's log-probs come from a no-grad pass. The loss uses the
step's global pair count: ``_get_num_items_in_batch`` counts the pairs (per-position form: the valid positions) of all
micro-batches and ranks, and each micro-batch returns ``Σ_local L_i · W / N_P`` (already scaled for accumulation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl import DPOTrainer
from trl.models.utils import _ForwardRedirection
from trl.trainer.dpo_trainer import DataCollatorForPreference

import kernels
from objectives import Objective, TokenBatch

from .distributed import full_copy
from .stats_head import call_as_forward

WEIGHT_COLUMNS = ("chosen_token_weights", "rejected_token_weights")
REWARD_COLUMNS = ("chosen_token_rewards", "rejected_token_rewards")
TOKEN_COLUMNS = WEIGHT_COLUMNS + REWARD_COLUMNS


class TokenWeightError(ValueError):
    """A weight or reward column that does not fit its row."""


def validate_columns(dataset, name: str = "train") -> None:
    """Every token column has one finite value per tokenized completion token (weights ≥ 0); ``weight`` is ≥ 0."""
    cols = [c for c in (*TOKEN_COLUMNS, "weight") if c in dataset.column_names]
    if not cols:
        return
    for i, row in enumerate(dataset.select_columns([*cols, "chosen_ids", "rejected_ids"])):
        for col in cols:
            value = row[col]
            if col == "weight":
                if value is None or not (float(value) >= 0) or value == float("inf"):
                    raise TokenWeightError(f"{name} row {i}: column 'weight' must be a finite number >= 0, got {value}")
                continue
            side = col.split("_")[0]
            ids = row[f"{side}_ids"]
            if value is None or len(value) != len(ids):
                got = "missing" if value is None else f"{len(value)} values"
                raise TokenWeightError(
                    f"{name} row {i}: column '{col}' has {got} but the tokenized {side} completion has {len(ids)} "
                    "tokens (EOS included; the completion starts at the common token prefix of prompt and "
                    "prompt+completion). Nothing is truncated or padded silently: write one value per token")
            t = torch.tensor(value, dtype=torch.float64)
            if not torch.isfinite(t).all() or (col in WEIGHT_COLUMNS and (t < 0).any()):
                raise TokenWeightError(f"{name} row {i}: column '{col}' must hold finite values"
                                       + (" >= 0" if col in WEIGHT_COLUMNS else ""))


@dataclass
class TokenColumnCollator:
    """TRL's preference collator plus the token columns, laid out like the *shifted* ``completion_mask``."""

    base: DataCollatorForPreference

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = self.base(examples)
        length = out["input_ids"].shape[1]
        for col in TOKEN_COLUMNS:
            if col not in examples[0]:
                continue
            side = col.split("_")[0]
            rows = [[0.0] * len(e["prompt_ids"]) + list(e[col]) for e in examples]
            if self.base.max_length is not None:
                sl = slice(None, self.base.max_length) if self.base.truncation_mode == "keep_start" else \
                    slice(-self.base.max_length, None)
                rows = [r[sl] for r in rows]
            dense = torch.zeros(len(rows), length, dtype=torch.float32)
            for i, r in enumerate(rows):
                dense[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
            out[f"{side}_{col.split('_', 1)[1]}"] = dense[:, 1:]  # shifted like the labels
        if "weight" in examples[0]:
            out["pair_weight"] = torch.tensor([float(e["weight"]) for e in examples], dtype=torch.float32)
        return out


class TokenDPOTrainer(DPOTrainer):
    """``DPOTrainer`` + ``objectives.token_dpo`` (module docstring)."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args, objective: Objective, **kwargs) -> None:
        targs = kwargs.get("args")
        if targs is None:
            raise ValueError("TokenDPOTrainer needs args= (a trl.DPOConfig)")
        self.objective = objective
        self.settings = objective.config.resolved()
        _check_args(targs, self.settings)
        if targs.beta != objective.config.beta:
            raise ValueError(f"DPOConfig.beta {targs.beta} != objective beta {objective.config.beta}: set one value")
        super().__init__(*args, **kwargs)
        self._forward_redirection = _ForwardRedirection()
        self.data_collator = TokenColumnCollator(self.data_collator)
        for name, ds in (("train", self.train_dataset), ("eval", self.eval_dataset)):
            if ds is not None and hasattr(ds, "column_names"):
                validate_columns(ds, name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *TOKEN_COLUMNS, "weight"]))

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """The step's pair count (per-position form: positions valid on either side), all micro-batches and ranks."""
        if self.settings["per_position"]:
            local = sum(_union_positions(b["completion_mask"]).sum() for b in batch_samples)
        else:
            local = sum(b["input_ids"].shape[0] // 2 for b in batch_samples)
        total = torch.tensor(float(local), device=device)
        return self.accelerator.reduce(total, reduction="sum") if self.accelerator.num_processes > 1 else total

    def _per_token(self, model, inputs, with_kl: bool):
        """(policy logp, reference logp, κ or None), ``[2B, L−1]``: backbones once each, statistics by the kernels."""
        ids, attn = inputs["input_ids"], inputs["attention_mask"]
        mask = inputs["completion_mask"][:, 1:].bool()
        targets = ids[:, 1:]
        unwrapped = self.accelerator.unwrap_model(model)
        if self.ref_model is None:
            raise ValueError("token-level DPO needs an explicit reference model (ref_model=...)")
        ref_unwrapped = self.accelerator.unwrap_model(self.ref_model)
        ref_head = ref_unwrapped.get_output_embeddings()
        ref_weight = full_copy(ref_head.weight)  # ZeRO-3: gathered once, needed again by the KL's backward
        ref_bias = None if ref_head.bias is None else full_copy(ref_head.bias)
        with torch.no_grad():
            h_ref = _backbone(ref_unwrapped, ids, attn)
            ref_logp = kernels.token_stats(h_ref[:, :-1], ref_weight, targets, bias=ref_bias, mask=mask).logp
        # through the DDP/ZeRO wrapper's forward, so that gradient synchronisation is set up for the backward
        h = self._forward_redirection(model, unwrapped, _backbone, unwrapped, ids, attn)
        head = unwrapped.get_output_embeddings()
        kw = {}
        if with_kl:
            kw = {"teacher_hidden": h_ref[:, :-1], "teacher_weight": ref_weight, "teacher_bias": ref_bias,
                  "divergences": ("forward_kl",)}

        def stats(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            st = kernels.token_stats(hidden, head.weight, targets, bias=head.bias, mask=mask, **kw)
            return st.logp, st.forward_kl

        # as the head's forward: ZeRO-3 gathers lm_head.weight around it and again for the backward
        logp, kl = call_as_forward(head, stats, h[:, :-1])
        return logp, ref_logp, kl

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        mask = inputs["completion_mask"][:, 1:].bool()
        logp, ref_logp, kl = self._per_token(model, inputs, self.settings["alpha_kl"] > 0)
        weights = _stack(inputs.get("chosen_token_weights"), inputs.get("rejected_token_weights"))
        rewards = _stack(inputs.get("chosen_token_rewards"), inputs.get("rejected_token_rewards"))
        out = self.objective(TokenBatch(logp=logp, mask=mask, ref_logp=ref_logp), token_weights=weights,
                             example_weight=inputs.get("pair_weight"), kl=kl,
                             treg_rewards=rewards if self.settings["treg_alpha"] > 0 else None)
        loss = out.loss * self._global_scale(inputs, mask)
        keys = sorted(out.metrics)
        local = torch.tensor([out.metrics[k] for k in keys], dtype=torch.float64, device=loss.device)
        mean = self.accelerator.gather(local.reshape(1, -1)).mean(0)
        for k, v in zip(keys, mean.tolist(), strict=True):
            self._metrics[mode][f"objective/{self.objective.name}/{k}"].append(v)
        return (loss, None) if return_outputs else loss

    def _global_scale(self, inputs, mask: torch.Tensor) -> float:
        """``local denominator · W / global denominator`` in training; 1 (the local mean) in evaluation."""
        n_global = getattr(self, "_num_items", None)
        if not self.model.training or n_global is None:
            return 1.0
        if self.settings["per_position"]:
            local = float(_union_positions(inputs["completion_mask"]).sum().clamp(min=1))
        else:
            local = float(mask.shape[0] // 2)
        return global_scale(local, self.accelerator.num_processes, float(n_global))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._num_items = num_items_in_batch
        return self._compute_loss(model, inputs, return_outputs)

    @property
    def kernels_backend(self) -> str:
        return kernels.active_backend(self.model.get_output_embeddings().weight)


def global_scale(local: float, world: int, n_global: float) -> float:
    """Turns the objective's local mean (over ``local`` pairs or positions) into this micro-batch's share of the
    step loss under DDP's gradient average over ``world`` ranks: ``local · W / N``."""
    return local * world / max(1.0, n_global)


def _backbone(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states (the LM head is applied by the kernels)."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def _union_positions(completion_mask: torch.Tensor) -> torch.Tensor:
    chosen, rejected = completion_mask[:, 1:].bool().chunk(2, dim=0)
    return chosen | rejected


def _stack(chosen: torch.Tensor | None, rejected: torch.Tensor | None) -> torch.Tensor | None:
    """``[chosen; rejected]`` rows; a missing side is all ones (weights) — both missing: None."""
    if chosen is None and rejected is None:
        return None
    like = chosen if chosen is not None else rejected
    chosen = torch.ones_like(like) if chosen is None else chosen
    rejected = torch.ones_like(like) if rejected is None else rejected
    return torch.cat([chosen, rejected])


def _check_args(args, settings: dict) -> None:
    problems = []
    if list(args.loss_type) != ["sigmoid"]:
        problems.append(f"loss_type must be ['sigmoid'] (token-level DPO generalises it), got {args.loss_type}")
    if args.f_divergence_type != "reverse_kl":
        problems.append(f"f_divergence_type must be reverse_kl, got {args.f_divergence_type!r}")
    if args.use_weighting:
        problems.append("use_weighting is TRL's own weighting; use the dataset's weight columns instead")
    if args.ld_alpha is not None:
        problems.append("ld_alpha is not supported: write LD-DPO's weights as token weight columns")
    if args.precompute_ref_log_probs:
        problems.append("precompute_ref_log_probs stores sequence sums; token-level DPO needs per-token reference "
                        "log-probs (and TDPO the full reference distribution)")
    if problems:
        raise ValueError("TokenDPOTrainer: " + "; ".join(problems))
