"""majority_vote: the label-free TTRL/SPINE reward (specs/entropy_band_grpo.md §3.1, vectors R1–R4)."""

import torch

from trainer.rewards import majority_vote


def trl_advantages(rewards: list[float]) -> torch.Tensor:
    r = torch.tensor(rewards, dtype=torch.float64)
    return (r - r.mean()) / (r.std() + 1e-4)  # TRL 1.16: unbiased std + 1e-4


def test_r1_votes_and_trl_advantages():
    r = majority_vote(["A", "B", "A", None, "A", "C", "B", "A"])
    assert r == [1, 0, 1, 0, 1, 0, 0, 1]
    adv = trl_advantages(r)
    assert torch.allclose(adv.abs(), torch.full((8,), 0.93523, dtype=torch.float64), atol=1e-5)


def test_r2_tie_goes_to_first_occurrence():
    assert majority_vote(["B", "A", "A", "B"]) == [1, 0, 0, 1]


def test_r3_unanimous_and_unparseable():
    assert majority_vote(["A"] * 8) == [1.0] * 8
    assert majority_vote([None] * 4) == [None] * 4


def test_r4_leave_one_out():
    assert majority_vote(["A", "B", "B", "A", "C"]) == [1, 0, 0, 1, 0]
    assert majority_vote(["A", "B", "B", "A", "C"], leave_one_out=True) == [0, 0, 0, 0, 0]
    assert majority_vote(["A", None, None]) == [1, 0, 0]
    assert majority_vote(["A", None, None], leave_one_out=True) == [0, 0, 0]
