"""SPINE loss (specs/entropy_band_grpo.md §9: S3 hinge, S5, S5-KL, S6, S7, E1, E2, T1) and its reductions to TRL 1.16."""

import pytest
import torch

import objectives
from objectives import TokenBatch
from objectives.entropy_band import (
    EntropyBandConfig,
    band_penalty,
    entropy_band_loss,
    entropy_band_select,
    forking_mask,
)
from tests.test_grpo_objective import E1, E2, LOSS_TYPES, spec_tensors
from tests.trl_standin import assert_same_as_trl, high_entropy_mask, trl_loss

D = torch.float64


def s5_batch(kl=False):
    h = torch.tensor([[0.1, 0.2, 1.5, 2.5, 3.0, 4.0], [0.5, 1.0, 0, 0, 0, 0]], dtype=D)
    mask = torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0]])
    logp = torch.full((2, 6), -1.0, dtype=D, requires_grad=True)
    ent = h.clone().requires_grad_()
    ref = torch.full((2, 6), -1.0, dtype=D)
    ref[0, 3] = -0.5
    batch = TokenBatch(logp=logp, mask=mask, advantages=torch.tensor([1.0, -1.0], dtype=D), old_logp=logp.detach(),
                       entropy=ent, old_entropy=h, ref_logp=ref if kl else None)
    return batch, logp, ent


S5_CFG = {"keep": 0.5, "lambda_lo": 1.0, "lambda_hi": 1.0}


def test_s3_hinge_values_and_gradient_relu_on_edges():
    h = torch.tensor([[1.0, 2, 3, 4, 5]], dtype=D, requires_grad=True)
    b = band_penalty(h, torch.tensor([1.4], dtype=D), torch.tensor([3.0], dtype=D), 1.0, 1.0)
    assert b.detach().tolist()[0] == pytest.approx([0.4, 0, 0, 1, 2])
    b.sum().backward()
    assert h.grad.tolist()[0] == [-1.0, 0.0, 0.0, 1.0, 1.0]  # exactly 0 on the edge U = 3.0


def test_s5_loss_and_gradients():
    batch, logp, ent = s5_batch()
    out = entropy_band_loss(batch, EntropyBandConfig(**S5_CFG))
    assert out.loss.item() == pytest.approx(-0.1125, abs=1e-12)
    assert out.metrics["policy_loss"] == pytest.approx(-0.25) and out.metrics["band_loss"] == pytest.approx(0.1375)
    out.loss.backward()
    expected_h = torch.zeros(2, 6, dtype=D)
    expected_h[0, 3], expected_h[0, 5] = -0.125, 0.125
    assert torch.equal(ent.grad, expected_h)
    expected_logp = torch.zeros(2, 6, dtype=D)
    expected_logp[0, 3:] = -0.125
    expected_logp[1, 1] = 0.125
    assert torch.equal(logp.grad, expected_logp)  # S6: exactly 0 on every non-forking token
    assert out.token_weights.tolist() == [[0, 0, 0, 1, 1, 1], [0, 1, 0, 0, 0, 0]]


def test_s5_kl_on_forking_tokens():
    batch, _, _ = s5_batch(kl=True)
    out = entropy_band_loss(batch, EntropyBandConfig(**S5_CFG, kl_coef=0.1))
    assert out.loss.item() == pytest.approx(-0.1087820, abs=1e-7)


