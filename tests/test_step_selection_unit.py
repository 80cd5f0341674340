"""trainer/step_selection.py on one process: row compaction keeps the rank in lock-step and the counts honest."""

import torch

import objectives
from tests.trl_standin import IdentityAccelerator
from trainer import step_selection


def test_compact_pads_to_a_multiple_of_the_micro_steps():
    out = {"completion_mask": torch.ones(8, 3, dtype=torch.long), "advantages": torch.arange(8.0),
           "prompts": list("abcdefgh"), "num_items_in_batch": torch.tensor(24.0)}
    keep = torch.tensor([0, 1, 0, 0, 1, 0, 1, 0], dtype=torch.bool)
    step_selection.compact(out, keep, steps_per_generation=2)
    assert out["advantages"].tolist() == [1.0, 4.0, 6.0, 0.0]  # kept rows in order, then one dropped row as padding
    assert out["prompts"] == ["b", "e", "g", "a"]
    assert out["sample_keep"].tolist() == [True, True, True, False]
    assert out["completion_mask"].sum(1).tolist() == [3, 3, 3, 0]
    assert out["num_items_in_batch"].item() == 24.0  # 0-dim tensors are not rows
    none = {"completion_mask": torch.ones(4, 2), "advantages": torch.zeros(4)}
    step_selection.compact(none, torch.zeros(4, dtype=torch.bool), steps_per_generation=2)
    assert none["advantages"].shape == (2,) and none["completion_mask"].sum() == 0  # still one row per micro-step


def test_d3s_through_the_step_code_on_one_process():
    acc = IdentityAccelerator()
    g = torch.Generator().manual_seed(0)
    adv = torch.tensor([1.2, -0.7, -0.7, 0.2, 0.0, 0.0, 0.0, 0.0])
    out = {"completion_mask": torch.ones(8, 4, dtype=torch.long), "advantages": adv,
           "rollout_ids": torch.arange(8), "group_ids": torch.arange(8) // 4}
    obj = objectives.build("d3s", num_generations=4, cross_group_frac=None)
    before = step_selection.step_totals(acc, out)
    metrics = step_selection.select_samples(acc, out, obj, 0.0, steps_per_generation=1)
    assert before == (8, 32.0)
    assert out["rollout_ids"].tolist() == [0, 1, 4, 5]  # 2 per group: max variance, then the zero group's first two
    assert metrics["kept_sample_frac"] == 0.5
    step_selection.step_counts(acc, out)
    m = step_selection.select_step(acc, out, torch.rand(4, 4, generator=g), obj, 0.0, before)
    assert out["n_seqs_global"].item() == 4.0
    assert out["keep"][2:].sum() == 0  # zero-advantage rows score 0 and lose to every positive score
    assert m["kept_token_frac"] == out["keep"].sum().item() / 32
