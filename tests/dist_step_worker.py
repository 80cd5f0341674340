"""One fixed fp64 optimizer step through the trainer's step-level code, on 1 process or under torchrun (gloo).

For each objective and each micro-batch count, every rank takes its contiguous slice of the generation batch, runs
``trainer.step_selection`` (rollout down-sampling, counts, the gathered step selection) exactly as the GRPO adapter
does, shuffles and splits its rows into micro-batches, and back-propagates each micro-batch's share into parameters
``theta`` (log-probs) and ``phi`` (entropies) that every rank holds, like DDP's replicas. Gradients are summed over
ranks. Rank 0 saves the step loss, the gradients and the token selection (in global row order) to ``argv[1]``.
"""

import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator

import objectives
from objectives import TokenBatch
from objectives.tip import tip_loss
from trainer import step_selection
from trainer.dpo import global_scale
from trainer.tip_step import tip_step

B, T, G = 16, 6, 4
CASES = {
    "grpo_global": ("grpo", {"keep": 0.2, "scope": "global_batch"}),
    "band_per_group_kl": ("entropy_band", {"keep": 0.4, "scope": "per_group", "kl_coef": 0.1, "lambda_lo": 0.5,
                                           "lambda_hi": 0.5, "loss_type": "grpo"}),
    "band_per_sequence": ("entropy_band", {"lambda_lo": 0.5, "lambda_hi": 0.5}),
    "band_otsu_global": ("entropy_band", {"method": "otsu", "scope": "global_batch", "band": "median_mad",
                                          "keep": 0.2, "loss_type": "dr_grpo", "max_completion_length": T}),
    "d3s": ("d3s", {"num_generations": G}),
    "d3s_gspo_valid": ("d3s", {"num_generations": G, "importance_sampling_level": "sequence", "loss_type": "grpo",
                               "token_normalizer": "valid", "token_scope": "per_sequence"}),
    "fiberpo": ("fiberpo", {"eps": 0.1, "c_pos": 0.05, "c_neg": 0.05}),
    # every base gate passes (wide budgets), fiber gates active: gradients exact under any split
    "fiberpo_domain_pass": ("fiberpo", {"levels": ["domain", "group"], "eps": 0.1, "c_pos": 5.0, "c_neg": 5.0}),
    # base gates active: level means (values) stay exact, the gradient through other micro-batches' rows is dropped
    "fiberpo_domain_active": ("fiberpo", {"levels": ["domain", "group"], "eps": 0.1, "c_pos": 0.02, "c_neg": 0.02}),
}
UPPER_GATES_ACTIVE = {"fiberpo_domain_active"}
PROGRESS = 0.5


def step_tensors():
    g = torch.Generator().manual_seed(1234)
    d = torch.float64
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    rewards = (torch.rand(B, generator=g) < 0.5).to(d)
    rewards[:G] = 1.0  # one unanimous group: zero advantage
    grouped = rewards.view(-1, G)
    adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).flatten()
    theta = -torch.rand(B, T, generator=g, dtype=d) * 2
    return {
        "mask": mask,
        "advantages": adv,
        "theta": theta,
        "old_logp": theta + 0.1 * torch.randn(B, T, generator=g, dtype=d),
        "ref_logp": theta + 0.1 * torch.randn(B, T, generator=g, dtype=d),
        "old_entropy": torch.rand(B, T, generator=g, dtype=d) * 3,
    }


