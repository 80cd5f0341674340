"""The compiled logits-level fold (specs/kernels.md §3.7, §4 "CPU compile"): same numbers, one warning on failure."""

import pytest
import torch

import kernels
from kernels import compiled, reference_token_stats, token_stats_from_logits


def case(offset: float = 1e4):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, 3000, generator=g) * 4 + offset
    y = torch.randint(0, 3000, (40,), generator=g)
    mask = torch.rand(40, generator=g) < 0.8
    return z, y, mask


def test_compiled_fold_matches_fp64_and_backward_still_works(monkeypatch):
    monkeypatch.setenv("TOKENSEL_KERNELS_COMPILE", "1")
    z, y, mask = case()
    zz = z.clone().requires_grad_()
    out = token_stats_from_logits(zz, y, temperature=0.7, mask=mask)
    assert compiled.wants_compile(z, 40) and not compiled._failed
    ref = reference_token_stats(y, logits=z.double(), temperature=0.7, mask=mask)
    for name in ("logp", "entropy"):
        err = (getattr(out, name).double() - getattr(ref, name)).abs()
        assert (err <= 1e-5 + 1e-5 * getattr(ref, name).abs()).all(), name
    assert (out.logp <= 0).all() and (out.entropy >= 0).all()
    monkeypatch.setenv("TOKENSEL_KERNELS_COMPILE", "0")
    eager = token_stats_from_logits(z.clone().requires_grad_(), y, temperature=0.7, mask=mask)
    (g,) = torch.autograd.grad(out.logp.sum(), zz)
    assert (g[~mask] == 0).all()
    torch.testing.assert_close(out.logp, eager.logp, rtol=1e-5, atol=2e-5)


def test_compile_failure_warns_once_and_falls_back(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setenv("TOKENSEL_KERNELS_COMPILE", "1")
    monkeypatch.setattr(compiled, "_compiled", broken)
    monkeypatch.setattr(compiled, "_failed", False)
    z, y, mask = case(0.0)
    with pytest.warns(UserWarning, match="torch.compile failed .*no C\\+\\+ compiler"):
        out = token_stats_from_logits(z, y, mask=mask)
    ref = reference_token_stats(y, logits=z.double(), mask=mask)
    torch.testing.assert_close(out.logp.double(), ref.logp, rtol=1e-5, atol=1e-5)
    assert not compiled.wants_compile(z, 40)  # later calls go straight to eager, without another warning


def test_compile_setting_is_validated(monkeypatch):
    monkeypatch.setenv("TOKENSEL_KERNELS_COMPILE", "yes")
    with pytest.raises(ValueError, match="TOKENSEL_KERNELS_COMPILE"):
        kernels.token_stats_from_logits(torch.zeros(2, 3), torch.tensor([0, 1]))
