"""A model forward that returns tokensel's per-token statistics instead of logits.

``add_token_stats_head(model, temperature)`` wraps ``model.forward`` so that
``model(input_ids, attention_mask=..., labels=labels, tokensel_stats=True)`` runs the backbone and
``kernels.token_stats`` on its last hidden states (shifted: position t scores ``labels[:, t + 1]``), never building
``[tokens × vocab]`` logits. Calls without the flag reach the previous forward unchanged (generation, TRL's own
fused head). Going through ``model(...)`` keeps DDP's and DeepSpeed's forward hooks in the loop.

The backward of ``token_stats`` recomputes only rows whose upstream gradient is non-zero, so an objective that
zeroes the weight of 80 % of the tokens pays about 20 % of the head's backward.
"""

from __future__ import annotations

import functools
import types

import torch

import kernels

UNSUPPORTED_HEAD_OPTIONS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                            "lm_head_multiplier")


def head_is_plain(model) -> bool:
    """True when logits are exactly ``lm_head(h)`` (no soft-capping or scaling the kernels do not model)."""
    cfg = model.config.get_text_config()
    return all(getattr(cfg, name, None) in (None, 1.0) for name in UNSUPPORTED_HEAD_OPTIONS)


def add_token_stats_head(model, temperature: float) -> bool:
    """Install the ``tokensel_stats=True`` path on ``model``; False (nothing installed) for unsupported heads."""
    if not head_is_plain(model):
        return False
    previous = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, tokensel_stats: bool = False, **kwargs):
        if not tokensel_stats:
            return previous(*args, **kwargs)
        labels = kwargs.pop("labels")
        kwargs["use_cache"] = False  # packed / padded training forwards must not build a cache
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        head = self.get_output_embeddings()
        targets = labels[:, 1:].to(hidden.device)

        def stats(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            st = kernels.token_stats(h, head.weight, targets, bias=head.bias, temperature=temperature)
            return st.logp, st.entropy  # a plain tuple: ZeRO-3's backward hooks attach to tuple outputs

        return kernels.TokenStats(*call_as_forward(head, stats, hidden))

    model.forward = types.MethodType(forward, model)
    return True


def call_as_forward(module: torch.nn.Module, fn, *args):
    """``fn(*args)`` run as ``module``'s forward, so that the hooks a wrapper registered on the module run around it.

    The kernels read ``lm_head.weight`` directly. Under DeepSpeed ZeRO-3 that weight is a 0-element shard outside the
    head's own forward: ZeRO-3's forward hooks gather it before the forward (and release it after), and the hooks
    it attaches to the outputs gather it again before the backward, which the kernels' selective backward needs.
    Without such hooks (one process, DDP, ZeRO-2) this is a plain call.
    """
    saved = module.__dict__.get("forward")
    module.forward = fn
    try:
        return module(*args)
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


def log_backward_rows(trainer, rows_before: int, rows_valid: int, device: torch.device) -> None:
    """``kernels/rows_valid``, ``kernels/rows_backward`` and their ratio for one micro-batch, summed over ranks:
    the head's backward work against the valid tokens (``rows_before``: ``kernels.counters()`` before the step)."""
    rows = kernels.counters()["rows_backward"] - rows_before
    counts = torch.tensor([rows, rows_valid], dtype=torch.float64, device=device)
    rows_bwd, valid = trainer.accelerator.reduce(counts, reduction="sum").tolist()
    metrics = trainer._metrics["train"]
    metrics["kernels/rows_valid"].append(valid)
    metrics["kernels/rows_backward"].append(rows_bwd)
    metrics["kernels/backward_row_fraction"].append(rows_bwd / max(1.0, valid))