def run_case(acc, name, micro_batches, data):
    obj_name, cfg = CASES[name]
    objective = objectives.build(obj_name, **cfg)
    world, rank = acc.num_processes, acc.process_index
    rows = B // world
    ids = torch.arange(rank * rows, (rank + 1) * rows)
    out = {"completion_mask": data["mask"][ids].clone(), "advantages": data["advantages"][ids].clone(),
           "rollout_ids": ids.clone(), "group_ids": ids // G, "domain_ids": ids // (2 * G)}
    before = None
    if objective.entry.sample_select is not None:
        before = step_selection.step_totals(acc, out)
        step_selection.select_samples(acc, out, objective, PROGRESS, micro_batches)
    step_selection.step_counts(acc, out)
    if objective.needs_step_selection(1):
        entropy = data["old_entropy"][out["rollout_ids"]]
        step_selection.select_step(acc, out, entropy, objective, PROGRESS, before)

    theta = data["theta"].clone().requires_grad_()
    phi = data["old_entropy"].clone().requires_grad_()
    n = out["completion_mask"].shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(rank + 7))  # TRL shuffles the rows
    total = torch.zeros((), dtype=torch.float64)
    selected = torch.zeros(B, T, dtype=torch.bool)
    context = None
    if objective.entry.step_stats is not None and objective.config.levels:
        # the adapter's per-step pre-pass: every row's (P, N, T, ids) under the current policy, gathered
        parts = [objective.entry.step_stats(TokenBatch(
            logp=data["theta"][out["rollout_ids"][c]], old_logp=data["old_logp"][out["rollout_ids"][c]],
            mask=out["completion_mask"][c], group_ids=out["group_ids"][c], domain_ids=out["domain_ids"][c]),
            objective.config) for c in perm.chunk(micro_batches)]
        context = step_selection.gather_row_stats(acc, parts, [out["rollout_ids"][c] for c in perm.chunk(micro_batches)])
    for chunk in perm.chunk(micro_batches):
        r = out["rollout_ids"][chunk]
        extra = {k: out[k][chunk] for k in ("keep", "sample_keep", "band_lo", "band_hi") if k in out}
        counts = {k: float(out[k]) for k in ("n_seqs_global", "n_tokens_global", "n_keep_global") if k in out}
        batch = TokenBatch(logp=theta[r], mask=out["completion_mask"][chunk], advantages=out["advantages"][chunk],
                           old_logp=data["old_logp"][r], ref_logp=data["ref_logp"][r], entropy=phi[r],
                           old_entropy=data["old_entropy"][r], group_ids=out["group_ids"][chunk],
                           domain_ids=out["domain_ids"][chunk], rollout_ids=r, progress=PROGRESS, **extra, **counts)
        kwargs = {} if context is None else {"context": step_selection.context_without(*context, r)}
        result = objective(batch, **kwargs)
        result.loss.backward()
        total = total + result.loss.detach()
        selected[r] |= result.token_weights.bool()
    grads = torch.stack([theta.grad, torch.zeros_like(phi) if phi.grad is None else phi.grad])
    if world > 1:
        dist.all_reduce(total)
        dist.all_reduce(grads)
        s = selected.long()
        dist.all_reduce(s)
        selected = s.bool()
    return {"loss": total, "grads": grads, "selected": selected}


# TIP (distillation): rows 8..15 hold one valid token, so at keep 0.5 their budget is 0 and, on 2 ranks, rank 1
# keeps no token under the per-sequence budget (it must still take part in every collective).
TIP_CASES = {
    "tip_soft_or": {"rule": "soft_or", "keep": 0.5},
    "tip_entropy_sample": {"rule": "entropy_sample", "keep": 0.5, "seed": 3},
    "tip_q3": {"rule": "q3_only", "keep": 0.5},
    "tip_global_budget": {"rule": "soft_or", "keep": 0.3, "budget_scope": "global_batch"},
    "tip_entropy_sample_iw": {"rule": "entropy_sample", "keep": 0.5, "importance_weighting": True},
}
TIP_STEP = 5


