"""D³S (specs/d3s.md §9: D1–D9, D4p brute force, D10 micro-batch invariance) and its reduction to TRL 1.16."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import objectives
from objectives import TokenBatch
from objectives.d3s import (
    D3SConfig,
    ceil_tol,
    d3s_loss,
    d3s_select,
    maxvar_subset,
    schedule,
    select_samples,
    select_tokens,
)
from tests.test_grpo_objective import LOSS_TYPES, spec_tensors
from tests.trl_standin import assert_same_as_trl, trl_loss

D = torch.float64


def trl_advantages(rewards):
    r = torch.tensor(rewards, dtype=D)
    return (r - r.mean()) / (r.std() + 1e-4)


def pop_var(x):
    return float(torch.as_tensor(x, dtype=D).var(unbiased=False))


def test_d1_intra_group():
    adv = trl_advantages([1, 1, 1, 0, 0, 0, 0, 0])
    assert adv[:3].tolist() == pytest.approx([1.207381] * 3, abs=1e-6)
    kept = maxvar_subset(adv, 4)
    assert kept.tolist() == [0, 1, 3, 4]
    assert pop_var(adv[kept]) == pytest.approx(0.932973, abs=1e-6)
    assert pop_var(adv) == pytest.approx(0.874662, abs=1e-6)
    pop = (adv - adv.mean()) / adv.std(unbiased=False)
    assert pop_var(pop[maxvar_subset(pop, 4)]) == pytest.approx(1.066667, abs=1e-6)


def test_d2_all_equal():
    assert maxvar_subset(torch.zeros(8, dtype=D), 4).tolist() == [0, 1, 2, 3]


def test_d3_pipeline():
    adv = torch.tensor([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0, 0.9, 0.9, -0.9, -0.9], dtype=D)
    groups = torch.arange(12) // 4
    intra = select_samples(adv, groups, 2, cross_group_frac=None)
    assert intra.nonzero().flatten().tolist() == [0, 1, 4, 5, 8, 10]
    keep = select_samples(adv, groups, 2, cross_group_frac=0.5)
    assert keep.nonzero().flatten().tolist() == [0, 1, 10]
    pool = adv[intra]
    best = max(itertools.combinations(range(6), 3), key=lambda c: pop_var(pool[list(c)]))
    assert pop_var(pool[list(best)]) == pytest.approx(pop_var(adv[keep]))


def test_d3b_one_stage_over_zeros():
    pop = torch.tensor([1.290994] * 3 + [-0.774597] * 5 + [0.0] * 8, dtype=D)
    assert maxvar_subset(pop, 4).tolist() == [0, 1, 3, 4]


def test_d4_optimal_vs_balanced():
    v = torch.tensor([-2.0, -1, 0, 0.5, 3], dtype=D)
    assert maxvar_subset(v, 3).tolist() == [0, 1, 4]
    assert maxvar_subset(v, 3, "balanced").tolist() == [0, 3, 4]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-4, 4), min_size=1, max_size=12), st.integers(0, 13), st.booleans())
def test_d4p_maxvar_equals_brute_force(ints, m, scale):
    v = torch.tensor(ints, dtype=D) * (0.37 if scale else 1.0)  # integer grid: plenty of ties
    got = maxvar_subset(v, m)
    n = v.numel()
    assert got.tolist() == sorted(set(got.tolist())) and len(got) == min(max(m, 0), n)
    if 0 < m < n:
        best = max(pop_var(v[list(c)]) for c in itertools.combinations(range(n), m))
        assert pop_var(v[got]) == pytest.approx(best, abs=1e-9)


def test_d5_tokens_ties_by_index():
    adv = torch.tensor([1.0, -0.5], dtype=D)
    h = torch.tensor([[0.1, 2.0, 0.5, 9.9], [3.0, 0.2, 1.0, 0.4]], dtype=D)
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert select_tokens(adv, h, m, 0.3).tolist() == [[False, True, True, False], [True, False, False, False]]


def test_d5b_pooled_vs_per_sequence():
    adv = torch.tensor([1.0, -0.5], dtype=D)
    h = torch.tensor([[2.0, 1.8, 0.5, 0.0], [2.2, 0.2, 1.0, 0.4]], dtype=D)
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert select_tokens(adv, h, m, 0.3).tolist() == [[True, True, False, False], [True, False, False, False]]
    assert select_tokens(adv, h, m, 0.3, "per_sequence").tolist() == [[True, False, False, False],
                                                                       [True, False, True, False]]


def test_d6_schedule_and_rounding():
    assert schedule(0, 4, 8, 0.2, 0.5) == (4, 0.2)
    n, k = schedule(0.5, 4, 8, 0.2, 0.5)
    assert n == 6 and k == pytest.approx(0.35)
    assert schedule(1, 4, 8, 0.2, 0.5) == (8, 0.5)
    assert schedule(1.5, 4, 8, 0.2, 0.5) == (8, 0.5)
    assert schedule(-0.2, 4, 8, 0.2, 0.5) == (4, 0.2)
    assert schedule(0.5, 4, 7, 0.2, 0.5)[0] == 6
    assert ceil_tol(0.14 * 50) == 7
    assert select_tokens(torch.ones(1, dtype=D), torch.rand(1, 50, dtype=D) + 0.1, torch.ones(1, 50), 0.14).sum() == 7


def d7_batch(**counts):
    logp = torch.zeros(3, 3, dtype=D, requires_grad=True)
    return TokenBatch(logp=logp, mask=torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]]),
                      advantages=torch.tensor([1.0, -0.5, 0.7], dtype=D), sample_keep=torch.tensor([True, True, False]),
                      keep=torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool), **counts)


@pytest.mark.parametrize("loss_type, normalizer, value", [
    ("dapo", "selected", -0.5), ("dapo", "valid", -0.3), ("grpo", "selected", -0.25), ("grpo", "valid", -0.208333),
    ("dr_grpo", "selected", -0.25), ("dr_grpo", "valid", -0.25),
])
def test_d7_normalisers(loss_type, normalizer, value):
    cfg = D3SConfig(n_init=2, n_final=2, loss_type=loss_type, token_normalizer=normalizer, max_completion_length=3)
    assert d3s_loss(d7_batch(), cfg).loss.item() == pytest.approx(value, abs=1e-6)
    # the same through the step selection's global counts
    step = d7_batch()
    sel = d3s_select(TokenBatch(logp=step.logp, mask=step.mask, advantages=step.advantages,
                                sample_keep=step.sample_keep, old_entropy=torch.ones(3, 3, dtype=D)),
                     D3SConfig(n_init=2, n_final=2, k_init=1.0, k_final=1.0, token_normalizer=normalizer))
    expected = {"selected": 8.0 - 3.0, "valid": 5.0}[normalizer]  # k = 1: W = valid tokens of kept samples
    assert sel.counts == {"n_tokens_global": expected, "n_seqs_global": 2.0}


def test_d8_zero_scores():
    adv = torch.tensor([0.0, 1.0], dtype=D)
    h = torch.tensor([[1.0, 2.0], [0.5, 0.0]], dtype=D)
    m = torch.ones(2, 2)
    assert select_tokens(adv, h, m, 0.5).tolist() == [[True, False], [True, False]]
    assert select_tokens(adv, h, m, 0.5, drop_zero_score=True).tolist() == [[False, False], [True, False]]


D9_TOKEN = {"grpo": -0.1919777461, "bnpo": -0.2576449460, "dr_grpo": -0.1932337095, "dapo": -0.2576449460}
D9_SEQ = {"grpo": -0.2248808515, "bnpo": -0.2963761343, "dr_grpo": -0.2222821007, "dapo": -0.2963761343}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("normalizer", ["selected", "valid"])
def test_d9_reduction_equals_trl(loss_type, level, normalizer):
    logp, old, mask, adv, ent, _ = spec_tensors()
    cfg = D3SConfig(n_init=3, n_final=3, k_init=1.0, k_final=1.0, cross_group_frac=1.0, loss_type=loss_type,
                    importance_sampling_level=level, token_normalizer=normalizer, max_completion_length=4)
    out = assert_same_as_trl(
        lambda x: d3s_loss(TokenBatch(logp=x, mask=mask, advantages=adv, old_logp=old, old_entropy=ent,
                                      group_ids=torch.zeros(3, dtype=torch.long)), cfg),
        lambda x: trl_loss(x, old, mask, adv, ent, loss_type=loss_type, importance_sampling_level=level),
        logp, atol=1e-15)
    assert out.loss.item() == pytest.approx((D9_TOKEN if level == "token" else D9_SEQ)[loss_type], abs=1e-9)
    assert out.sample_keep.all() and torch.equal(out.token_weights, mask.to(D))


def random_step(seed, B=16, T=7, G=4):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=D) * 3
    rewards = (torch.rand(B, generator=g) < 0.5).to(D)
    adv = torch.cat([trl_advantages(rewards[i : i + G].tolist()) for i in range(0, B, G)])
    adv = torch.nan_to_num(adv)
    return dict(
        logp=logp,
        old_logp=logp + 0.2 * torch.randn(B, T, generator=g, dtype=D),
        mask=(torch.rand(B, T, generator=g) < 0.8).long(),
        advantages=adv,
        old_entropy=torch.rand(B, T, generator=g, dtype=D),
        group_ids=torch.arange(B) // G,
        progress=0.4,
    )


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_d10_micro_batch_split_is_invariant(loss_type, level):
    """1×B == B×1 (and 2×B/2): the step's selection + global counts make micro-batch shares add up exactly."""
    step = random_step(0)
    cfg = D3SConfig(num_generations=4, loss_type=loss_type, importance_sampling_level=level,
                    max_completion_length=7)
    logp = step.pop("logp").requires_grad_()
    whole = d3s_loss(TokenBatch(logp=logp, **step), cfg)
    (g_whole,) = torch.autograd.grad(whole.loss, logp)
    sel = d3s_select(TokenBatch(logp=logp.detach(), **step), cfg)
    assert torch.equal(sel.rows["keep"], whole.token_weights.bool())
    B = logp.shape[0]
    for size in (1, 2, B):
        total = 0.0
        for start in range(0, B, size):
            sl = slice(start, start + size)
            rows = {k: v[sl] for k, v in step.items() if torch.is_tensor(v)}
            part = TokenBatch(logp=logp[sl], **rows, progress=step["progress"],
                              **{k: v[sl] for k, v in sel.rows.items()}, **sel.counts)
            total = total + d3s_loss(part, cfg).loss
        (g_split,) = torch.autograd.grad(total, logp)
        assert abs(total.item() - whole.loss.item()) < 1e-12
        torch.testing.assert_close(g_split, g_whole, rtol=0, atol=1e-12)
    dropped_rows = ~sel.rows["sample_keep"]
    unselected = ~sel.rows["keep"]
    assert g_whole[dropped_rows].abs().sum() == 0 and g_whole[unselected].abs().sum() == 0
    assert dropped_rows.any() and (sel.rows["keep"].sum() < step["mask"].sum())


