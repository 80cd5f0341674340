"""The grpo objective: spec vectors E1/E2, equality with TRL 1.16 on identical tensors, global denominators."""

import pytest
import torch

import objectives
from objectives import TokenBatch
from objectives.grpo import GRPOConfig, grpo_loss
from tests.trl_standin import trl_loss

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
# entropy_band_grpo.md §9, "Reduction" vectors E1 (keep 1) and E2 (keep 0.5 global, kl 0.04)
E1 = {"grpo": -0.1919777461, "bnpo": -0.2576449460, "dr_grpo": -0.1932337095, "dapo": -0.2576449460}
E2 = {"grpo": -0.0310254791, "bnpo": -0.0688805069, "dr_grpo": -0.0516603802, "dapo": -0.0688805069}


def spec_tensors():
    d = torch.float64
    logp = torch.tensor([[-1, -0.5, -2, -1.5], [-0.3, -1.2, -0.8, 0], [-2, -0.1, 0, 0]], dtype=d)
    old = logp - torch.tensor([[0.3, -0.1, 0, 0.25], [-0.4, 0.1, 0.05, 0], [0.2, -0.3, 0, 0]], dtype=d)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
    adv = torch.tensor([1.0, -1.0, 0.5], dtype=d)
    ent = torch.tensor([[0.2, 1.5, 0.7, 2.0], [1.1, 0.3, 0.9, 0], [0.05, 1.8, 0, 0]], dtype=d)
    ref = logp + torch.tensor([[0.1, -0.2, 0, 0.3], [0, 0.05, -0.1, 0], [0.2, 0, 0, 0]], dtype=d)
    return logp, old, mask, adv, ent, ref


def ours(logp, old, mask, adv, ent, ref=None, **cfg):
    batch = TokenBatch(logp=logp, mask=mask, advantages=adv, old_logp=old, ref_logp=ref, entropy=ent, old_entropy=ent)
    return grpo_loss(batch, GRPOConfig(max_completion_length=logp.shape[1], **cfg))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize(
    "vector, ours_cfg, trl_cfg",
    [
        (E1, {}, {}),  # keep 1, no KL
        (E2, {"keep": 0.5, "scope": "global_batch", "beta": 0.04}, {"top_entropy_quantile": 0.5, "beta": 0.04}),
    ],
    ids=["E1", "E2"],
)
def test_spec_vectors_equal_trl(loss_type, vector, ours_cfg, trl_cfg):
    logp, old, mask, adv, ent, refp = spec_tensors()
    a = logp.clone().requires_grad_()
    b = logp.clone().requires_grad_()
    out = ours(a, old, mask, adv, ent, refp, loss_type=loss_type, **ours_cfg)
    ref = trl_loss(b, old, mask, adv, ent, loss_type=loss_type, ref_logp=refp if trl_cfg else None, **trl_cfg)
    assert out.loss.item() == pytest.approx(vector[loss_type], abs=1e-9)
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-12)
    out.loss.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("seed", range(5))
def test_random_tensors_equal_trl(loss_type, seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 9
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) < 0.8).long()
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    ent = torch.rand(B, T, generator=g, dtype=torch.float32).double()  # fp32-representable: TRL ranks in fp32
    refp = logp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    for keep, beta in [(1.0, 0.0), (0.3, 0.0), (0.6, 0.1)]:
        a = logp.clone().requires_grad_()
        b = logp.clone().requires_grad_()
        out = ours(a, old, mask, adv, ent, refp, loss_type=loss_type, keep=keep, scope="global_batch", beta=beta)
        ref = trl_loss(b, old, mask, adv, ent, loss_type=loss_type, top_entropy_quantile=keep, beta=beta,
                       ref_logp=refp if beta else None)
        assert abs(out.loss.item() - ref.item()) < 1e-6
        out.loss.backward()
        ref.backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batches_sum_to_step_loss(loss_type, fp64):
    """1 x B == B x 1: shares with global counts add up to the one-batch loss, gradients too."""
    g = torch.Generator().manual_seed(3)
    B, T = 8, 6
    logp = (-torch.rand(B, T, generator=g) * 2).requires_grad_()
    old = logp.detach() + 0.2 * torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) < 0.75).long()
    adv = torch.randn(B, generator=g)
    ent = torch.rand(B, T, generator=g)
    cfg = GRPOConfig(loss_type=loss_type, keep=0.4, max_completion_length=T)
    whole = grpo_loss(TokenBatch(logp=logp, mask=mask, advantages=adv, old_logp=old, old_entropy=ent), cfg).loss
    (g_whole,) = torch.autograd.grad(whole, logp)
    total = 0.0
    for i in range(B):
        sl = slice(i, i + 1)
        batch = TokenBatch(logp=logp[sl], mask=mask[sl], advantages=adv[sl], old_logp=old[sl], old_entropy=ent[sl],
                           n_seqs_global=B, n_tokens_global=float(mask.sum()))
        total = total + grpo_loss(batch, cfg).loss
    (g_split,) = torch.autograd.grad(total, logp)
    assert abs(total.item() - whole.item()) < 1e-12
    torch.testing.assert_close(g_split, g_whole, rtol=0, atol=1e-12)


