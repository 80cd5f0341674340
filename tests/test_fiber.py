"""FiberPO (specs/fiberpo.md §9: G0, T1–T10, T1b, C1, H1–H5, P1, R1, R2) and its reductions to TRL 1.16."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import objectives
from objectives import TokenBatch
from objectives.fiber import (
    FiberLevelContext,
    FiberPOConfig,
    fiberpo_gate_state,
    fiberpo_gated_ratio,
    fiberpo_loss,
    fiberpo_token_coefficients,
    g_agg,
)
from tests.trl_standin import assert_same_as_trl, trl_loss

D = torch.float64
INF = float("inf")


def loss_grad(ell, adv, mask=None, **cfg):
    ell = torch.as_tensor(ell, dtype=D)
    mask = torch.ones_like(ell) if mask is None else torch.as_tensor(mask)
    logp = ell.clone().requires_grad_()
    out = fiberpo_loss(TokenBatch(logp=logp, mask=mask, advantages=torch.as_tensor(adv, dtype=D),
                                  old_logp=torch.zeros_like(ell)), FiberPOConfig(**cfg))
    out.loss.backward()
    return out, logp.grad


def test_g0_gate_values_and_slopes():
    x = torch.tensor([0.1, 0.2, 0.22, -0.22, 0.24, 0.25, 0.3], dtype=D, requires_grad=True)
    y = g_agg(x, 0.2, 4)
    assert y.tolist() == pytest.approx([0.1, 0.2, 0.12, -0.12, 0.04, 0, 0], abs=1e-12)
    y.sum().backward()
    assert x.grad.tolist() == [1, 1, -4, -4, -4, 0, 0]


def test_t1_on_policy_is_the_policy_gradient():
    out, grad = loss_grad(torch.zeros(2, 4), [1.0, -0.5], eps=0.05, c_pos=0.01, c_neg=0.3)
    assert out.loss.item() == pytest.approx(-0.25)
    assert grad[0].tolist() == [-0.125] * 4 and grad[1].tolist() == [0.0625] * 4
    assert out.token_weights.tolist() == [[1.0] * 4, [-0.5] * 4]
    assert out.metrics["on_policy_token_frac"] == 1.0


def test_t1b_three_valued_sign_would_triple_the_gradient():
    """The bug of the code attributed to the authors, rebuilt here: sign(0) = 0 and clamp-based channel means."""
    ell = torch.zeros(2, 4, dtype=D, requires_grad=True)
    adv = torch.tensor([1.0, -0.5], dtype=D)[:, None]
    P = ell.clamp(min=0).mean(-1, keepdim=True)
    N = (-ell).clamp(min=0).mean(-1, keepdim=True)
    sign = torch.sign(ell.detach())
    log_w = P - N  # both channels pass
    n = ell - torch.where(sign > 0, P, torch.where(sign < 0, -N, torch.zeros_like(P)))
    log_g = log_w + n.clamp(-0.2, 0.2)
    (-(log_g.exp() * adv).mean(-1).mean()).backward()
    assert ell.grad[0].tolist() == pytest.approx([-0.375] * 4) and ell.grad[1].tolist() == pytest.approx([0.1875] * 4)
    _, ours = loss_grad(torch.zeros(2, 4), [1.0, -0.5])
    assert not torch.allclose(ours, ell.grad)  # ours is the plain policy gradient (T1), a third of it


def test_t2_pass_is_exact():
    st_ = fiberpo_gate_state(torch.tensor([[0.10, -0.05, 0.02, -0.03]], dtype=D), torch.ones(1, 4))
    assert (st_.P.item(), st_.N.item(), st_.log_w.item()) == pytest.approx((0.03, 0.02, 0.01))
    assert st_.gated_ratio.log().tolist()[0] == pytest.approx([0.10, -0.05, 0.02, -0.03], abs=1e-15)


def test_t3_token_spike():
    out, grad = loss_grad([[0.8, 0, 0, 0]], [1.0], eps=0.25, c_pos=0.25, c_neg=0.25)
    assert out.loss.item() == pytest.approx(-1.142078, abs=1e-6)
    assert grad[0].tolist() == pytest.approx([-0.098020, -0.348020, -0.348020, -0.348020], abs=1e-6)
    assert out.token_weights[0].tolist() == pytest.approx([0.392078, 1.392078, 1.392078, 1.392078], abs=1e-6)
    jac = torch.autograd.functional.jacobian(
        lambda x: fiberpo_gated_ratio(x, torch.ones(1, 4), eps=0.25, c_pos=0.25, c_neg=0.25).log(),
        torch.tensor([[0.8, 0, 0, 0]], dtype=D))[0, :, 0, :]
    assert jac[0].tolist() == pytest.approx([0.25] * 4) and torch.allclose(jac[1:, 1:], torch.eye(3, dtype=D))


def test_t4_rollback_is_restorative():
    out, grad = loss_grad([[0.22] * 4], [1.0])
    assert out.loss.item() == pytest.approx(-1.127497, abs=1e-6)
    assert grad[0].tolist() == pytest.approx([1.127497] * 4, abs=1e-6)  # positive: pulls the drift back
    assert out.token_weights[0].tolist() == pytest.approx([-4.509987] * 4, abs=1e-6)
    assert out.metrics["restorative_token_frac"] == 1.0 and out.metrics["base/pos_rollback_frac"] == 1.0


def test_t5_t6_zeroed_and_cancelling_drift():
    out, grad = loss_grad([[0.3] * 4], [1.0])
    assert out.loss.item() == pytest.approx(-1.0) and grad.abs().sum() == 0
    out, grad = loss_grad([[0.9, 0.9, -0.9, -0.9]], [1.0])
    assert out.loss.item() == pytest.approx(-1.081072, abs=1e-6) and grad.abs().sum() == 0
    assert out.metrics["traj_fully_censored_frac"] == 1.0 and out.metrics["regime/G3_frac"] == 1.0
    assert not out.sample_keep.any()


def test_t7_jacobian_block_diagonal_over_trajectories():
    g = torch.Generator().manual_seed(0)
    ell = 0.1 * torch.randn(3, 5, generator=g, dtype=D)
    jac = torch.autograd.functional.jacobian(
        lambda x: fiberpo_gated_ratio(x, torch.ones(3, 5), eps=0.1, c_pos=0.05, c_neg=0.05).log(), ell)
    for a, b in itertools.permutations(range(3), 2):
        assert jac[a, :, b, :].abs().max() == 0


def test_t8_limits():
    g = torch.Generator().manual_seed(1)
    ell = 0.5 * torch.randn(4, 6, generator=g, dtype=D)
    m = torch.ones(4, 6)
    seq = fiberpo_gated_ratio(ell, m, eps=0.0, c_pos=INF, c_neg=INF)
    torch.testing.assert_close(seq, ell.mean(-1, keepdim=True).exp().expand_as(ell), rtol=0, atol=1e-15)
    torch.testing.assert_close(fiberpo_gated_ratio(ell, m, eps=INF, c_pos=INF, c_neg=INF), ell.exp(), rtol=0,
                               atol=1e-15)


def test_t9_all_clipped_is_sequence_level():
    out, grad = loss_grad([[0.6, -0.6, 0, 0]], [1.0], eps=0.1)
    assert out.loss.item() == pytest.approx(-1.010033, abs=1e-6)
    assert grad[0].tolist() == pytest.approx([-0.252508] * 4, abs=1e-6)
    assert out.metrics["regime/L3_frac"] == 1.0


def test_t10_single_token_rows_and_empty_row():
    out, grad = loss_grad([[0.15], [0.3], [-0.5], [0.7]], [1.0] * 4, mask=[[1], [1], [1], [0]])
    assert out.loss.item() == pytest.approx(-1.089002, abs=1e-6)
    assert grad[:, 0].tolist() == pytest.approx([-0.387278, 0.368390, 0, 0], abs=1e-6)
    assert out.sample_keep.tolist() == [True, True, False, False]


def random_case(g, B=4, T=6, scale=0.3):
    ell = scale * torch.randn(B, T, generator=g, dtype=D)
    mask = (torch.rand(B, T, generator=g) < 0.8).long()
    mask[:, 0] = 1
    adv = torch.randn(B, T, generator=g, dtype=D) if torch.rand(1, generator=g) < 0.3 else torch.randn(
        B, generator=g, dtype=D)
    return ell, mask, adv


def test_c1_closed_form_coefficients_equal_autograd():
    g = torch.Generator().manual_seed(2)
    regimes = set()
    for i in range(300):
        ell, mask, adv = random_case(g, scale=[0.02, 0.15, 0.4][i % 3])
        kw = {"eps": [0.05, 0.1, 0.2][i % 3], "c_pos": [0.05, 0.1, 0.2][(i // 3) % 3], "c_neg": 0.08}
        closed = fiberpo_token_coefficients(ell, mask, adv, **kw)
        leaf = ell.clone().requires_grad_()
        out = fiberpo_loss(TokenBatch(logp=leaf, mask=mask, advantages=adv, old_logp=torch.zeros_like(ell)),
                           FiberPOConfig(**kw))
        out.loss.backward()
        torch.testing.assert_close(closed, -leaf.grad, rtol=0, atol=1e-15)
        st_ = fiberpo_gate_state(ell, mask, **kw)
        regimes |= set(st_.regime[-1][0].tolist()) | set(st_.regime[-1][1].tolist())
    assert regimes == {0, 1, 2}  # pass, rollback and zeroed were all exercised


H1 = torch.tensor([[0.1, 0.1], [0.3, 0.3]], dtype=D)


@pytest.mark.parametrize("c, log_w", [(0.25, [0.10, 0.30]), (0.15, [-0.10, 0.10]), (0.19, [0.05, 0.25])])
def test_h1_domain_gate(c, log_w):
    ones = torch.zeros(2, dtype=torch.long)
    st_ = fiberpo_gate_state(H1, torch.ones(2, 2), c_pos=c, c_neg=c, levels=(ones, ones))
    assert st_.log_w.tolist() == pytest.approx(log_w, abs=1e-12)
    if c == 0.15:
        assert fiberpo_gate_state(H1, torch.ones(2, 2), c_pos=c, c_neg=c).log_w.tolist() == pytest.approx([0.1, 0])


def test_h2_h3_singleton_and_duplicated_levels():
    g = torch.Generator().manual_seed(3)
    ell, mask, _ = random_case(g)
    mask[3, 2:] = 0
    kw = {"eps": 0.1, "c_pos": 0.1, "c_neg": 0.06}
    two = fiberpo_gated_ratio(ell, mask, **kw)
    rows = torch.arange(4)
    assert torch.equal(fiberpo_gated_ratio(ell, mask, levels=(rows, rows), **kw), two)
    dom, grp = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 2, 2])
    base = fiberpo_gated_ratio(ell, mask, levels=(dom, grp), **kw)
    for levels in ((dom, dom, grp), (dom, grp, grp)):
        torch.testing.assert_close(fiberpo_gated_ratio(ell, mask, levels=levels, **kw), base, rtol=0, atol=1e-15)


def test_h4_cross_trajectory_coupling_only_when_the_domain_gate_acts():
    ones = torch.zeros(2, dtype=torch.long)

    def jac(c):
        return torch.autograd.functional.jacobian(
            lambda x: fiberpo_gated_ratio(x, torch.ones(2, 2), c_pos=c, c_neg=c, levels=(ones, ones)).log(), H1)

    assert jac(0.25)[0, 0, 1].abs().max() == 0
    assert jac(0.19)[0, 0, 1].tolist() == pytest.approx([-1.25, -1.25])
    assert jac(0.15)[0, 0, 1].tolist() == pytest.approx([-0.25, -0.25])
    assert jac(0.19)[0, 0, 0].tolist() == pytest.approx([-0.25, -1.25])
    assert jac(0.15)[0, 0, 0].tolist() == pytest.approx([0.75, -0.25])


def test_h5_on_policy_with_three_levels():
    g = torch.Generator().manual_seed(4)
    mask = (torch.rand(6, 5, generator=g) < 0.7).long()
    mask[:, 0] = 1
    adv = torch.randn(6, generator=g, dtype=D)
    logp = torch.zeros(6, 5, dtype=D, requires_grad=True)
    batch = TokenBatch(logp=logp, mask=mask, advantages=adv, domain_ids=torch.tensor([0, 0, 0, 1, 1, 1]),
                       group_ids=torch.tensor([0, 0, 1, 2, 2, 3]))
    fiberpo_loss(batch, FiberPOConfig(levels=("domain", "group"), c_pos=0.01, eps=0.01)).loss.backward()
    T = mask.sum(-1, keepdim=True).to(D)
    torch.testing.assert_close(logp.grad, -adv[:, None] * mask / (6 * T), rtol=0, atol=1e-16)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 1.0))
def test_p1_exact_near_on_policy(seed, at_bound):
    g = torch.Generator().manual_seed(seed)
    bound = 0.07
    ell = (torch.rand(5, 4, generator=g, dtype=D) * 2 - 1) * bound
    if at_bound > 0.5:
        ell[0, 0] = bound
    dom, grp = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 0, 1, 2, 2])
    G = fiberpo_gated_ratio(ell, torch.ones(5, 4), eps=bound, c_pos=0.1, c_neg=bound, levels=(dom, grp))
    torch.testing.assert_close(G, ell.exp(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("levels", [(), ("domain", "group")])
@pytest.mark.parametrize("preset", [{}, {"eps": 0.04, "c_pos": 0.12, "c_neg": 0.05}])
def test_r1_on_policy_equals_trl_grpo(levels, preset):
    g = torch.Generator().manual_seed(5)
    logp = -torch.rand(6, 7, generator=g, dtype=D) * 2
    mask = (torch.rand(6, 7, generator=g) < 0.8).long()
    mask[:, 0] = 1
    ids = {"domain_ids": torch.tensor([0, 0, 0, 1, 1, 1]), "group_ids": torch.tensor([0, 0, 1, 2, 2, 3])}
    for adv in (torch.randn(6, generator=g, dtype=D), torch.randn(6, 7, generator=g, dtype=D)):
        cfg = FiberPOConfig(levels=levels, **preset)
        assert_same_as_trl(
            lambda x, adv=adv, cfg=cfg: fiberpo_loss(TokenBatch(logp=x, mask=mask, advantages=adv, **ids), cfg),
            lambda x, adv=adv: trl_loss(x, x.detach(), mask, adv, torch.zeros_like(x), loss_type="grpo"),
            logp, atol=1e-12)


@pytest.mark.parametrize("level, kw", [("token", {"eps": INF, "c_pos": INF, "c_neg": INF}),
                                       ("sequence", {"eps": 0.0, "c_pos": INF, "c_neg": INF})])
def test_r2_limits_equal_trl_importance_sampling(level, kw):
    g = torch.Generator().manual_seed(6)
    logp = -torch.rand(5, 6, generator=g, dtype=D) * 2
    old = logp + 0.3 * torch.randn(5, 6, generator=g, dtype=D)
    mask = (torch.rand(5, 6, generator=g) < 0.8).long()
    mask[:, 0] = 1
    adv = torch.randn(5, generator=g, dtype=D)
    assert_same_as_trl(
        lambda x: fiberpo_loss(TokenBatch(logp=x, mask=mask, advantages=adv, old_logp=old), FiberPOConfig(**kw)),
        lambda x: trl_loss(x, old, mask, adv, torch.zeros_like(x), loss_type="grpo", eps_low=1e9, eps_high=1e9,
                           importance_sampling_level=level), logp, atol=1e-14)


def test_s1_split_with_detached_context():
    """Two micro-batches whose groups span both: level means over local rows + detached context rows."""
    g = torch.Generator().manual_seed(7)
    B, T = 8, 5
    old = torch.zeros(B, T, dtype=D)
    mask = torch.ones(B, T)
    adv = torch.randn(B, generator=g, dtype=D)
    dom, grp = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    order = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # every group split across the two micro-batches
    for scale, c, exact in ((0.02, 0.2, True), (0.3, 0.05, False)):
        ell = scale * torch.randn(B, T, generator=g, dtype=D)
        cfg = FiberPOConfig(levels=("domain", "group"), c_pos=c, c_neg=c, eps=0.1)
        whole_logp = ell.clone().requires_grad_()
        fiberpo_loss(TokenBatch(logp=whole_logp, mask=mask, advantages=adv, old_logp=old, domain_ids=dom,
                                group_ids=grp), cfg).loss.backward()
        split_logp = ell.clone().requires_grad_()
        st_all = fiberpo_gate_state(ell, mask, eps=0.1, c_pos=c, c_neg=c)
        total = 0.0
        for part in order.view(2, 4):
            rest = torch.tensor([i for i in range(B) if i not in part.tolist()])
            ctx = FiberLevelContext(P=st_all.P[rest], N=st_all.N[rest], T=st_all.T[rest], ids=(dom[rest], grp[rest]))
            out = fiberpo_loss(TokenBatch(logp=split_logp[part], mask=mask[part], advantages=adv[part],
                                          old_logp=old[part], domain_ids=dom[part], group_ids=grp[part],
                                          n_seqs_global=B, n_tokens_global=B * T), cfg, context=ctx)
            total = total + out.loss
        total.backward()
        assert abs(total.item() - fiberpo_loss(TokenBatch(logp=ell, mask=mask, advantages=adv, old_logp=old,
                                                          domain_ids=dom, group_ids=grp), cfg).loss.item()) < 1e-12
        if exact:
            torch.testing.assert_close(split_logp.grad, whole_logp.grad, rtol=0, atol=1e-15)
        else:
            assert (split_logp.grad - whole_logp.grad).abs().max() > 1e-6  # coupling through remote rows dropped


def test_errors_and_registry():
    with pytest.raises(ValueError, match="eps"):
        FiberPOConfig(eps=-1)
    with pytest.raises(ValueError, match="level_budgets"):
        FiberPOConfig(levels=("domain", "group"), level_budgets=((0.1, 0.1),))
    with pytest.raises(ValueError, match="domain_ids"):
        fiberpo_loss(TokenBatch(logp=torch.zeros(2, 2), mask=torch.ones(2, 2), advantages=torch.ones(2)),
                     FiberPOConfig(levels=("domain",)))
    with pytest.raises(ValueError, match="not nested"):
        fiberpo_gate_state(torch.zeros(3, 2), torch.ones(3, 2), levels=(torch.tensor([0, 1, 1]),
                                                                         torch.tensor([0, 0, 1])))
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        fiberpo_loss(TokenBatch(logp=torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), mask=torch.ones(2, 2),
                                advantages=torch.ones(2)), FiberPOConfig())
    assert objectives.build("fiberpo").config.levels == []
    assert objectives.build("fiberpo", levels=("domain", "group")).config.levels == ["domain", "group"]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 100_000), st.sampled_from([0.02, 0.1, 0.4]), st.sampled_from([0.05, 0.2]))
def test_properties_on_random_inputs(seed, scale, c):
    """On-policy gradient = TRL GRPO; block-diagonal over domains; telescoping; G bounded by the budgets."""
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 5
    ell, mask, adv = random_case(g, B, T, scale)
    dom, grp = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 1, 2, 2, 3])
    kw = {"eps": 0.1, "c_pos": c, "c_neg": c / 2, "levels": (dom, grp)}
    # on-policy: the gradient is TRL's loss_type="grpo" gradient, for any gates
    logp = -torch.rand(B, T, generator=g, dtype=D)
    ids = {"domain_ids": dom, "group_ids": grp}
    cfg = FiberPOConfig(eps=0.1, c_pos=c, c_neg=c / 2, levels=["domain", "group"])
    assert_same_as_trl(lambda x: fiberpo_loss(TokenBatch(logp=x, mask=mask, advantages=adv, **ids), cfg),
                       lambda x: trl_loss(x, x.detach(), mask, adv, torch.zeros_like(x), loss_type="grpo"),
                       logp, atol=1e-12)
    # off-policy: the Jacobian of log G has no block between the two domains
    jac = torch.autograd.functional.jacobian(lambda x: fiberpo_gated_ratio(x, mask, **kw).log(), ell)
    assert jac[:3, :, 3:, :].abs().max() == 0 and jac[3:, :, :3, :].abs().max() == 0
    G = fiberpo_gated_ratio(ell, mask, **kw)
    assert G.max() <= torch.exp(torch.tensor(2 * 0.1 + 3 * (c + c / 2), dtype=D)) + 1e-12
    # telescoping: with budgets that never bind, every level passes and G is the raw ratio
    wide = fiberpo_gated_ratio(ell, mask, eps=INF, c_pos=INF, c_neg=INF, levels=(dom, grp))
    torch.testing.assert_close(wide[mask.bool()], ell.exp()[mask.bool()], rtol=0, atol=1e-14)


def test_micro_batch_without_valid_tokens_and_levels():
    logp = torch.zeros(2, 3, dtype=D, requires_grad=True)
    out = fiberpo_loss(TokenBatch(logp=logp, mask=torch.zeros(2, 3), advantages=torch.ones(2, dtype=D),
                                  domain_ids=torch.tensor([0, 1]), group_ids=torch.tensor([0, 1])),
                       FiberPOConfig(levels=["domain", "group"]))
    out.loss.backward()
    assert out.loss.item() == 0.0 and logp.grad.abs().sum() == 0 and not out.sample_keep.any()