def test_s7_micro_batches_with_global_selection():
    batch, logp, ent = s5_batch(kl=True)
    cfg = EntropyBandConfig(**S5_CFG, kl_coef=0.1)
    whole = entropy_band_loss(batch, cfg).loss
    g_whole = torch.autograd.grad(whole, [logp, ent])
    sel = entropy_band_select(batch, cfg)
    assert sel.counts == {"n_tokens_global": 8.0, "n_seqs_global": 2.0, "n_keep_global": 4.0}
    shares = []
    for i in range(2):
        part = TokenBatch(logp=logp[i : i + 1], mask=batch.mask[i : i + 1], advantages=batch.advantages[i : i + 1],
                          old_logp=batch.old_logp[i : i + 1], entropy=ent[i : i + 1], ref_logp=batch.ref_logp[i : i + 1],
                          **{k: v[i : i + 1] for k, v in sel.rows.items()}, **sel.counts)
        shares.append(entropy_band_loss(part, cfg).loss)
    no_kl = EntropyBandConfig(**S5_CFG)
    plain = [
        entropy_band_loss(TokenBatch(logp=logp[i : i + 1], mask=batch.mask[i : i + 1],
                                     advantages=batch.advantages[i : i + 1], entropy=ent[i : i + 1],
                                     **{k: v[i : i + 1] for k, v in sel.rows.items()}, **sel.counts), no_kl).loss.item()
        for i in range(2)
    ]
    assert plain == pytest.approx([-0.2375, 0.125], abs=1e-12)  # the spec's shares (without the KL)
    total = shares[0] + shares[1]
    assert total.item() == pytest.approx(whole.item(), abs=1e-12)
    for a, b in zip(torch.autograd.grad(total, [logp, ent]), g_whole, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_e1_keep_one_band_off_equals_trl(loss_type):
    logp, old, mask, adv, ent, _ = spec_tensors()
    for scope in ("per_sequence", "per_group", "global_batch"):
        cfg = EntropyBandConfig(keep=1.0, scope=scope, lambda_lo=0.0, lambda_hi=0.0, loss_type=loss_type,
                                max_completion_length=4)
        out = assert_same_as_trl(
            lambda x, cfg=cfg: entropy_band_loss(TokenBatch(logp=x, mask=mask, advantages=adv, old_logp=old,
                                                            entropy=ent, old_entropy=ent,
                                                            group_ids=torch.tensor([0, 0, 1])), cfg),
            lambda x: trl_loss(x, old, mask, adv, ent, loss_type=loss_type), logp, atol=0.0)
        assert out.loss.item() == pytest.approx(E1[loss_type], abs=1e-9)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_e2_global_keep_with_kl_on_all_tokens_equals_trl(loss_type):
    logp, old, mask, adv, ent, refp = spec_tensors()
    cfg = EntropyBandConfig(keep=0.5, scope="global_batch", band="off", kl_coef=0.04, kl_mask="all",
                            loss_type=loss_type, max_completion_length=4)
    out = assert_same_as_trl(
        lambda x: entropy_band_loss(TokenBatch(logp=x, mask=mask, advantages=adv, old_logp=old, ref_logp=refp,
                                               old_entropy=ent), cfg),
        lambda x: trl_loss(x, old, mask, adv, ent, loss_type=loss_type, top_entropy_quantile=0.5, beta=0.04,
                           ref_logp=refp), logp, atol=1e-15)
    assert out.loss.item() == pytest.approx(E2[loss_type], abs=1e-9)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("seed", range(4))
def test_random_reduction_to_trl(loss_type, seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 9
    logp = -torch.rand(B, T, generator=g, dtype=D) * 3
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=D)
    mask = (torch.rand(B, T, generator=g) < 0.8).long()
    adv = torch.randn(B, generator=g, dtype=D)
    ent = torch.rand(B, T, generator=g, dtype=torch.float32).double()  # float32-representable: TRL ranks in fp32
    for keep in (1.0, 0.3):
        cfg = EntropyBandConfig(keep=keep, scope="global_batch", band="off", loss_type=loss_type,
                                max_completion_length=T)
        assert_same_as_trl(
            lambda x, cfg=cfg: entropy_band_loss(TokenBatch(logp=x, mask=mask, advantages=adv, old_logp=old,
                                                            old_entropy=ent), cfg),
            lambda x, keep=keep: trl_loss(x, old, mask, adv, ent, loss_type=loss_type, top_entropy_quantile=keep),
            logp, atol=1e-12)


def test_t1_global_mask_equals_trl_high_entropy_mask():
    h = torch.tensor([[0.1, 0.5, 0.9, 7.0], [0.2, 0.3, 0.4, 0.8]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    want = [[False, True, True, False], [False, False, True, True]]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ours = forking_mask(h.to(dtype), m, 0.5, "global_batch")
        assert ours.tolist() == want
        assert torch.equal(ours, high_entropy_mask(h.to(dtype), m, 0.5).bool())
    h64 = torch.tensor([[0.1, 0.5, 0.9, 7.0], [0.2, 0.3, 0.4, 0.8]], dtype=D)
    assert forking_mask(h64, m, 0.5, "global_batch").tolist() == want
    # TRL rounds the threshold to float32 (0.40000000596 > 0.4) and drops the 0.4 token in float64 (§5.3)
    assert high_entropy_mask(h64, m, 0.5).bool().tolist() == [[False, True, True, False],
                                                                    [False, False, False, True]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(10))
def test_global_mask_equals_trl_on_random_inputs(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 5, 13
    h = (torch.rand(B, T, generator=g) * 3).to(dtype)
    h[0, :4] = h[0, 4]  # ties
    m = (torch.rand(B, T, generator=g) < 0.7).long()
    m[0, 0] = 1
    for keep in (0.0, 0.1, 0.2, 0.5, 0.9):
        assert torch.equal(forking_mask(h, m, keep, "global_batch"), high_entropy_mask(h, m, 1 - keep).bool())


def test_masks_against_slow_reference():
    """forking_mask per unit == a loop that sorts each unit's values and interpolates the quantile by hand."""
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        B, T = 6, 7
        s = torch.rand(B, T, generator=g, dtype=D).round(decimals=1)  # plenty of ties
        m = (torch.rand(B, T, generator=g) < 0.7).long()
        groups = torch.tensor([0, 0, 1, 1, 1, 2])
        keep = float(torch.rand(1, generator=g))
        for scope in ("per_sequence", "per_group", "global_batch"):
            unit = {"per_sequence": torch.arange(B), "per_group": groups, "global_batch": torch.zeros(B)}[scope]
            want = torch.zeros(B, T, dtype=torch.bool)
            for u in unit.unique():
                vals = sorted(s[i, t].item() for i in range(B) for t in range(T) if unit[i] == u and m[i, t])
                if not vals:
                    continue
                r = (1 - keep) * (len(vals) - 1)
                lo, hi = vals[int(r)], vals[min(len(vals) - 1, int(r) + (r > int(r)))]
                tau = lo + (r - int(r)) * (hi - lo)
                for i in range(B):
                    for t in range(T):
                        want[i, t] = want[i, t] or bool(unit[i] == u and m[i, t] and s[i, t] >= tau - 1e-12)
            assert torch.equal(forking_mask(s, m, keep, scope, group_ids=groups), want), scope


def test_edge_cases():
    h = torch.tensor([[2.0, 0, 0], [0, 0, 0]], dtype=D)
    m = torch.tensor([[1, 0, 0], [0, 0, 0]])
    sel = entropy_band_select(TokenBatch(logp=torch.zeros(2, 3, dtype=D), mask=m, old_entropy=h),
                              EntropyBandConfig(keep=0.0))
    assert sel.rows["keep"].tolist() == [[True, False, False], [False] * 3]  # one valid token: always selected
    assert sel.rows["band_lo"].tolist() == [2.0, 0.0] and sel.rows["band_hi"].tolist() == [2.0, 0.0]
    # N_F = 0: every term is 0 and the KL denominator is max(1, 0)
    logp = torch.zeros(1, 2, dtype=D, requires_grad=True)
    out = entropy_band_loss(TokenBatch(logp=logp, mask=torch.zeros(1, 2), advantages=torch.ones(1, dtype=D),
                                       entropy=torch.ones(1, 2, dtype=D, requires_grad=True),
                                       old_entropy=torch.ones(1, 2, dtype=D), ref_logp=torch.ones(1, 2, dtype=D)),
                            EntropyBandConfig(kl_coef=0.1))
    assert out.loss.item() == 0.0
    with pytest.raises(ValueError, match="row 1"):
        bad = torch.tensor([[1.0, 2.0], [float("nan"), 1.0]], dtype=D)
        entropy_band_select(TokenBatch(logp=torch.zeros(2, 2, dtype=D), mask=torch.ones(2, 2), old_entropy=bad),
                            EntropyBandConfig())
    for kwargs, match in [({"keep": 1.5}, "keep"), ({"loss_type": "cispo"}, "loss_type"), ({"band": "x"}, "band"),
                          ({"kl_mask": "some"}, "kl_mask"), ({"q_lo": 0.6}, "q_lo")]:
        with pytest.raises(ValueError, match=match):
            EntropyBandConfig(**kwargs)
    with pytest.warns(UserWarning, match="ignores keep"):
        EntropyBandConfig(method="otsu", keep=0.5)


def test_window_statistic_changes_selection_not_band():
    h = torch.tensor([[0.1, 3.0, 0.1, 0.1, 0.1, 0.1]], dtype=D)
    m = torch.ones(1, 6)
    batch = TokenBatch(logp=torch.zeros(1, 6, dtype=D), mask=m, old_entropy=h)
    plain = entropy_band_select(batch, EntropyBandConfig(keep=0.0))
    windowed = entropy_band_select(batch, EntropyBandConfig(keep=0.0, statistic="window_entropy", window=2))
    assert plain.rows["keep"].nonzero()[:, 1].tolist() == [1]
    # windows of 2 starting at each token: [1.55, 1.55, 0.1, ...]: positions 0 and 1 tie at the top
    assert windowed.rows["keep"].nonzero()[:, 1].tolist() == [0, 1]
    assert windowed.rows["band_hi"].item() == pytest.approx((0.1 + 3.0) / 2)  # band from per-token entropies


def test_registry_and_trainer_facts():
    obj = objectives.build("entropy_band", keep=0.3, kl_coef=0.01)
    assert obj.config.ref_coef == 0.01
    assert obj.needs_step_selection(1)  # the forking KL needs the step's N_F
    assert not objectives.build("entropy_band").needs_step_selection(1)
    assert objectives.build("entropy_band").needs_step_selection(2)
    assert objectives.build("entropy_band", scope="global_batch").needs_step_selection(1)
