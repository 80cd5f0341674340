"""TIP objective (``specs/tip_opd.md``): the §9 test vectors, a slow reference for the selection, the divergences
against TRL 1.16's chunked kernel, and the reduction of the loss to TRL's ``_chunked_divergence_loss``."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from objectives import TokenBatch, build
from objectives.tip import (
    TipConfig,
    importance_weights,
    linear_quantile,
    pool_budget,
    quadrant_fractions,
    row_budgets,
    row_generators,
    tip_loss,
    tip_norm_stats,
    tip_scores,
    tip_select,
)

D = torch.float64
H1 = [0.0, 0.1, 0.2, 0.4, 1.0]
DELTA1 = [0.0, 1.0, 0.0, 0.3, 1.2]


def t(x, dtype=D):
    return torch.tensor([x], dtype=dtype)


def ones(n):
    return torch.ones(1, n, dtype=torch.bool)


def kept(mask_row):
    return set(mask_row.reshape(-1).nonzero().flatten().tolist())


def approx(x, expected, tol=1e-6):
    assert torch.allclose(torch.as_tensor(x, dtype=D).reshape(-1), torch.tensor(expected, dtype=D), atol=tol), x


# ---- T1, T2: Soft-OR, normalisation, clipping, scale invariance -------------------------------------------------
def test_t1_soft_or_normalisation_and_clipping():
    s = tip_scores(t(H1), t(DELTA1), ones(5))
    assert s.stats.h_hi == pytest.approx(0.952)
    approx(s.h_hat, [0, 0.105042, 0.210084, 0.420168, 1])
    approx(s.d_hat, [0, 0.833333, 0, 0.25, 1])
    approx(s.score, [0, 0.850840, 0.210084, 0.565126, 1])
    assert kept(tip_select(s.score, ones(5), 0.4)) == {1, 4}
    e = tip_scores(t(H1), t(DELTA1), ones(5), rule="entropy_topk")
    assert kept(tip_select(e.score, ones(5), 0.4, rule="entropy_topk")) == {3, 4}


def test_t2_scale_invariance():
    a = tip_scores(t(H1), t(DELTA1), ones(5))
    b = tip_scores(t(H1) * math.log(151936), t(DELTA1) * 7, ones(5))
    for x, y in ((a.h_hat, b.h_hat), (a.d_hat, b.d_hat), (a.score, b.score)):
        assert (x - y).abs().max() <= 1e-15
    assert torch.equal(tip_select(a.score, ones(5), 0.4), tip_select(b.score, ones(5), 0.4))
    # vocab_size only rescales h: the same selection, logged values divided by ln V
    c = tip_scores(t(H1) * math.log(50), t(DELTA1), ones(5), vocab_size=50)
    assert (c.score - a.score).abs().max() <= 1e-15 and c.stats.h_hi == pytest.approx(0.952)


# ---- T3: Q3 selector -----------------------------------------------------------------------------------------------
def test_t3_q3_score():
    fkl = t([0, 3.0, 0.1, 0.5, 2.0])
    s = tip_scores(t(H1), t(DELTA1), ones(5), rule="q3_only", forward_kl=fkl)
    approx(s.score, [0, 2.684874, 0.078992, 0.289916, 0])
    assert kept(tip_select(s.score, ones(5), 0.2, rule="q3_only")) == {1}
    # the paper's App. B.5 example: δ_fwd = 5.27 at ĥ = 0.0057 scores 5.24
    paper = tip_scores(t([0.0, 0.0057, 1.0]), t([0.0, 1.0, 0.0]), ones(3), rule="q3_only",
                       forward_kl=t([0.0, 5.27, 0.0]), entropy_clip_q=1.0)
    assert paper.score[0, 1].item() == pytest.approx(5.24, abs=0.005)
    with pytest.raises(ValueError, match="forward_kl is required"):
        tip_scores(t(H1), t(DELTA1), ones(5), rule="q3_only")


# ---- T4: divergences over 3 tokens, ours vs TRL's chunked kernel --------------------------------------------------
def test_t4_divergences_on_three_tokens():
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    p_s, p_t = torch.tensor([0.7, 0.2, 0.1], dtype=D), torch.tensor([0.5, 0.3, 0.2], dtype=D)
    h = torch.ones(1, 1, dtype=D)
    w_s, w_t = p_s.log()[:, None], p_t.log()[:, None]
    s = kernels.token_stats(h, w_s, torch.zeros(1, dtype=torch.long), teacher_hidden=h, teacher_weight=w_t,
                            divergences=("reverse_kl", "forward_kl", "jsd"), jsd_beta=0.5)
    approx(s.reverse_kl, [0.085123])
    approx(s.forward_kl, [0.092033])
    approx(s.jsd, [0.021901])
    approx(s.entropy, [0.801819])
    assert s.entropy.item() / math.log(3) == pytest.approx(0.729847, abs=1e-6)
    assert math.log(0.7 / 0.5) == pytest.approx(0.336472, abs=1e-6)  # the sampled-token term: not the TIP score
    assert abs(s.reverse_kl.item() - 0.336472) > 0.2
    h32, ws32, wt32 = h.float(), w_s.float(), w_t.float()
    for beta, expected in ((1.0, 0.085123), (0.0, 0.092033), (0.5, 0.021901)):
        div, ent = ChunkedDivergenceFunction.apply(h32, ws32, None, h32, wt32, None, beta, 1.0, 1.0, None, 1.0, None)
        assert div.item() == pytest.approx(expected, abs=1e-6) and ent.item() == pytest.approx(0.801819, abs=1e-6)


# ---- T5: loss, splits, empty rank ------------------------------------------------------------------------------------
def loss_of(rkl, mask, keep, num_items=None, cfg=None):
    batch = TokenBatch(logp=torch.zeros_like(rkl), mask=mask, reverse_kl=rkl, keep=keep, num_items=num_items)
    return tip_loss(batch, cfg or TipConfig())


def test_t5_loss_and_splits():
    rkl = t(DELTA1).requires_grad_()
    keep = torch.tensor([[False, True, False, False, True]])
    out = loss_of(rkl, ones(5), keep)
    assert out.loss.item() == pytest.approx(1.1)
    out.loss.backward()
    approx(rkl.grad, [0, 0.5, 0, 0, 0.5])
    approx(out.token_weights, [0, 1, 0, 0, 1])
    # two micro-batches (or two DDP ranks, each ÷ N_K/W and averaged): the same loss and gradient
    two = torch.cat([t(DELTA1), t(DELTA1)]).requires_grad_()
    keep2 = torch.cat([keep, torch.zeros_like(keep)])
    whole = loss_of(two, torch.ones(2, 5, dtype=torch.bool), keep2)
    g_whole = torch.autograd.grad(whole.loss, two)[0]
    parts = [loss_of(two[i : i + 1], ones(5), keep2[i : i + 1], num_items=2.0) for i in range(2)]
    assert sum(p.loss for p in parts).item() == pytest.approx(whole.loss.item())
    g_parts = torch.autograd.grad(sum(p.loss for p in parts), two)[0]
    assert torch.allclose(g_parts, g_whole)
    # the second rank keeps nothing: a connected zero with zero gradient
    empty = loss_of(two[1:], ones(5), keep2[1:], num_items=2.0)
    assert empty.loss.item() == 0.0 and empty.loss.requires_grad
    assert torch.equal(torch.autograd.grad(empty.loss, two)[0], torch.zeros_like(two))


# ---- T6: floor budgets and an empty step ------------------------------------------------------------------------------
def test_t6_floor_budgets_and_empty_step():
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert row_budgets(mask, 0.5).tolist() == [0, 1, 2]
    assert row_budgets(torch.ones(1, 100, dtype=torch.bool), 0.29).tolist() == [29]
    assert math.floor(0.29 * 100) == 28  # the plain floor is wrong
    assert pool_budget(3, 0.1) == 1 and pool_budget(0, 0.5) == 0
    rkl = torch.rand(3, 1, dtype=D, requires_grad=True)
    one_token = torch.ones(3, 1, dtype=torch.bool)
    batch = TokenBatch(logp=torch.zeros(3, 1, dtype=D), mask=one_token, entropy=torch.rand(3, 1, dtype=D),
                       reverse_kl=rkl)
    out = tip_loss(batch, TipConfig(keep=0.5))
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    assert out.metrics["skipped_step"] == 1.0 and out.metrics["zero_budget_rollout_frac"] == 1.0
    assert not out.sample_keep.any()


# ---- T7, T8: entropy sampling and importance weights --------------------------------------------------------------------
def test_t7_entropy_sampling_frequencies():
    h = t(H1)
    s = tip_scores(h, t(DELTA1), ones(5), rule="entropy_sample")
    p = s.score / s.score.sum()
    approx(p, [5.9e-9, 0.058824, 0.117647, 0.235294, 0.588235], tol=1e-7)
    n = 100_000
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(5, dtype=D)
    # Gumbel-top-k with k = 1 on n independent rows (one generator, row-major noise)
    rows = s.score.expand(n, 5)
    picks = tip_select(rows, torch.ones(n, 5, dtype=torch.bool), 0.2, rule="entropy_sample", generator=g)
    counts += picks.sum(0).double()
    multi = torch.multinomial(p.reshape(-1).float(), n, replacement=True, generator=torch.Generator().manual_seed(1))
    ref = torch.bincount(multi, minlength=5).double()
    assert torch.allclose(counts / n, p.reshape(-1), atol=0.01)
    assert torch.allclose(ref / n, p.reshape(-1), atol=0.01)
    assert picks.sum(1).eq(1).all()
    everything = tip_select(s.score, ones(5), 1.0, rule="entropy_sample", generator=g)
    assert everything.all()
    # all-zero entropies sample uniformly (weights all 1e-8)
    z = tip_scores(torch.zeros(n, 4, dtype=D), torch.zeros(n, 4, dtype=D), torch.ones(n, 4, dtype=torch.bool),
                   rule="entropy_sample")
    freq = tip_select(z.score, torch.ones(n, 4, dtype=torch.bool), 0.25, rule="entropy_sample", generator=g).double()
    assert torch.allclose(freq.mean(0), torch.full((4,), 0.25, dtype=D), atol=0.01)


def test_entropy_sampling_is_deterministic_per_rollout_whatever_the_layout():
    h = torch.rand(6, 8, dtype=D)
    mask = torch.rand(6, 8) < 0.8
    s = tip_scores(h, torch.rand(6, 8, dtype=D), mask, rule="entropy_sample")
    ids = torch.arange(10, 16)
    whole = tip_select(s.score, mask, 0.5, rule="entropy_sample", generator=row_generators(3, 7, ids))
    parts = [tip_select(s.score[i : i + 2], mask[i : i + 2], 0.5, rule="entropy_sample",
                        generator=row_generators(3, 7, ids[i : i + 2])) for i in (4, 0, 2)]
    assert torch.equal(whole, torch.cat([parts[1], parts[2], parts[0]]))
    # a longer padded row draws the same noise at the common positions
    padded = tip_select(torch.cat([s.score, torch.zeros(6, 3, dtype=D)], 1),
                        torch.cat([mask, torch.zeros(6, 3, dtype=torch.bool)], 1), 0.5, rule="entropy_sample",
                        generator=row_generators(3, 7, ids))
    assert torch.equal(padded[:, :8], whole)


def test_t8_importance_weights():
    keep = torch.tensor([[False, False, False, True, True]])
    omega = importance_weights(t(H1), keep, ones(5), 0.4)
    approx(omega, [0, 0, 0, 2.125, 0.85])
    cfg = TipConfig(rule="entropy_sample", keep=0.4, importance_weighting=True)
    batch = TokenBatch(logp=torch.zeros(1, 5, dtype=D), mask=ones(5), entropy=t(H1), reverse_kl=t(DELTA1), keep=keep)
    out = tip_loss(batch, cfg)
    assert out.loss.item() == pytest.approx(0.3315) and t(DELTA1).mean().item() == pytest.approx(0.5)
    assert out.metrics["iw_max"] == pytest.approx(2.125)


# ---- T9: scope matters ---------------------------------------------------------------------------------------------------
def test_t9_global_statistics_differ_from_micro_batch_scope():
    h = torch.tensor([H1, [0.3, 0.3, 0, 0, 0]], dtype=D)
    d = torch.tensor([DELTA1, [10.0, 0, 0, 0, 0]], dtype=D)
    mask = torch.tensor([[1] * 5, [1, 1, 0, 0, 0]], dtype=torch.bool)
    s = tip_scores(h, d, mask)
    assert s.stats.h_hi == pytest.approx(0.928)
    approx(s.h_hat[0], [0, 0.107759, 0.215517, 0.431034, 1])
    approx(s.d_hat[0], [0, 0.1, 0, 0.03, 0.12])
    approx(s.score[0], [0, 0.196983, 0.215517, 0.448103, 1])
    keep = tip_select(s.score, mask, 0.4)
    assert kept(keep[0]) == {3, 4} and not keep[1].any()
    assert loss_of(d, mask, keep).loss.item() == pytest.approx(0.75)
    # A alone (micro_batch scope)
    a = TokenBatch(logp=torch.zeros(1, 5, dtype=D), mask=ones(5), entropy=t(H1), reverse_kl=t(DELTA1))
    out = tip_loss(a, TipConfig(keep=0.4, norm_scope="micro_batch"))
    assert out.loss.item() == pytest.approx(1.1) and out.metrics["norm_scope_exact"] == 0.0
    # the global result is the same with B's stats from another micro-batch (stats passed in)
    sa = tip_scores(h[:1], d[:1], mask[:1], stats=s.stats)
    assert torch.equal(tip_select(sa.score, mask[:1], 0.4), keep[:1])


# ---- T10: quadrants ------------------------------------------------------------------------------------------------------
def test_t10_quadrants():
    s = tip_scores(t(H1), t(DELTA1), ones(5))
    assert s.stats.tau_h == pytest.approx(0.210084, abs=1e-6) and s.stats.tau_d == pytest.approx(0.25)
    fr = quadrant_fractions(s.h_hat, s.d_hat, ones(5), keep=torch.tensor([[0, 1, 0, 0, 1]], dtype=torch.bool))
    assert [fr[f"q{i}"] for i in range(1, 5)] == pytest.approx([0.4, 0.2, 0.2, 0.2])
    assert fr["q3_share_kept"] == 0.5
    q = tip_scores(t(H1), t(DELTA1), ones(5), rule="quadrant_mask", quadrants=("Q3",))
    assert kept(tip_select(q.score, ones(5), rule="quadrant_mask")) == {1}
    q14 = tip_scores(t(H1), t(DELTA1), ones(5), rule="quadrant_mask", quadrants=("Q1", "Q4"))
    assert kept(tip_select(q14.score, ones(5), rule="quadrant_mask")) == {0, 3, 4}


# ---- T11: invariants --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["soft_or", "entropy_topk", "div_only", "q3_only", "bottom_soft_or", "entropy_sample"])
def test_t11_keep_subset_of_mask_and_keep_one_equals_all(rule):
    g = torch.Generator().manual_seed(5)
    h, d, f = (torch.rand(7, 9, generator=g, dtype=D) for _ in range(3))
    mask = torch.rand(7, 9, generator=g) < 0.7
    kw = {"forward_kl": f} if rule == "q3_only" else {}
    s = tip_scores(h, d, mask, rule=rule, **kw)
    for keep in (0.3, 0.5):
        sel = tip_select(s.score, mask, keep, rule=rule, generator=g)
        assert not (sel & ~mask).any()
        assert torch.equal(sel.sum(-1), row_budgets(mask, keep))
    for scope in ("per_sequence", "global_batch"):
        assert torch.equal(tip_select(s.score, mask, 1.0, rule=rule, budget_scope=scope, generator=g), mask)


def test_t11_tool_tokens_never_enter_statistics():
    h, d = torch.rand(2, 6, dtype=D), torch.rand(2, 6, dtype=D)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 4:] = False  # tool tokens sit outside the loss mask
    a = tip_scores(h, d, mask)
    h2, d2 = h.clone(), d.clone()
    h2[:, 4:], d2[:, 4:] = 100.0, -5.0
    b = tip_scores(h2, d2, mask)
    assert a.stats == b.stats and torch.equal(a.score, b.score)
    assert not tip_select(b.score, mask, 0.5)[:, 4:].any()


def test_t11_no_gradient_through_scores_or_unkept_rows():
    h = torch.rand(2, 4, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match="detached"):
        tip_scores(h, torch.rand(2, 4, dtype=D), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="detached"):
        tip_norm_stats(h, torch.rand(2, 4, dtype=D), torch.ones(2, 4, dtype=torch.bool))
    # zero gradient on the hidden states of unkept rows, through the kernels
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(2, 4, 8, generator=g, dtype=D, requires_grad=True)
    ws, wt = torch.randn(11, 8, generator=g, dtype=D), torch.randn(11, 8, generator=g, dtype=D)
    ht = torch.randn(2, 4, 8, generator=g, dtype=D)
    y = torch.randint(0, 11, (2, 4), generator=g)
    keep = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    rkl = kernels.token_stats(hs, ws, y, teacher_hidden=ht, teacher_weight=wt, divergences=("reverse_kl",),
                              mask=keep).reverse_kl
    loss_of(rkl, torch.ones(2, 4, dtype=torch.bool), keep).loss.backward()
    assert hs.grad[~keep].abs().max() == 0 and hs.grad[keep].abs().min() > 0


def test_all_rule_equals_keep_one_and_the_registry_builds_it():
    g = torch.Generator().manual_seed(2)
    rkl = torch.rand(3, 5, generator=g, dtype=D)
    ent = torch.rand(3, 5, generator=g, dtype=D)
    mask = torch.rand(3, 5, generator=g) < 0.8
    batch = TokenBatch(logp=torch.zeros(3, 5, dtype=D), mask=mask, entropy=ent, reverse_kl=rkl)
    a = build("tip", rule="all")(batch)
    b = build("tip", rule="soft_or", keep=1.0)(batch)
    assert a.loss.item() == pytest.approx(b.loss.item()) == pytest.approx(rkl[mask].mean().item())


def test_config_validation():
    with pytest.raises(ValueError, match="leave it unset"):
        TipConfig(rule="all", keep=0.5)
    with pytest.raises(ValueError, match="leave it unset"):
        TipConfig(rule="quadrant_mask", keep=0.2)
    with pytest.raises(ValueError, match="fraction"):
        TipConfig(keep=0.0)
    with pytest.raises(ValueError, match="budget_scope must be one of"):
        TipConfig(budget_scope="per_rank")
    with pytest.raises(ValueError, match="one of soft_or|rule must be one of"):
        TipConfig(rule="soft-or")
    with pytest.raises(ValueError, match="importance_weighting"):
        TipConfig(rule="soft_or", importance_weighting=True)
    with pytest.raises(ValueError, match="budget_scope must be one of"):
        tip_select(torch.zeros(1, 2), ones(2), 0.5, budget_scope="per_rank")


def test_non_finite_statistics_name_the_first_position():
    h = torch.rand(2, 3, dtype=D)
    h[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"1 non-finite value.*row 1, position 2"):
        tip_scores(h, torch.rand(2, 3, dtype=D), torch.ones(2, 3, dtype=torch.bool))
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False  # padding may hold anything
    tip_scores(h, torch.rand(2, 3, dtype=D), mask)


def test_constant_axis_is_zero_and_soft_or_reduces_to_the_other():
    h = torch.full((1, 6), 0.7, dtype=D)
    d = t([0.1, 0.5, 0.3, 0.9, 0.2, 0.0])
    s = tip_scores(h, d, ones(6))
    assert s.h_hat.abs().max() == 0 and torch.allclose(s.score, s.d_hat)
    # ≥ 98 % of tokens at the minimum entropy: q = min h, so ĥ ≡ 0
    h2 = torch.zeros(1, 100, dtype=D)
    h2[0, -1] = 5.0
    assert tip_scores(h2, torch.rand(1, 100, dtype=D), ones(100)).h_hat.abs().max() == 0


def test_linear_quantile_matches_torch():
    x = torch.rand(1000, dtype=D)
    for q in (0.0, 0.25, 0.5, 0.98, 1.0):
        assert linear_quantile(x, q) == pytest.approx(torch.quantile(x, q).item(), abs=1e-12)


# ---- a slow reference for the selection --------------------------------------------------------------------------------
def reference_select(score, mask, keep, scope):
    """Sort (−score, rollout, position) in Python and take the budget."""
    rows, cols = mask.shape
    out = torch.zeros_like(mask)
    if scope == "per_sequence":
        for i in range(rows):
            cand = sorted((-float(score[i, j]), j) for j in range(cols) if mask[i, j])
            for _, j in cand[: math.floor(keep * len(cand) + 1e-9)]:
                out[i, j] = True
    else:
        cand = sorted((-float(score[i, j]), i, j) for i in range(rows) for j in range(cols) if mask[i, j])
        for _, i, j in cand[: pool_budget(len(cand), keep)]:
            out[i, j] = True
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 7), st.sampled_from([0.1, 0.29, 0.5, 0.8, 1.0]),
       st.sampled_from(["per_sequence", "global_batch"]), st.integers(0, 10_000))
def test_selection_matches_a_slow_reference(rows, cols, keep, scope, seed):
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 4, (rows, cols), generator=g).double() / 4  # many ties
    mask = torch.rand(rows, cols, generator=g) < 0.75
    assert torch.equal(tip_select(score, mask, keep, budget_scope=scope), reference_select(score, mask, keep, scope))


# ---- reduction to TRL 1.16's distillation loss --------------------------------------------------------------------------
def trl_setup(seed=0, B=3, T=7, d=16, V=50):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, T, d, generator=g)
    ht = torch.randn(B, T, d + 4, generator=g)
    ws = torch.randn(V, d, generator=g) * 0.5
    wt = torch.randn(V, d + 4, generator=g) * 0.5
    y = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor([[7], [4], [1]])).long()
    return hs, ht, ws, wt, y, mask


def ours(hs, ht, ws, wt, y, mask, keep, num_items, cfg):
    hs, ws = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    stats = kernels.token_stats(hs, ws, y, mask=keep & mask.bool(), teacher_hidden=ht, teacher_weight=wt,
                                divergences=("reverse_kl",))
    batch = TokenBatch(logp=stats.logp, mask=mask, reverse_kl=stats.reverse_kl, keep=keep, num_items=num_items)
    loss = tip_loss(batch, cfg).loss
    return (loss, *torch.autograd.grad(loss, (hs, ws)))


def theirs(hs, ht, ws, wt, mask, num_items):
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    hs, ws = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    loss = _chunked_divergence_loss(hs, ht, ws, wt, mask, beta=1.0, num_items_in_batch=num_items)[0]
    return (loss, *torch.autograd.grad(loss, (hs, ws)))


def close(a, b):
    assert abs(a[0].item() - b[0].item()) <= 1e-6 * max(1.0, abs(b[0].item()))
    for x, y in zip(a[1:], b[1:], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world", [1, 2])
def test_rule_all_equals_trl_distillation_loss(world):
    hs, ht, ws, wt, y, mask = trl_setup()
    n = float(mask.sum())
    keep = mask.bool()
    for cfg in (TipConfig(rule="all"), TipConfig(rule="soft_or", keep=1.0)):
        close(ours(hs, ht, ws, wt, y, mask, keep, n / world, cfg), theirs(hs, ht, ws, wt, mask, n / world))


def test_any_kept_subset_equals_trl_on_the_kept_mask():
    hs, ht, ws, wt, y, mask = trl_setup(seed=1)
    keep = (torch.rand(mask.shape, generator=torch.Generator().manual_seed(3)) < 0.5) & mask.bool()
    nk = float(keep.sum())
    close(ours(hs, ht, ws, wt, y, mask, keep, nk / 2, TipConfig()), theirs(hs, ht, ws, wt, keep.long(), nk / 2))