def test_selection_metrics_and_schedule():
    step = random_step(1)
    cfg = D3SConfig(num_generations=4)
    assert (cfg.n_init, cfg.n_final) == (2, 2)
    early = d3s_select(TokenBatch(**{**step, "progress": 0.0}), cfg)
    late = d3s_select(TokenBatch(**{**step, "progress": 1.0}), cfg)
    assert early.metrics["keep_frac"] == pytest.approx(0.2) and late.metrics["keep_frac"] == pytest.approx(0.5)
    assert early.rows["keep"].sum() < late.rows["keep"].sum()
    m = early.metrics
    assert m["adv_var_kept"] >= m["adv_var_all"] - 1e-12 and m["useful_frac_kept"] >= m["useful_frac_all"]
    for key in ("kept_sample_frac", "kept_token_frac", "kept_token_frac_of_kept", "score_threshold",
                "entropy_kept_mean", "entropy_dropped_mean", "score_kept_mean", "zero_signal_step", "cross_budget"):
        assert key in m


def test_errors_name_the_cause():
    with pytest.raises(ValueError, match=">= 2"):
        D3SConfig(n_init=1)
    with pytest.raises(ValueError, match="cross_group_frac"):
        D3SConfig(cross_group_frac=0.0)
    with pytest.raises(ValueError, match="token_scope"):
        D3SConfig(token_scope="per_token")
    with pytest.raises(ValueError, match="row 1"):
        select_tokens(torch.tensor([1.0, float("nan")]), torch.ones(2, 2), torch.ones(2, 2), 0.5)
    with pytest.raises(ValueError, match="group_ids"):
        d3s_loss(TokenBatch(logp=torch.zeros(2, 2), mask=torch.ones(2, 2), advantages=torch.ones(2),
                            old_entropy=torch.ones(2, 2)), D3SConfig(num_generations=2))
    obj = objectives.build("d3s", num_generations=8)
    assert (obj.config.n_init, obj.config.n_final) == (2, 4) and obj.needs_step_selection(1)


