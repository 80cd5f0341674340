"""Teacher divergences (specs/kernels.md §3.3–3.4, T9/T10, §8.3): hand vectors, fp64 properties, TRL agreement."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels import reference_token_stats, token_stats, token_stats_from_logits

D = torch.float64
ALL = ("reverse_kl", "forward_kl", "jsd")


def t9():
    p = torch.tensor([[0.7, 0.2, 0.1]], dtype=D)
    q = torch.tensor([[0.5, 0.3, 0.2]], dtype=D)
    return p.log(), q.log(), torch.tensor([0])


def test_t9_values_and_gradients_logits_level():
    z, u, y = t9()
    out = token_stats_from_logits(z, y, teacher_logits=u, divergences=ALL)
    assert (out.reverse_kl.item(), out.forward_kl.item(), out.jsd.item(), out.entropy.item()) == pytest.approx(
        (0.085123, 0.092033, 0.021901, 0.801819), abs=1e-6)
    for beta, want in ((0.1, 0.008185), (0.9, 0.007695)):
        got = token_stats_from_logits(z, y, teacher_logits=u, divergences=("jsd",), jsd_beta=beta).jsd.item()
        assert got == pytest.approx(want, abs=1e-6)
    expected = {"reverse_kl": [0.175945, -0.098118, -0.077827], "forward_kl": [0.2, -0.1, -0.1],
                "jsd": [0.045997, -0.024587, -0.021410]}
    for name, grad in expected.items():
        zz = z.clone().requires_grad_()
        uu = u.clone().requires_grad_()  # teacher tensors are constants even when they require grad
        div = getattr(token_stats_from_logits(zz, y, teacher_logits=uu, divergences=(name,)), name)
        (g,) = torch.autograd.grad(div.sum(), zz)
        assert g[0].tolist() == pytest.approx(grad, abs=1e-6)
        assert uu.grad is None


def test_t9_hidden_level_and_t10_temperature():
    z, u, y = t9()
    W = torch.eye(3, dtype=D, requires_grad=True)
    h = z.clone().requires_grad_()
    out = token_stats(h, W, y, teacher_hidden=u, teacher_weight=W, divergences=ALL)
    assert (out.reverse_kl.item(), out.forward_kl.item(), out.jsd.item()) == pytest.approx(
        (0.085123, 0.092033, 0.021901), abs=1e-6)
    (gh, gw) = torch.autograd.grad(out.reverse_kl.sum(), (h, W))  # the shared head gets the student's gradient only
    assert gh[0].tolist() == pytest.approx([0.175945, -0.098118, -0.077827], abs=1e-6)
    torch.testing.assert_close(gw, gh.t() @ z, rtol=0, atol=1e-12)
    out = token_stats_from_logits(z, y, teacher_logits=u, divergences=ALL, temperature=2.0)
    assert (out.reverse_kl.item(), out.forward_kl.item(), out.jsd.item(), out.entropy.item()) == pytest.approx(
        (0.024574, 0.024647, 0.006137, 1.015757), abs=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 40), st.integers(1, 200), st.integers(1, 24), st.integers(1, 24),
       st.sampled_from([0.3, 1.0, 1.7]), st.booleans(), st.sampled_from([0.2, 0.5]), st.integers(1, 9),
       st.sampled_from([1.0, 4.0]))
def test_fp64_teacher_matches_reference(seed, n, v, d, dt, temperature, bias, beta, chunk, scale):
    g = torch.Generator().manual_seed(seed)
    h, th = torch.randn(n, d, generator=g, dtype=D), torch.randn(n, dt, generator=g, dtype=D)
    W = torch.randn(v, d, generator=g, dtype=D) * scale / math.sqrt(d)
    tw = torch.randn(v, dt, generator=g, dtype=D) * scale / math.sqrt(dt)
    b = torch.randn(v, generator=g, dtype=D) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    mask = torch.rand(n, generator=g) < 0.8
    gm = torch.rand(n, generator=g) < 0.6
    up = torch.randn(5, n, generator=g, dtype=D) * (torch.rand(n, generator=g) < 0.7)
    ours = [h.clone().requires_grad_(), W.clone().requires_grad_()]
    theirs = [h.clone().requires_grad_(), W.clone().requires_grad_()]
    kw = dict(bias=b, temperature=temperature, mask=mask, teacher_hidden=th, teacher_weight=tw, divergences=ALL,
              jsd_beta=beta)
    out = token_stats(*ours, y, grad_mask=gm, chunk_size=chunk, **kw)
    ref = reference_token_stats(y, hidden=theirs[0], weight=theirs[1], **kw)
    names = ("logp", "entropy", *ALL)
    for name in names:
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=0, atol=1e-10)
    if n == 0:
        return
    sel = (gm & mask).to(D)
    loss = sum((up[k] * getattr(out, name)).sum() for k, name in enumerate(names))
    ref_loss = sum((sel * up[k] * getattr(ref, name)).sum() for k, name in enumerate(names))
    if not loss.requires_grad:
        return
    for a, r in zip(torch.autograd.grad(loss, ours), torch.autograd.grad(ref_loss, theirs), strict=True):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-9)


def test_logits_level_teacher_fp32_large_offset():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(12, 4000, generator=g) * 4 + 1e4
    u = z + torch.randn(12, 4000, generator=g)
    y = torch.randint(0, 4000, (12,), generator=g)
    out = token_stats_from_logits(z, y, teacher_logits=u, divergences=ALL, temperature=0.7)
    ref = reference_token_stats(y, logits=z.double(), teacher_logits=u.double(), divergences=ALL, temperature=0.7)
    for name in ("logp", "entropy", *ALL):
        err = (getattr(out, name).double() - getattr(ref, name)).abs()
        assert (err <= 1e-5 + 1e-5 * getattr(ref, name).abs()).all(), name


@pytest.mark.parametrize("name,beta_trl", [("reverse_kl", 1.0), ("forward_kl", 0.0), ("jsd", 0.5), ("jsd", 0.2)])
def test_agrees_with_trl_chunked_divergence(name, beta_trl):
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    g = torch.Generator().manual_seed(0)
    n, v, d = 29, 400, 16
    h, th = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    W = torch.randn(v, d, generator=g) / 3
    tw = W + 0.2 * torch.randn(v, d, generator=g) / 3  # a teacher that correlates with the student (§8.3)
    b, tb = torch.randn(v, generator=g), torch.randn(v, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    a = torch.randn(n, generator=g)
    ours = [x.clone().requires_grad_() for x in (h, W, b)]
    theirs = [x.clone().requires_grad_() for x in (h, W, b)]
    beta = beta_trl if name == "jsd" else 0.5
    out = token_stats(ours[0], ours[1], y, bias=ours[2], teacher_hidden=th, teacher_weight=tw, teacher_bias=tb,
                      divergences=(name,), jsd_beta=beta, temperature=0.8)
    div, ent = ChunkedDivergenceFunction.apply(*theirs, th, tw, tb, beta_trl, 0.8)
    torch.testing.assert_close(getattr(out, name), div, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(out.entropy, ent, rtol=1e-5, atol=2e-5)
    for x, r in zip(torch.autograd.grad((a * getattr(out, name)).sum(), ours),
                    torch.autograd.grad((a * div).sum(), theirs), strict=True):
        assert (x - r).norm() / r.norm() <= 2e-5


def test_selective_backward_with_teacher_counts_rows():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(10, 8, generator=g, dtype=D, requires_grad=True)
    W = torch.randn(50, 8, generator=g, dtype=D)
    th, tw = torch.randn(10, 4, generator=g, dtype=D), torch.randn(50, 4, generator=g, dtype=D)
    y = torch.randint(0, 50, (10,), generator=g)
    gm = torch.zeros(10, dtype=torch.bool)
    gm[[1, 4, 7]] = True
    kernels.reset_counters()
    out = token_stats(h, W, y, grad_mask=gm, teacher_hidden=th, teacher_weight=tw, divergences=("jsd",))
    (dh,) = torch.autograd.grad(out.jsd.sum(), h)
    assert kernels.counters() == {"rows_forward": 10, "rows_backward": 3}
    assert (dh[~gm] == 0).all() and (dh[gm] != 0).all()


def test_invalid_teacher_arguments():
    z, u, y = t9()
    W = torch.eye(3, dtype=D)
    with pytest.raises(ValueError, match="need a teacher"):
        token_stats_from_logits(z, y, divergences=("jsd",))
    with pytest.raises(ValueError, match="silently ignored teacher"):
        token_stats_from_logits(z, y, teacher_logits=u)
    with pytest.raises(ValueError, match="did you mean 'reverse_kl'"):
        token_stats_from_logits(z, y, teacher_logits=u, divergences=("reverse_k",))
    for beta in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="forward_kl"):
            token_stats_from_logits(z, y, teacher_logits=u, divergences=("jsd",), jsd_beta=beta)
    with pytest.raises(ValueError, match="teacher vocab 4 != student vocab 3"):
        token_stats(z, W, y, teacher_hidden=u, teacher_weight=torch.eye(4, 3, dtype=D), divergences=("jsd",))
    with pytest.raises(ValueError, match="leading shape"):
        token_stats(z, W, y, teacher_hidden=u.expand(2, 3), teacher_weight=W, divergences=("jsd",))
    with pytest.raises(ValueError, match="share one vocabulary"):
        token_stats_from_logits(z, y, teacher_logits=torch.zeros(1, 4, dtype=D), divergences=("jsd",))
