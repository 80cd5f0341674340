"""TRL adapter: a ``DistillationTrainer`` that trains the student only on the tokens TIP selects.

TRL 1.16 internals we rely on (``tests/test_trl_internals.py`` fails loudly if they move):

* ``DistillationTrainer._generate_and_score_completions(inputs) -> dict`` — student rollouts of the local slice of
  the generation batch (``per_device_train_batch_size × gradient_accumulation_steps`` rows, contiguous per rank) with
  ``prompt_ids``, ``prompt_mask``, ``completion_ids``, ``completion_mask``, optional ``tool_mask`` and the 0-dim
  ``num_items_in_batch`` (the step's loss-token count, all ranks), which ``compute_loss`` divides by the world size;
* ``DistillationTrainer._compute_loss(unwrapped_student, inputs, num_items_in_batch) -> (loss, entropy_sum, n)``
  whose loss mask is ``completion_mask × tool_mask``;
* ``DistillationTrainer._get_last_hidden_state`` and ``_forward_redirection`` (backbone calls that DDP / ZeRO-3 see).

Per optimizer step (spec §7.2):

1. the student rolls out (TRL, unchanged);
2. a no-grad scoring pass, in micro-batch-sized chunks: student and teacher backbones, then ``kernels.token_stats``
   gives the student entropy, the full-vocabulary reverse KL (and forward KL for ``q3_only``) of every token in one
   pass, never ``[N, V]`` (skipped for ``rule=all`` unless ``diagnostics``);
3. ``trainer.tip_step`` gathers the step, normalises, scores and selects globally; every rank keeps its rows;
4. the selection is folded into TRL's batch: ``tool_mask ← tool_mask · keep`` (never ``completion_mask``, which also
   builds the attention mask) and ``num_items_in_batch ← N_K``; with ``teacher_cache=kept_rows`` the teacher's
   hidden states of the kept tokens are kept (keyed by rollout id) so the loss pass runs no teacher forward;
5. loss pass: the student backbone with grad, then ``kernels.token_stats`` on the kept rows only (forward and backward
   scale with the kept fraction) and ``objectives.tip_loss``; ``head=trl`` runs TRL's own ``_compute_loss`` instead;
6. a step with no kept token anywhere skips the optimizer and LR-scheduler steps (``skipped_step = 1``); a rank with
   no kept token still runs forward and backward on a connected zero, in lock-step.
"""

from __future__ import annotations

import time
import warnings

import torch
from transformers import TrainerCallback
from trl import DistillationTrainer

import kernels
from objectives import Objective, TokenBatch

from .stats_head import head_is_plain, log_backward_rows
from .step_selection import loss_mask
from .tip_step import TipStep, keep_all, tip_step

HEADS = ("tokensel", "trl")