def tip_tensors():
    g = torch.Generator().manual_seed(99)
    d = torch.float64
    lengths = torch.cat([torch.randint(2, T + 1, (B // 2,), generator=g), torch.ones(B // 2, dtype=torch.long)])
    return {
        "mask": torch.arange(T)[None] < lengths[:, None],
        "entropy": torch.rand(B, T, generator=g, dtype=d) * 2,
        "theta": torch.randn(B, T, generator=g, dtype=d),  # reverse KL = softplus(theta): the gradient path
        "forward_kl": torch.rand(B, T, generator=g, dtype=d),
    }


def run_tip_case(acc, name, micro_batches, data):
    cfg = objectives.build("tip", **TIP_CASES[name]).config
    world, rank = acc.num_processes, acc.process_index
    rows = B // world
    ids = torch.arange(rank * rows, (rank + 1) * rows)
    theta = data["theta"].clone().requires_grad_()
    rkl = torch.nn.functional.softplus(theta)
    step = tip_step(acc, data["mask"][ids], data["entropy"][ids], rkl.detach()[ids], ids, cfg, TIP_STEP,
                    data["forward_kl"][ids])
    denominator = step.n_valid if cfg.importance_weighting else step.n_keep
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(rank + 7))  # TRL shuffles the rows
    total = torch.zeros((), dtype=torch.float64)
    for chunk in perm.chunk(micro_batches):
        r = ids[chunk]
        batch = TokenBatch(logp=torch.zeros(len(r), T, dtype=torch.float64), mask=data["mask"][r],
                           entropy=data["entropy"][r], reverse_kl=rkl[r], keep=step.keep[chunk],
                           num_items=denominator / world)
        out = tip_loss(batch, cfg)
        out.loss.backward(retain_graph=True)  # a rank with no kept token back-propagates a connected zero
        total = total + out.loss.detach()
    grads = theta.grad.clone()
    selected = torch.zeros(B, T, dtype=torch.long)
    selected[ids] = step.keep.long()
    local_kept = torch.tensor(float(step.keep.sum()), dtype=torch.float64)
    kept_per_rank = [local_kept.clone() for _ in range(world)]
    if world > 1:  # DDP averages the gradients of the ranks
        dist.all_reduce(total)
        dist.all_reduce(grads)
        dist.all_reduce(selected)
        dist.all_gather(kept_per_rank, local_kept)
        total, grads = total / world, grads / world
    return {"loss": total, "grads": grads, "selected": selected.bool(), "metrics": step.metrics,
            "kept_per_rank": torch.stack(kept_per_rank)}


def dpo_tensors():
    g = torch.Generator().manual_seed(7)
    d = torch.float64
    n, t = 8, 5
    return {"theta": torch.randn(2 * n, t, generator=g, dtype=d), "ref": torch.randn(2 * n, t, generator=g, dtype=d),
            "mask": torch.rand(2 * n, t, generator=g) < 0.8, "weights": torch.rand(2 * n, t, generator=g, dtype=d)}


DPO_SPLITS = {1: [range(0, 8)], 2: [range(0, 5), range(5, 8)]}  # uneven pair counts per rank


def run_dpo_case(acc, micro_batches, data):
    """The trainer's global pair scale (``trainer.dpo.global_scale``) with uneven pairs per rank and micro-batch."""
    objective = objectives.build("token_dpo", preset="cdpo")
    world, rank = acc.num_processes, acc.process_index
    pairs = list(DPO_SPLITS[world][rank])
    theta = data["theta"].clone().requires_grad_()
    n_global = 8.0
    total = torch.zeros((), dtype=torch.float64)
    for chunk in [pairs[i::micro_batches] for i in range(micro_batches)]:
        if not chunk:
            continue
        rows = torch.tensor(chunk + [c + 8 for c in chunk])  # [chosen; rejected]
        out = objective(TokenBatch(logp=theta[rows], mask=data["mask"][rows], ref_logp=data["ref"][rows]),
                        token_weights=data["weights"][rows])
        loss = out.loss * global_scale(len(chunk), world, n_global)
        loss.backward()
        total = total + loss.detach()
    grads = theta.grad.clone()
    if world > 1:
        dist.all_reduce(total)
        dist.all_reduce(grads)
        total, grads = total / world, grads / world
    return {"loss": total, "grads": grads}


def main(path: str) -> None:
    acc = Accelerator(cpu=True)
    data = step_tensors()
    results = {f"{name}/mb{mb}": run_case(acc, name, mb, data) for name in CASES for mb in (1, 8)}
    tip_data = tip_tensors()
    results |= {f"{name}/mb{mb}": run_tip_case(acc, name, mb, tip_data) for name in TIP_CASES for mb in (1, 4)}
    dpo_data = dpo_tensors()
    results |= {f"token_dpo/mb{mb}": run_dpo_case(acc, mb, dpo_data) for mb in (1, 3)}
    if acc.process_index == 0:
        torch.save(results, path)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
