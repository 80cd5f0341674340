"""TRL adapter: a ``GRPOTrainer`` whose loss is a tokensel objective.

TRL 1.16 internals we rely on (``tests/test_trl_internals.py`` fails loudly if they move):

* ``GRPOTrainer._generate_and_score_completions(inputs) -> dict`` — rollout + reward + advantages for the local
  slice of the generation batch; rows of one prompt are ``num_generations`` consecutive rows of the *gathered*
  batch, and the local slice starts at ``process_index * local_rows``.
* ``GRPOTrainer._compute_loss(model, inputs)`` — returns the loss already scaled for gradient accumulation
  (``loss_is_scaled_for_ga = True``); the keys ``prompt_ids``, ``prompt_mask``, ``completion_ids``,
  ``completion_mask``, optional ``tool_mask``, ``advantages``, ``old_per_token_logps``, ``ref_per_token_logps``.
* ``GRPOTrainer._get_per_token_logps_and_entropies(...)`` — fused LM-head log-probs and entropies.
* 0-dim tensors in the generation batch survive ``shuffle_sequence_dict`` / ``split_tensor_dict`` unchanged, so
  step-level counts travel with every micro-batch.

Statistics: when the model's head is plain (no soft-capping / logit scaling), log-probs and entropies come from
``kernels.token_stats`` through ``trainer/stats_head.py`` instead of TRL's fused head, so the head's backward runs
only on tokens with non-zero weight (``kernels/backward_row_fraction`` in the logs). Other heads use TRL's path.

What we add, once per generation batch (= optimizer step), in this order (DESIGN: reward → selection → statistics):

1. ``group_ids`` / ``rollout_ids`` per row; rows every reward function calls unscorable get a zero mask;
2. the objective's rollout down-sampling (``Entry.sample_select``, D³S) on the gathered advantages; dropped rows
   leave this rank's batch (padded with zero-mask rows to a multiple of ``steps_per_generation``);
3. step-level global counts (``n_seqs_global``, ``n_tokens_global``);
4. when needed, a no-grad statistics pass and the objective's step selection (``Entry.select``) on the gathered
   step, whose row decisions (``keep``, ``sample_keep``, ``band_lo`` ...) and counts travel with every micro-batch;

and the objective's metrics under ``objective/<name>/...`` (step-level ones logged once per step).
"""

from __future__ import annotations

import torch
from accelerate.utils import is_peft_model
from trl import GRPOTrainer

import kernels
from objectives import Objective, TokenBatch

from . import step_selection
from .sampling import HashedGumbelSampler, install_hashed_sampler
from .stats_head import add_token_stats_head, log_backward_rows


class NonFiniteLossError(FloatingPointError):
    """The objective produced NaN/inf; raised before the optimizer can corrupt the weights."""


class TokenSelectiveGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` + a tokensel objective (see the module docstring for the contract with TRL)."""

    def __init__(self, *args, objective: Objective, selection_pass: bool = False,
                 domains: list[str] | None = None, sampler: str = "torch", **kwargs) -> None:
        self.objective = objective
        self.selection_pass = selection_pass
        self.domain_index = {name: i for i, name in enumerate(sorted(set(domains or [])))}
        self._step_context = None
        super().__init__(*args, **kwargs)
        if self.args.steps_per_generation != self.args.gradient_accumulation_steps:
            raise ValueError("tokensel needs steps_per_generation == gradient_accumulation_steps (one step per rollout)")
        base = self.model.get_base_model() if is_peft_model(self.model) else self.model
        self.kernel_stats = add_token_stats_head(base, self.temperature)
        self.hashed_sampler = None
        if sampler == "hashed":
            if self.use_vllm:
                raise ValueError("trainer.sampler=hashed samples inside transformers' generate; it cannot drive vLLM")
            self.hashed_sampler = HashedGumbelSampler(self.args.seed)
            install_hashed_sampler(base, self.hashed_sampler)
        self._valid_rows = 0

    # ---- rollout: add step-level state -------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        acc = self.accelerator
        local_rows = len(inputs)  # one completion per row; this rank's slice starts at rank · rows
        first = acc.process_index * local_rows
        if self.hashed_sampler is not None:  # rows are identified by their place in the gathered batch
            self.hashed_sampler.begin(self.state.global_step, torch.arange(first, first + local_rows))
        out = super()._generate_and_score_completions(inputs)
        out["rollout_ids"] = torch.arange(first, first + local_rows, device=out["completion_mask"].device)
        out["group_ids"] = out["rollout_ids"] // self.num_generations
        if self.domain_index:  # a fixed name -> int table, identical on every rank
            out["domain_ids"] = torch.tensor([self.domain_index[x["domain"]] for x in inputs],
                                             device=out["rollout_ids"].device)
        self._drop_unscorable(out)
        training = self.model.training
        metrics: dict[str, float] = {}
        before = None
        if training and self.objective.entry.sample_select is not None:
            before = step_selection.step_totals(acc, out)
            metrics.update(step_selection.select_samples(acc, out, self.objective, self._progress(),
                                                         self.args.steps_per_generation))
        step_selection.step_counts(acc, out)
        if self.selection_pass and training:
            _, entropy, _ = self._statistics(self.model, out, compute_entropy=True)
            metrics.update(step_selection.select_step(acc, out, entropy, self.objective, self._progress(), before))
        mode = "train" if training else "eval"
        for k, v in metrics.items():  # computed on the gathered step: identical on every rank
            self._metrics[mode][f"objective/{self.objective.name}/{k}"].append(v)
        return out

    def _prepare_inputs(self, generation_batch):
        inputs = super()._prepare_inputs(generation_batch)
        first_micro_batch = self._step % self.args.steps_per_generation == 0
        if self.model.training and self.objective.entry.step_stats is not None and first_micro_batch:
            self._step_context = self._row_stats_of_step()
        return inputs

    @torch.no_grad()
    def _row_stats_of_step(self):
        """Per-row statistics of every row of this optimizer step (all micro-batches, all ranks) under the current
        policy, for objectives whose upper-level aggregates span micro-batches (FiberPO's domain/group means).
        On-policy (no old log-probs) the log-ratio is 0 and no forward pass is needed."""
        parts, ids = [], []
        for b in self._buffered_inputs:
            mask = step_selection.loss_mask(b)
            old = b.get("old_per_token_logps")
            logp = torch.zeros_like(mask, dtype=torch.float32) if old is None else self._statistics(
                self.model, b, compute_entropy=False)[0]
            batch = TokenBatch(logp=logp, mask=mask, old_logp=old, group_ids=b["group_ids"],
                               domain_ids=b.get("domain_ids"))
            stats = self.objective.entry.step_stats(batch, self.objective.config)
            if stats is None:
                return None
            parts.append(stats)
            ids.append(b["rollout_ids"])
        return step_selection.gather_row_stats(self.accelerator, parts, ids)

    def _progress(self) -> float:
        """0 at the first optimizer step, 1 at the last (schedules of D³S)."""
        return self.state.global_step / max(1, self.state.max_steps - 1)

    def _drop_unscorable(self, out) -> None:
        """Rows that every reward function calls unscorable (e.g. no completion of the group parses, under the
        majority vote) leave the loss entirely: TRL already zeroes their advantage; we also zero their mask so that
        entropy-band and KL terms do not act on them and they leave the denominators (``sample_keep`` False)."""
        flags = [getattr(f, "unscorable", None) for f in self.reward_funcs]
        if not flags or any(f is None or len(f) != out["completion_mask"].shape[0] for f in flags):
            return
        rows = torch.tensor([all(col) for col in zip(*flags, strict=True)], device=out["completion_mask"].device)
        if rows.any():
            out["completion_mask"] = out["completion_mask"] * (~rows).to(out["completion_mask"].dtype)[:, None]
            out["sample_keep"] = ~rows

    def _statistics(self, model, inputs, compute_entropy: bool):
        """(logp, entropy, None) of the completion tokens, ``[B, T]`` each."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        T = inputs["completion_ids"].size(1)
        if not self.kernel_stats:
            return self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, T, compute_entropy=compute_entropy
            )
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-T] = -100  # only completion tokens are scored
        stats = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, tokensel_stats=True)
        return stats.logp[:, -T:], stats.entropy[:, -T:], None

    def training_step(self, model, inputs, num_items_in_batch):
        before = kernels.counters()["rows_backward"]
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.kernel_stats:
            log_backward_rows(self, before, self._valid_rows, loss.device)
        return loss

    @property
    def kernels_backend(self) -> str:
        """``torch`` or ``triton`` when our statistics head runs; ``trl`` when TRL's fused head does."""
        if not self.kernel_stats:
            return "trl"
        return kernels.active_backend(self.model.get_output_embeddings().weight)

    # ---- loss ----------------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        logp, entropy, _ = self._statistics(model, inputs, compute_entropy=True)
        mask = step_selection.loss_mask(inputs)
        if self.kernel_stats:
            self._valid_rows = int(inputs["completion_mask"].sum())
        batch = TokenBatch(
            logp=logp,
            mask=mask,
            advantages=inputs["advantages"],
            old_logp=inputs.get("old_per_token_logps"),
            ref_logp=inputs.get("ref_per_token_logps"),
            entropy=entropy,
            old_entropy=entropy.detach(),
            group_ids=inputs.get("group_ids"),
            domain_ids=inputs.get("domain_ids"),
            rollout_ids=inputs.get("rollout_ids"),
            keep=inputs.get("keep"),
            sample_keep=inputs.get("sample_keep"),
            band_lo=inputs.get("band_lo"),
            band_hi=inputs.get("band_hi"),
            n_seqs_global=_item(inputs.get("n_seqs_global")),
            n_tokens_global=_item(inputs.get("n_tokens_global")),
            n_keep_global=_item(inputs.get("n_keep_global")),
            progress=self._progress(),
        )
        kwargs = {}
        if self._step_context is not None and self.model.training:
            stats, ids = self._step_context
            kwargs["context"] = step_selection.context_without(stats, ids, inputs["rollout_ids"])
        out = self.objective(batch, **kwargs)
        if not torch.isfinite(out.loss):
            raise NonFiniteLossError(
                f"objective {self.objective.name!r} returned loss {out.loss.item()} at step {self.state.global_step}: "
                f"logp finite={bool(torch.isfinite(logp[mask.bool()]).all())}, "
                f"advantages finite={bool(torch.isfinite(inputs['advantages']).all())}"
            )
        self._log_objective_metrics(out.metrics, entropy.detach(), mask)
        # Shares use global denominators; DDP averages gradients over ranks, so undo that average.
        return out.loss * self.accelerator.num_processes

    def _log_objective_metrics(self, metrics: dict[str, float], entropy: torch.Tensor, mask: torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        keys = sorted(metrics)
        local = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=entropy.device)
        mean = self.accelerator.gather(local.reshape(1, -1)).mean(0)
        for k, v in zip(keys, mean.tolist(), strict=True):
            self._metrics[mode][f"objective/{self.objective.name}/{k}"].append(v)
        sums = self.accelerator.reduce(torch.stack([(entropy * mask).sum(), mask.sum()]).double(), reduction="sum")
        self._metrics[mode]["entropy"].append((sums[0] / sums[1].clamp(min=1)).item())


def _item(x) -> float | None:
    return None if x is None else float(x.item() if torch.is_tensor(x) else x)