def test_unselected_tokens_get_no_gradient(fp64):
    logp = torch.tensor([[-1.0, -2.0, -0.5, -1.5]], requires_grad=True)
    ent = torch.tensor([[0.1, 2.0, 0.3, 1.0]])
    out = grpo_loss(TokenBatch(logp=logp, mask=torch.ones(1, 4), advantages=torch.tensor([1.0]), old_entropy=ent),
                    GRPOConfig(keep=0.25))
    out.loss.backward()
    assert out.token_weights.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    assert logp.grad[0, [0, 2, 3]].abs().sum() == 0
    assert logp.grad[0, 1] != 0
    assert out.metrics["kept_token_frac"] == 0.25
    assert out.metrics["stat_kept_mean"] == 2.0


def test_precomputed_keep_is_used(fp64):
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    keep = torch.tensor([[True, False, True]])
    out = grpo_loss(TokenBatch(logp=logp, mask=torch.ones(1, 3), advantages=torch.tensor([1.0]), keep=keep),
                    GRPOConfig(keep=0.2))
    assert out.token_weights.tolist() == [[1.0, 0.0, 1.0]]


def test_config_errors():
    with pytest.raises(ValueError, match="loss_type"):
        GRPOConfig(loss_type="cispo")
    with pytest.raises(ValueError, match="keep"):
        GRPOConfig(keep=1.2)
    with pytest.raises(ValueError, match="max_completion_length"):
        GRPOConfig(loss_type="dr_grpo")
    with pytest.raises(ValueError, match="entropy"):
        grpo_loss(TokenBatch(logp=torch.zeros(1, 2), mask=torch.ones(1, 2), advantages=torch.ones(1)),
                  GRPOConfig(keep=0.5))


def test_registry():
    obj = objectives.build("grpo", keep=0.2)
    assert obj.name == "grpo" and obj.config.keep == 0.2
    with pytest.raises(KeyError, match="registered: d3s, entropy_band, fiberpo, grpo"):
        objectives.build("gpro")
    with pytest.raises(TypeError, match="did you mean keep"):
        objectives.build("grpo", kepp=0.2)


def test_token_batch_shape_errors():
    with pytest.raises(ValueError, match="mask"):
        TokenBatch(logp=torch.zeros(2, 3), mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="advantages"):
        TokenBatch(logp=torch.zeros(2, 3), mask=torch.ones(2, 3), advantages=torch.zeros(3))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gspo_sequence_ratio_equals_trl(loss_type):
    from tests.trl_standin import assert_same_as_trl

    g = torch.Generator().manual_seed(11)
    logp = -torch.rand(5, 6, generator=g, dtype=torch.float64) * 2
    old = logp + 0.01 * torch.randn(5, 6, generator=g, dtype=torch.float64)
    mask = (torch.rand(5, 6, generator=g) < 0.8).long()
    mask[:, 0] = 1
    adv = torch.randn(5, generator=g, dtype=torch.float64)
    cfg = GRPOConfig(loss_type=loss_type, importance_sampling_level="sequence", epsilon_low=3e-4,
                     epsilon_high=4e-4, max_completion_length=6)
    out = assert_same_as_trl(
        lambda x: grpo_loss(TokenBatch(logp=x, mask=mask, advantages=adv, old_logp=old), cfg),
        lambda x: trl_loss(x, old, mask, adv, torch.zeros_like(x), loss_type=loss_type, eps_low=3e-4,
                           eps_high=4e-4, importance_sampling_level="sequence"), logp, atol=1e-13)
    assert 0 < out.metrics["clip_frac"] < 1  # GSPO's tiny clip range bites at this drift


def test_clip_fractions_count_only_the_gradient_killing_side():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.0]]))
    out = grpo_loss(TokenBatch(logp=logp, mask=torch.ones(1, 5), advantages=torch.tensor([[1.0, 1, -1, -1, 1]]),
                               old_logp=torch.zeros(1, 5)), GRPOConfig())
    # ratio 1.5 with A > 0 and ratio 0.5 with A < 0 are clipped; the other two sides still pass gradient
    assert out.metrics["clip_high_frac"] == 0.2 and out.metrics["clip_low_frac"] == 0.2
