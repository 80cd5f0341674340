"""kernels: hand vectors (specs/kernels.md §9.1), fp64 reference, gradients, selective backward, TRL agreement."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels import reference_token_stats, token_stats, token_stats_from_logits

D = torch.float64


def t5():
    W = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=D)
    h = torch.tensor([[1.0, 2.0], [2.0, 0.0], [1.0, 1.0]], dtype=D)
    return h, W, torch.zeros(3, dtype=D), torch.tensor([2, 0, 1])


def test_t1_t2_t3_logits_vectors():
    z = torch.tensor([[0.0, 1.0, 2.0]] * 3, dtype=D, requires_grad=True)
    out = token_stats_from_logits(z, torch.tensor([2, 0, 1]))
    assert out.logp.tolist() == pytest.approx([-0.407606, -2.407606, -1.407606], abs=1e-6)
    assert out.entropy.tolist() == pytest.approx([0.832396] * 3, abs=1e-6)
    (g,) = torch.autograd.grad(out.logp[0], z, retain_graph=True)
    assert g[0].tolist() == pytest.approx([-0.090031, -0.244728, 0.334759], abs=1e-6)
    (g,) = torch.autograd.grad(out.entropy[0], z)
    assert g[0].tolist() == pytest.approx([0.141817, 0.140770, -0.282587], abs=1e-6)

    z2 = torch.tensor([[0.0, 1.0, 2.0]], dtype=D, requires_grad=True)
    out = token_stats_from_logits(z2, torch.tensor([2]), temperature=2.0)
    assert (out.logp.item(), out.entropy.item()) == pytest.approx((-0.680270, 1.020191), abs=1e-6)
    (g,) = torch.autograd.grad(out.logp.sum(), z2)
    assert g[0].tolist() == pytest.approx([-0.093162, -0.153598, 0.246760], abs=1e-6)
    out = token_stats_from_logits(z2.detach(), torch.tensor([2]), temperature=0.5)
    assert (out.logp.item(), out.entropy.item()) == pytest.approx((-0.142932, 0.441057), abs=1e-6)

    out = token_stats_from_logits(torch.zeros(1, 4, dtype=D), torch.tensor([1]))
    assert (out.logp.item(), out.entropy.item()) == pytest.approx((-math.log(4), math.log(4)), abs=1e-6)
    out = token_stats_from_logits(torch.zeros(2, 1), torch.tensor([0, 0]))
    assert out.logp.tolist() == [0.0, 0.0] and out.entropy.tolist() == [0.0, 0.0]


def test_t4_large_logits_fp32():
    z = torch.tensor([[0.0, 1.0, 2.0]]) + 1e4
    out = token_stats_from_logits(z, torch.tensor([2]))
    assert (out.logp.item(), out.entropy.item()) == pytest.approx((-0.407606, 0.832396), abs=1e-5)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 32000, generator=g) * 4 + 1e4
    y = torch.randint(0, 32000, (16,), generator=g)
    out = token_stats_from_logits(z, y)
    ref = reference_token_stats(y, logits=z.double())
    assert (out.logp.double() - ref.logp).abs().max() < 1e-5
    assert (out.entropy.double() - ref.entropy).abs().max() < 1e-5


def test_t5_hidden_level_gradients():
    h, W, b, y = t5()
    h.requires_grad_(), W.requires_grad_(), b.requires_grad_()
    out = token_stats(h, W, y, bias=b)
    assert out.logp.tolist() == pytest.approx([-0.407606, -2.239545, -0.861995], abs=1e-6)
    assert out.entropy.tolist() == pytest.approx([0.832396, 0.665573, 1.017357], abs=1e-6)
    out.logp.sum().backward()
    assert h.grad.flatten().tolist() == pytest.approx(
        [-0.244728, 0.334759, -0.786986, -0.106507, 0.577681, -0.422319], abs=1e-6)
    assert W.grad.flatten().tolist() == pytest.approx(
        [1.541593, -0.335424, -1.241019, 0.088224, -0.300574, 0.247199], abs=1e-6)
    assert b.grad.tolist() == pytest.approx([0.648100, -0.454033, -0.194067], abs=1e-6)


@pytest.mark.parametrize("how", ["grad_mask", "indices", "zero_upstream"])
def test_t6_selective_backward(how):
    h, W, b, y = t5()
    h.requires_grad_(), W.requires_grad_(), b.requires_grad_()
    kernels.reset_counters()
    if how == "zero_upstream":
        out = token_stats(h, W, y, bias=b)
        (out.logp * torch.tensor([1.0, 0.0, 1.0], dtype=D)).sum().backward()
    else:
        gm = torch.tensor([True, False, True]) if how == "grad_mask" else torch.tensor([0, 2])
        out = token_stats(h, W, y, bias=b, grad_mask=gm)
        assert out.logp.tolist() == pytest.approx([-0.407606, -2.239545, -0.861995], abs=1e-6)  # values unchanged
        out.logp.sum().backward()
    assert kernels.counters() == {"rows_forward": 3, "rows_backward": 2}
    assert h.grad.flatten().tolist() == pytest.approx([-0.244728, 0.334759, 0, 0, 0.577681, -0.422319], abs=1e-6)
    assert h.grad[1].abs().sum().item() == 0.0  # exactly zero
    assert W.grad.flatten().tolist() == pytest.approx(
        [-0.245393, -0.335424, 0.332953, 0.088224, -0.087560, 0.247199], abs=1e-6)
    assert b.grad.tolist() == pytest.approx([-0.245393, 0.332953, -0.087560], abs=1e-6)


def test_t6_entropy_gradient_and_t7_temperature():
    h, W, b, y = t5()
    h.requires_grad_()
    token_stats(h, W, y, bias=b, grad_mask=torch.tensor([True, False, True])).entropy.sum().backward()
    assert h.grad.flatten().tolist() == pytest.approx([0.140770, -0.282587, 0, 0, -0.065612, -0.065612], abs=1e-6)
    h.grad = None
    out = token_stats(h, W, y, bias=b, temperature=2.0, grad_mask=torch.tensor([True, False, True]))
    assert out.logp.tolist() == pytest.approx([-0.680270, -1.551445, -0.958020], abs=1e-6)
    assert out.entropy.tolist() == pytest.approx([1.020191, 0.975328, 1.074368], abs=1e-6)
    out.logp.sum().backward()
    assert h.grad.flatten().tolist() == pytest.approx([-0.153598, 0.246760, 0, 0, 0.308174, -0.191826], abs=1e-6)


@pytest.mark.parametrize("explicit_mask", [True, False])
def test_t8_masked_rows(explicit_mask):
    h, W, b, y = t5()
    y = y.clone()
    y[1] = -100
    h.requires_grad_()
    mask = torch.tensor([True, False, True]) if explicit_mask else None
    out = token_stats(h, W, y, bias=b, mask=mask)
    assert out.logp.tolist() == pytest.approx([-0.407606, 0, -0.861995], abs=1e-6)
    assert out.entropy.tolist() == pytest.approx([0.832396, 0, 1.017357], abs=1e-6)
    out.logp.sum().backward()
    assert h.grad.flatten().tolist() == pytest.approx([-0.244728, 0.334759, 0, 0, 0.577681, -0.422319], abs=1e-6)


def test_edge_cases():
    h, W, b, y = t5()
    with pytest.raises(ValueError, match="outside \\[0, 3\\)"):
        token_stats(h, W, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="temperature"):
        token_stats(h, W, y, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        token_stats(h, W, y, chunk_size=0)
    with pytest.raises(ValueError, match="ZeRO-3"):
        token_stats(h, torch.empty(0, 2, dtype=D), torch.tensor([-100, -100, -100]))
    with pytest.raises(ValueError, match="sorted, unique"):
        token_stats(h, W, y, grad_mask=torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="dtypes differ"):
        token_stats(h.float(), W, y)
    # all rows masked: zero outputs that stay connected to the graph, zero (not None) gradients
    hh = h.clone().requires_grad_()
    out = token_stats(hh, W, torch.full((3,), -100))
    assert out.logp.tolist() == [0.0] * 3
    out.logp.sum().backward()
    assert hh.grad is not None and hh.grad.abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_minus_inf_logits_contribute_nothing(dtype):
    z = torch.tensor([[0.0, float("-inf"), 1.0], [2.0, 0.5, float("-inf")]], dtype=dtype, requires_grad=True)
    y = torch.tensor([0, 1])
    out = token_stats_from_logits(z, y, temperature=0.7)
    ref = reference_token_stats(y, logits=z.detach().double(), temperature=0.7)
    torch.testing.assert_close(out.logp.double(), ref.logp, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.entropy.double(), ref.entropy, rtol=0, atol=1e-6)
    (g,) = torch.autograd.grad((out.logp + out.entropy).sum(), z)
    assert torch.isfinite(g).all() and g[0, 1] == 0 and g[1, 2] == 0


def test_frozen_head_skips_weight_gradient(monkeypatch):
    h, W, b, y = t5()
    h.requires_grad_()
    calls = []
    real = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    token_stats(h, W, y).logp.sum().backward()
    assert calls == [] and W.grad is None and h.grad is not None
    W.requires_grad_()
    token_stats(h, W, y).logp.sum().backward()
    assert calls and W.grad is not None


def random_case(seed, n, v, d, scale, bias, temperature):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=D)
    W = torch.randn(v, d, generator=g, dtype=D) * scale / math.sqrt(d)
    b = torch.randn(v, generator=g, dtype=D) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    mask = torch.rand(n, generator=g) < 0.8
    up = torch.randn(2, n, generator=g, dtype=D) * (torch.rand(n, generator=g) < 0.7)
    return h, W, b, y, mask, up


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 70), st.integers(1, 300), st.integers(1, 48),
       st.sampled_from([1.0, 4.0, 30.0]), st.booleans(), st.sampled_from([0.3, 0.7, 1.0, 1.7]),
       st.integers(1, 9))
def test_fp64_matches_reference_values_and_gradients(seed, n, v, d, scale, bias, temperature, chunk):
    h, W, b, y, mask, up = random_case(seed, n, v, d, scale, bias, temperature)
    gm = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1)) < 0.6
    leaves = [x.clone().requires_grad_() for x in (h, W) + ((b,) if bias else ())]
    out = token_stats(leaves[0], leaves[1], y, bias=leaves[2] if bias else None, temperature=temperature, mask=mask,
                      grad_mask=gm, chunk_size=chunk)
    ref_leaves = [x.clone().requires_grad_() for x in (h, W) + ((b,) if bias else ())]
    ref = reference_token_stats(y, hidden=ref_leaves[0], weight=ref_leaves[1], bias=ref_leaves[2] if bias else None,
                                temperature=temperature, mask=mask)
    torch.testing.assert_close(out.logp, ref.logp, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=0, atol=1e-10)
    assert (out.logp <= 0).all() and (out.entropy >= 0).all()
    sel = (gm & mask).to(D)
    loss = (up[0] * out.logp + up[1] * out.entropy).sum()
    ref_loss = (sel * (up[0] * ref.logp + up[1] * ref.entropy)).sum()  # grad_mask == upstream γ·1[G]
    if n == 0 or not loss.requires_grad:
        return
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves, allow_unused=True)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, torch.zeros_like(g) if r is None else r, rtol=0, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 40), st.integers(1, 200), st.sampled_from([0.7, 1.0, 1.7]),
       st.sampled_from([0.0, 1e4]))
def test_logits_level_fp32_matches_reference(seed, n, v, temperature, offset):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g) * 4 + offset).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    mask = torch.rand(n, generator=g) < 0.8
    out = token_stats_from_logits(z, y, temperature=temperature, mask=mask)
    ref = reference_token_stats(y, logits=z.detach().double(), temperature=temperature, mask=mask)
    assert ((out.logp.double() - ref.logp).abs() <= 1e-5 + 1e-5 * ref.logp.abs()).all()
    assert ((out.entropy.double() - ref.entropy).abs() <= 1e-5 + 1e-5 * ref.entropy.abs()).all()
    zz = z.detach().double().requires_grad_()
    ref = reference_token_stats(y, logits=zz, temperature=temperature, mask=mask)
    (g_ref,) = torch.autograd.grad((ref.logp + 0.3 * ref.entropy).sum(), zz)
    (g,) = torch.autograd.grad((out.logp + 0.3 * out.entropy).sum(), z)
    # relative 1e-5, with a floor at fp32 resolution: where logp and entropy gradients cancel, ‖g64‖ can be ~1e-4
    # while each term is O(1) and carries ~1e-7 of fp32 rounding
    assert (g.double() - g_ref).norm() <= 1e-5 * g_ref.norm() + 1e-6


def test_micro_batches_equal_one_call():
    h, W, b, y, mask, up = random_case(7, 64, 50, 16, 4.0, True, 1.0)
    W.requires_grad_()
    token_stats(h, W, y, bias=b, mask=mask).logp.sum().backward()
    whole = W.grad.clone()
    W.grad = None
    for s in range(0, 64, 8):
        token_stats(h[s : s + 8], W, y[s : s + 8], bias=b, mask=mask[s : s + 8]).logp.sum().backward()
    torch.testing.assert_close(W.grad, whole, rtol=0, atol=1e-10)


def test_agrees_with_trl_helpers():
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    g = torch.Generator().manual_seed(0)
    z = torch.randn(37, 500, generator=g) * 4
    y = torch.randint(0, 500, (37,), generator=g)
    out = token_stats_from_logits(z, y, temperature=0.7)
    torch.testing.assert_close(out.logp, selective_log_softmax(z, y, temperature=0.7), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(out.entropy, entropy_from_logits(z / 0.7), rtol=1e-5, atol=2e-5)

    h = torch.randn(37, 24, generator=g)
    W = torch.randn(500, 24, generator=g) / 3
    b = torch.randn(500, generator=g)
    a, c = torch.randn(37, generator=g), torch.randn(37, generator=g)
    ours = [x.clone().requires_grad_() for x in (h, W, b)]
    theirs = [x.clone().requires_grad_() for x in (h, W, b)]
    o = token_stats(*ours[:2], y, bias=ours[2], temperature=0.7)
    lp, ent = ChunkedLogProbFunction.apply(*theirs, y, 0.7, 7, None, 1.0, ("entropy",))[:2]
    torch.testing.assert_close(o.logp, lp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(o.entropy, ent, rtol=1e-5, atol=2e-5)
    g1 = torch.autograd.grad((a * o.logp + c * o.entropy).sum(), ours)
    g2 = torch.autograd.grad((a * lp + c * ent).sum(), theirs)
    for x, r in zip(g1, g2, strict=True):
        assert (x - r).norm() / r.norm() <= 2e-5


@pytest.mark.parametrize("teacher", [False, True])
@pytest.mark.parametrize("tile_elems", [7, 64, 300])
def test_vocabulary_tiles_and_online_merge_match_reference(monkeypatch, teacher, tile_elems):
    """Tiles of a few vocabulary columns (forced through MAX_TILE_ELEMS) exercise the online merge of §3.2 and the
    vocabulary-tiled backward, including a whole tile of −inf logits and targets in every tile."""
    from kernels import chunked

    monkeypatch.setattr(chunked, "MAX_TILE_ELEMS", tile_elems)
    h, W, b, y, mask, up = random_case(11, 23, 97, 8, 4.0, True, 0.7)
    b[10:40] = -math.inf  # at least one tile is all −inf for the small tile sizes
    y[y.ge(10) & y.lt(40)] = 0
    extra = {}
    if teacher:
        g = torch.Generator().manual_seed(5)
        extra = dict(teacher_hidden=torch.randn(23, 5, generator=g, dtype=D),
                     teacher_weight=torch.randn(97, 5, generator=g, dtype=D), divergences=("reverse_kl", "jsd"))
    names = ["logp", "entropy"] + list(extra.get("divergences", ()))
    out = token_stats(h, W, y, bias=b, temperature=0.7, mask=mask, chunk_size=4, **extra)
    ref = reference_token_stats(y, hidden=h, weight=W, bias=b, temperature=0.7, mask=mask, **extra)
    for name in names:
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=0, atol=1e-10)
    # gradients: fp64 autograd of the reference is NaN through −inf logits, so use a bias that underflows instead
    b = torch.where(b.isinf(), torch.full_like(b, -800.0), b)
    leaves = [h.clone().requires_grad_(), W.clone().requires_grad_()]
    ref_leaves = [h.clone().requires_grad_(), W.clone().requires_grad_()]
    out = token_stats(*leaves, y, bias=b, temperature=0.7, mask=mask, chunk_size=4, **extra)
    ref = reference_token_stats(y, hidden=ref_leaves[0], weight=ref_leaves[1], bias=b, temperature=0.7, mask=mask,
                                **extra)
    loss = sum((up[k % 2] * getattr(out, n)).sum() for k, n in enumerate(names))
    ref_loss = sum((up[k % 2] * getattr(ref, n)).sum() for k, n in enumerate(names))
    for a, r in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(ref_loss, ref_leaves), strict=True):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-9)
