"""A minimal stand-in ``self`` for calling TRL 1.16 ``GRPOTrainer`` methods on hand-built tensors.

One process (accelerator gather/pad/reduce = identity), one micro-batch, token-level importance sampling, no
vLLM, no entropy bonus, no aux loss — the reduction settings of ``../shared/specs/entropy_band_grpo.md`` §8.
"""

from collections import defaultdict
from types import SimpleNamespace

import torch
from trl import GRPOTrainer


class IdentityAccelerator:
    num_processes = 1
    process_index = 0

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def trl_loss(logp, old_logp, mask, advantages, entropy, *, loss_type, top_entropy_quantile=1.0, beta=0.0,
             ref_logp=None, eps_low=0.2, eps_high=0.2, max_completion_length=None, importance_sampling_level="token"):
    """TRL 1.16 ``GRPOTrainer._compute_loss`` on given per-token tensors."""
    B, T = logp.shape
    stand_in = SimpleNamespace(
        accelerator=IdentityAccelerator(),
        top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=None,
        importance_sampling_level=importance_sampling_level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length or T,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    stand_in._get_per_token_logps_and_entropies = lambda *a, **k: (logp, entropy, None)
    stand_in.get_high_entropy_mask = lambda e, m, t: GRPOTrainer.get_high_entropy_mask(stand_in, e, m, t)
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old_logp,
        "num_items_in_batch": mask.sum(),
    }
    if ref_logp is not None:
        inputs["ref_per_token_logps"] = ref_logp
    return GRPOTrainer._compute_loss(stand_in, None, inputs)


def high_entropy_mask(entropy, mask, threshold):
    """TRL 1.16 ``GRPOTrainer.get_high_entropy_mask`` with one process."""
    stand_in = SimpleNamespace(accelerator=IdentityAccelerator())
    return GRPOTrainer.get_high_entropy_mask(stand_in, entropy, mask, threshold)


def assert_same_as_trl(ours, trl, logp, atol):
    """``ours(logp) -> ObjectiveOutput`` and ``trl(logp) -> loss`` agree in value and in ∂loss/∂logp; returns ours."""
    a, b = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    out, ref = ours(a), trl(b)
    assert abs(out.loss.item() - ref.item()) <= atol, (out.loss.item(), ref.item())
    out.loss.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=atol)
    return out