class TipDistillationTrainer(DistillationTrainer):
    """``DistillationTrainer`` + TIP token selection (see the module docstring for the contract with TRL)."""

    def __init__(self, *args, objective: Objective, head: str = "tokensel", **kwargs) -> None:
        cfg = objective.config
        targs = kwargs.get("args")
        if targs is None:
            raise ValueError("TipDistillationTrainer needs args= (a trl.DistillationConfig)")
        if targs.beta != 1.0:
            raise ValueError(f"TIP trains the reverse KL: DistillationConfig.beta must be 1.0, got {targs.beta}")
        if not targs.disable_dropout:
            raise ValueError("TIP needs disable_dropout=True: the scoring pass and the loss pass must see the same "
                             "student distribution")
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}; got {head!r}")
        if head == "trl" and cfg.teacher_cache == "kept_rows" and self._scores(cfg):
            raise ValueError("teacher_cache=kept_rows needs head=tokensel (TRL's loss recomputes the teacher)")
        if targs.temperature != 1.0:
            warnings.warn(f"TIP scores at the loss temperature {targs.temperature}; the paper uses 1.0", stacklevel=2)
        self.objective, self.tip, self.head = objective, cfg, head
        self._teacher_rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._skip_step = False
        self._valid_rows = 0
        super().__init__(*args, **kwargs)
        for who, m in (("student", self.model), ("teacher", self.teacher_model)):
            if m is not None and not head_is_plain(self.accelerator.unwrap_model(m)) and head == "tokensel":
                raise ValueError(f"the {who}'s head scales or soft-caps its logits, which tokensel's kernels do not "
                                 "model: use head=trl")
        self.add_callback(SkipEmptyStep(self))

    @staticmethod
    def _scores(cfg) -> bool:
        return cfg.rule != "all" or cfg.diagnostics

    def _log(self, key: str, value: float) -> None:
        self._metrics["train" if self.model.training else "eval"][f"objective/{self.objective.name}/{key}"].append(value)

    # ---- rollout: score, select, fold into TRL's batch -----------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return out
        acc = self.accelerator
        rows = out["completion_ids"].shape[0]
        device = out["completion_ids"].device
        out["rollout_ids"] = torch.arange(acc.process_index * rows, (acc.process_index + 1) * rows, device=device)
        valid = loss_mask(out).bool()
        self._teacher_rows = {}
        if self.tip.norm_scope == "micro_batch":  # opt-in: each micro-batch scores and selects itself in the loss
            return out
        if self._scores(self.tip):
            start = time.perf_counter()
            entropy, rkl, fkl, teacher_hidden = self._scoring_pass(out)
            step = tip_step(acc, valid, entropy, rkl, out["rollout_ids"], self.tip, self.state.global_step, fkl)
            step.metrics["scoring_time_s"] = time.perf_counter() - start
            if self.tip.teacher_cache == "kept_rows":
                self._cache_teacher(out["rollout_ids"], step.keep, teacher_hidden)
            if self.tip.importance_weighting:
                out["tip_entropy"] = entropy
        else:
            step = keep_all(acc, valid)
        self._fold(out, valid, step)
        for k, v in step.metrics.items():
            self._log(k, v)
        return out

    def _fold(self, out, valid: torch.Tensor, step: TipStep) -> None:
        out["tip_valid"] = valid
        out["tip_keep"] = step.keep
        tool = out.get("tool_mask")
        kept = step.keep.to(out["completion_mask"].dtype)
        out["tool_mask"] = kept if tool is None else tool * kept
        denominator = step.n_valid if self.tip.importance_weighting else step.n_keep
        out["num_items_in_batch"] = torch.tensor(float(denominator), device=valid.device)
        self._skip_step = step.n_keep == 0

    def _hidden(self, which: str, input_ids, attention_mask, T: int) -> torch.Tensor:
        """Last hidden states of the completion positions, through the DDP/ZeRO wrapper of ``which`` model."""
        wrapped = self.model_wrapped if which == "student" else self.teacher_model
        unwrapped = self.accelerator.unwrap_model(wrapped)
        return self._forward_redirection(wrapped, unwrapped, self._get_last_hidden_state, unwrapped, input_ids,
                                         attention_mask, T)

    def _heads(self):
        s = self.accelerator.unwrap_model(self.model).get_output_embeddings()
        t = self.accelerator.unwrap_model(self.teacher_model).get_output_embeddings()
        return s, t

    @torch.no_grad()
    def _scoring_pass(self, out):
        """Student entropy, reverse KL (and forward KL) of every valid token, in micro-batch-sized chunks."""
        divergences = ("reverse_kl", "forward_kl") if self.tip.needs_forward_kl else ("reverse_kl",)
        s_head, t_head = self._heads()
        self.teacher_model.eval()
        chunk = self.args.per_device_train_batch_size
        valid = loss_mask(out).bool()
        T = out["completion_ids"].shape[1]
        ent, rkl, fkl, hid = [], [], [], []
        for i in range(0, valid.shape[0], chunk):
            sl = slice(i, i + chunk)
            ids = torch.cat([out["prompt_ids"][sl], out["completion_ids"][sl]], dim=1)
            attn = torch.cat([out["prompt_mask"][sl], out["completion_mask"][sl]], dim=1)
            h_s = self._hidden("student", ids, attn, T)
            h_t = self._hidden("teacher", ids, attn, T)
            st = kernels.token_stats(h_s, s_head.weight, out["completion_ids"][sl], bias=s_head.bias,
                                     temperature=self.temperature, mask=valid[sl], teacher_hidden=h_t,
                                     teacher_weight=t_head.weight, teacher_bias=t_head.bias, divergences=divergences)
            ent.append(st.entropy)
            rkl.append(st.reverse_kl)
            fkl.append(st.forward_kl)
            hid.append(h_t)
        return (torch.cat(ent), torch.cat(rkl), torch.cat(fkl) if self.tip.needs_forward_kl else None,
                torch.cat(hid))

    def _cache_teacher(self, rollout_ids: torch.Tensor, keep: torch.Tensor, teacher_hidden: torch.Tensor) -> None:
        """The teacher's hidden states at the kept positions only, keyed by rollout id (they survive TRL's shuffle)."""
        for rid, row_keep, row_hidden in zip(rollout_ids.tolist(), keep, teacher_hidden, strict=True):
            pos = row_keep.nonzero().flatten()
            self._teacher_rows[rid] = (pos, row_hidden[pos])

    def _cached_teacher(self, rollout_ids: torch.Tensor, T: int, like: torch.Tensor) -> torch.Tensor:
        rows = [self._teacher_rows[r] for r in rollout_ids.tolist()]
        d = rows[0][1].shape[-1]
        out = like.new_zeros(len(rows), T, d)
        for i, (pos, hidden) in enumerate(rows):
            out[i, pos] = hidden.to(out.dtype)
        return out

    # ---- loss ----------------------------------------------------------------------------------------------------
    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        if self.head == "trl":
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        if self.tip.norm_scope == "micro_batch" and self.model.training:
            return self._micro_batch_loss(unwrapped_student, inputs)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        T = inputs["completion_ids"].size(1)
        kept = loss_mask(inputs).bool()  # valid ∧ keep: TIP's selection was folded into tool_mask
        h_s = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, T)
        s_head, t_head = self._heads()
        if self._teacher_rows and "rollout_ids" in inputs and self.model.training:
            h_t = self._cached_teacher(inputs["rollout_ids"], T, h_s.detach())
        else:
            self.teacher_model.eval()
            with torch.no_grad():
                h_t = self._hidden("teacher", input_ids, attention_mask, T)
        st = kernels.token_stats(h_s, s_head.weight, inputs["completion_ids"], bias=s_head.bias,
                                 temperature=self.temperature, mask=kept, teacher_hidden=h_t,
                                 teacher_weight=t_head.weight, teacher_bias=t_head.bias, divergences=("reverse_kl",))
        valid = inputs.get("tip_valid", kept)
        self._valid_rows = int(valid.sum())
        batch = TokenBatch(logp=st.logp, mask=valid, entropy=inputs.get("tip_entropy"), reverse_kl=st.reverse_kl,
                           keep=kept, num_items=None if num_items_in_batch is None else float(num_items_in_batch))
        out = self.objective(batch)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"TIP loss is {out.loss.item()} at step {self.state.global_step}: "
                                     f"{int((~torch.isfinite(st.reverse_kl[kept])).sum())} non-finite reverse-KL values")
        return out.loss, (st.entropy * kept).sum().detach(), kept.sum()

    def _micro_batch_loss(self, unwrapped_student, inputs):
        """``norm_scope=micro_batch`` (a documented approximation): no scoring pass; the loss forward computes the
        statistics of every valid token of the micro-batch, ``tip_loss`` normalises and selects on them, and the
        step loss is the mean of the micro-batches' kept-token means (÷ gradient-accumulation steps; DDP averages
        the ranks). Unkept tokens get zero upstream gradient, so the head's backward still skips them."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        T = inputs["completion_ids"].size(1)
        valid = loss_mask(inputs).bool()
        self._valid_rows = int(valid.sum())
        h_s = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, T)
        s_head, t_head = self._heads()
        self.teacher_model.eval()
        with torch.no_grad():
            h_t = self._hidden("teacher", input_ids, attention_mask, T)
        divergences = ("reverse_kl", "forward_kl") if self.tip.needs_forward_kl else ("reverse_kl",)
        st = kernels.token_stats(h_s, s_head.weight, inputs["completion_ids"], bias=s_head.bias,
                                 temperature=self.temperature, mask=valid, teacher_hidden=h_t,
                                 teacher_weight=t_head.weight, teacher_bias=t_head.bias, divergences=divergences)
        batch = TokenBatch(logp=st.logp, mask=valid, entropy=st.entropy.detach(), reverse_kl=st.reverse_kl,
                           forward_kl=None if st.forward_kl is None else st.forward_kl.detach(),
                           rollout_ids=inputs.get("rollout_ids"))
        out = self.objective(batch, step=self.state.global_step)
        for k, v in out.metrics.items():
            self._log(k, v)
        kept = out.token_weights > 0
        loss = out.loss / self.current_gradient_accumulation_steps
        return loss, (st.entropy.detach() * kept).sum(), kept.sum()

    def training_step(self, model, inputs, num_items_in_batch):
        before = kernels.counters()["rows_backward"]
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.head == "tokensel":  # the head's backward rows against the valid tokens (≈ the kept fraction)
            log_backward_rows(self, before, self._valid_rows, loss.device)
        return loss

    @property
    def kernels_backend(self) -> str:
        return "trl" if self.head == "trl" else kernels.active_backend(self.model.get_output_embeddings().weight)


class SkipEmptyStep(TrainerCallback):
    """Skips the optimizer and LR-scheduler steps of a step that kept no token on any rank (a zero gradient would
    still move AdamW's weights through its momentum and weight decay). Uses accelerate's overflow flag, which
    ``Trainer`` already honours for the scheduler."""

    def __init__(self, trainer: TipDistillationTrainer) -> None:
        self.trainer = trainer
        self._saved = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        t = self.trainer
        if not t._skip_step:
            return
        inner = getattr(t.optimizer, "optimizer", t.optimizer)
        self._saved = (inner, inner.__dict__.get("step"))
        inner.step = lambda *a, **k: None
        t.optimizer._is_overflow = True

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._saved is None:
            return
        inner, step = self._saved
        if step is None:
            del inner.step
        else:
            inner.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if self._saved is not None:
            self.trainer.optimizer._is_overflow = False
            self._saved = None
        self.trainer._skip_step = False