def test_token_masks_against_slow_reference():
    """select_tokens == a loop that lists each unit's valid tokens, sorts by (−score, row, position), keeps ⌈ρn⌉."""
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        B, T = 5, 6
        adv = torch.randint(-2, 3, (B,), generator=g).to(D) / 2  # zeros and ties
        h = torch.randint(0, 4, (B, T), generator=g).to(D) / 2
        m = (torch.rand(B, T, generator=g) < 0.7).long()
        groups = torch.tensor([0, 0, 1, 1, 2])
        keep = float(torch.rand(1, generator=g))
        for scope in ("global_batch", "per_sequence", "per_group"):
            unit = {"per_sequence": torch.arange(B), "per_group": groups, "global_batch": torch.zeros(B)}[scope]
            want = torch.zeros(B, T, dtype=torch.bool)
            for u in unit.unique():
                tokens = [(-abs(adv[i].item()) * h[i, t].item(), i, t) for i in range(B) for t in range(T)
                          if unit[i] == u and m[i, t]]
                k = min(len(tokens), max(1, ceil_tol(keep * len(tokens))))
                for _, i, t in sorted(tokens)[:k]:
                    want[i, t] = True
            assert torch.equal(select_tokens(adv, h, m, keep, scope, group_ids=groups), want), scope
