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

from .stats_head import add_token_stats_head


class NonFiniteLossError(FloatingPointError):
    """The objective produced NaN/inf; raised before the optimizer can corrupt the weights."""


class TokenSelectiveGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` + a tokensel objective (see the module docstring for the contract with TRL)."""

    def __init__(self, *args, objective: Objective, selection_pass: bool = False, **kwargs) -> None:
        self.objective = objective
        self.selection_pass = selection_pass
        super().__init__(*args, **kwargs)
        if self.args.steps_per_generation != self.args.gradient_accumulation_steps:
            raise ValueError("tokensel needs steps_per_generation == gradient_accumulation_steps (one step per rollout)")
        base = self.model.get_base_model() if is_peft_model(self.model) else self.model
        self.kernel_stats = not self.is_deepspeed_enabled and add_token_stats_head(base, self.temperature)
        self._valid_rows = 0

    # ---- rollout: add step-level state -------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        acc = self.accelerator
        local_rows = out["completion_mask"].shape[0]
        device = out["completion_mask"].device
        first = acc.process_index * local_rows
        out["rollout_ids"] = torch.arange(first, first + local_rows, device=device)
        out["group_ids"] = out["rollout_ids"] // self.num_generations
        self._drop_unscorable(out)
        training = self.model.training
        step_metrics: dict[str, float] = {}
        before = None
        if training and self.objective.entry.sample_select is not None:
            before = self._step_totals(out)
            step_metrics.update(self._select_samples(out))
        mask = self._loss_mask(out)
        rows = torch.tensor([float(mask.shape[0])], device=device)
        out["n_seqs_global"] = acc.gather(rows).sum()
        out["n_tokens_global"] = acc.gather(mask.sum().float().reshape(1)).sum()
        if self.selection_pass and training:
            step_metrics.update(self._step_selection(out, mask, before))
        mode = "train" if training else "eval"
        for k, v in step_metrics.items():  # computed on the gathered step: identical on every rank
            self._metrics[mode][f"objective/{self.objective.name}/{k}"].append(v)
        return out

    @staticmethod
    def _loss_mask(inputs) -> torch.Tensor:
        mask = inputs["completion_mask"]
        return mask * inputs["tool_mask"] if "tool_mask" in inputs else mask

    def _progress(self) -> float:
        """0 at the first optimizer step, 1 at the last (schedules of D³S)."""
        return self.state.global_step / max(1, self.state.max_steps - 1)

    def _drop_unscorable(self, out) -> None:
        """Rows that every reward function calls unscorable (e.g. no completion of the group parses, under the
        majority vote) leave the loss entirely: TRL already zeroes their advantage; we also zero their mask so that
        entropy-band and KL terms do not act on them and they leave the denominators."""
        flags = [getattr(f, "unscorable", None) for f in self.reward_funcs]
        if not flags or any(f is None or len(f) != out["completion_mask"].shape[0] for f in flags):
            return
        rows = torch.tensor([all(col) for col in zip(*flags, strict=True)], device=out["completion_mask"].device)
        if rows.any():
            out["completion_mask"] = out["completion_mask"] * (~rows).to(out["completion_mask"].dtype)[:, None]

    def _step_totals(self, out) -> tuple[int, float]:
        """Rows and valid tokens of the whole generation batch (all ranks), before any is dropped."""
        m = self._loss_mask(out)
        t = self.accelerator.gather(torch.tensor([[float(m.shape[0]), float(m.sum())]], device=m.device)).sum(0)
        return int(t[0]), float(t[1])

    @torch.no_grad()
    def _select_samples(self, out) -> dict[str, float]:
        """Rollout down-sampling on the gathered generation batch, before the statistics pass; the dropped rows
        are removed from this rank's batch so that they cost no further forward or backward work."""
        acc = self.accelerator
        adv = out["advantages"]
        step = TokenBatch(
            logp=adv.new_zeros(adv.shape[0] * acc.num_processes, 1),
            mask=torch.ones(adv.shape[0] * acc.num_processes, 1, device=adv.device),
            advantages=acc.gather(adv if adv.dim() == 1 else (adv * self._loss_mask(out)).sum(-1)
                                  / self._loss_mask(out).sum(-1).clamp(min=1)),
            group_ids=acc.gather(out["group_ids"]),
            progress=self._progress(),
        )
        keep, metrics = self.objective.entry.sample_select(step, self.objective.config)
        rows = adv.shape[0]
        self._compact(out, keep[acc.process_index * rows : (acc.process_index + 1) * rows])
        return metrics

    def _compact(self, out, keep: torch.Tensor) -> None:
        """Keep this rank's selected rows, padded with dropped rows (zero mask, ``sample_keep`` False) up to a
        multiple of ``steps_per_generation``, so that every rank still runs the same number of micro-steps."""
        spg = self.args.steps_per_generation
        kept, dropped = keep.nonzero().flatten(), (~keep).nonzero().flatten()
        n = max(spg, -(-kept.numel() // spg) * spg)
        order = torch.cat([kept, dropped[: n - kept.numel()]])
        rows = keep.shape[0]
        for k, v in list(out.items()):
            if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == rows:
                out[k] = v[order]
            elif isinstance(v, list) and len(v) == rows:
                out[k] = [v[i] for i in order.tolist()]
        sample_keep = torch.arange(n, device=keep.device) < kept.numel()
        out["sample_keep"] = sample_keep
        out["completion_mask"] = out["completion_mask"] * sample_keep.to(out["completion_mask"].dtype)[:, None]

    @torch.no_grad()
    def _step_selection(self, out, mask: torch.Tensor, before: tuple[int, float] | None) -> dict[str, float]:
        """The objective's once-per-step selection on the gathered step (old-policy statistics of every rank's
        rows, in global row order); each rank keeps its slice of the row decisions and the global counts."""
        _, entropy, _ = self._statistics(self.model, out, compute_entropy=True)
        acc = self.accelerator
        rows = mask.shape[0]
        counts = acc.gather(torch.tensor([rows], device=mask.device))
        real = torch.cat([torch.arange(int(counts.max()), device=mask.device) < int(c) for c in counts])

        def gather_rows(x: torch.Tensor, pad) -> torch.Tensor:
            if x.dim() == 2:
                x = acc.pad_across_processes(x, dim=1, pad_index=pad)
            return acc.gather(acc.pad_across_processes(x, dim=0, pad_index=pad))[real]

        sample_keep = out.get("sample_keep")
        step = TokenBatch(
            logp=gather_rows(torch.zeros_like(entropy), 0.0),
            mask=gather_rows(mask, 0),
            advantages=gather_rows(out["advantages"], 0.0),
            old_entropy=gather_rows(entropy, 0.0),
            group_ids=gather_rows(out["group_ids"], -1),
            rollout_ids=gather_rows(out["rollout_ids"], -1),
            sample_keep=None if sample_keep is None else gather_rows(sample_keep, False),
            progress=self._progress(),
        )
        kwargs = {}
        if before is not None:  # metrics relative to the whole generation batch, before rollouts were dropped
            kwargs = {"n_rows_all": before[0], "n_valid_all": before[1]}
        sel = self.objective.entry.select(step, self.objective.config, **kwargs)
        start = int(counts[: acc.process_index].sum())
        T = mask.shape[1]
        for k, v in sel.rows.items():
            local = v[start : start + rows]
            out[k] = local[:, :T] & mask.bool() if k == "keep" else local
        for k, v in sel.counts.items():
            out[k] = torch.tensor(float(v), device=mask.device)
        return sel.metrics

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
            rows = kernels.counters()["rows_backward"] - before
            counts = torch.tensor([rows, self._valid_rows], dtype=torch.float64, device=loss.device)
            rows_bwd, rows_valid = self.accelerator.reduce(counts, reduction="sum").tolist()
            self._metrics["train"]["kernels/rows_valid"].append(rows_valid)
            self._metrics["train"]["kernels/rows_backward"].append(rows_bwd)
            self._metrics["train"]["kernels/backward_row_fraction"].append(rows_bwd / max(1.0, rows_valid))
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
        mask = self._loss_mask(inputs)
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
        out = self.objective(batch)
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
