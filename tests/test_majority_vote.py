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


class _Task:
    name = "toy"

    @staticmethod
    def extract(text):
        return text.strip() or None


def test_trl_reward_function_votes_per_group_and_flags_unscorable_groups():
    from trainer.rewards import MajorityVoteReward

    fn = MajorityVoteReward(_Task(), num_generations=4)
    logged = {}
    completions = ["7", "7", "8", "", "", "", "", ""]  # group 0 votes 7; group 1 has nothing parseable
    rewards = fn(["p"] * 8, completions, answer=["9"] * 8, log_metric=logged.__setitem__)
    assert rewards == [1.0, 1.0, 0.0, 0.0, None, None, None, None]  # the dataset's answer column is never read
    assert fn.unscorable == [False] * 4 + [True] * 4
    assert logged == {"reward/majority_vote/label_share": 0.5, "reward/majority_vote/unanimous_frac": 0.0,
                      "reward/majority_vote/unparseable_frac": 5 / 8, "reward/majority_vote/skipped_group_frac": 0.5}
    assert fn.__name__ == "majority_vote"


def test_extractor_errors_name_the_row():
    import pytest

    from trainer.rewards import MajorityVoteReward, RewardFunctionError

    class Broken(_Task):
        @staticmethod
        def extract(text):
            if text == "boom":
                raise ValueError("bad")
            return text

    with pytest.raises(RewardFunctionError, match="row 1"):
        MajorityVoteReward(Broken(), 2)(["p", "p"], ["1", "boom"])
