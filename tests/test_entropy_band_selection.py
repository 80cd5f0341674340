"""SPINE selection pieces (specs/entropy_band_grpo.md §9: S1–S4, P1, W1)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from objectives.entropy_band import band_bounds, forking_mask, window_entropy

D = torch.float64


def test_s1_s2_per_sequence_top_quantile_and_padding():
    s = torch.arange(1, 11, dtype=D)[None] / 10
    m = torch.ones(1, 10)
    assert forking_mask(s, m, 0.2).nonzero()[:, 1].tolist() == [8, 9]
    for pad in (100.0, float("nan")):
        s2 = torch.cat([s, torch.tensor([[pad]], dtype=D)], 1)
        m2 = torch.cat([m, torch.zeros(1, 1)], 1)
        for scope in ("per_sequence", "per_group", "global_batch"):
            f = forking_mask(s2, m2, 0.2, scope, group_ids=torch.tensor([0]))
            assert f.nonzero()[:, 1].tolist() == [8, 9], scope


def test_s3_quantile_band():
    h = torch.tensor([[1.0, 2, 3, 4, 5]], dtype=D)
    lo, hi = band_bounds(h, torch.ones(1, 5, dtype=torch.bool))
    assert (lo.item(), hi.item()) == pytest.approx((1.4, 3.0))


def test_s4_otsu_and_median_mad():
    h = torch.tensor([[0.0, 0, 2, 3]])
    f = forking_mask(h, torch.ones(1, 4), method="otsu")
    assert f.tolist() == [[False, False, True, True]]
    lo, hi = band_bounds(h, f, mode="median_mad")
    assert (lo.item(), hi.item()) == pytest.approx((2.5 - 1.4826 * 0.5, 2.5), abs=1e-6)
    h2 = torch.tensor([[2.0, 2.0]])
    f2 = forking_mask(h2, torch.ones(1, 2), method="otsu")
    assert f2.all()
    lo, hi = band_bounds(h2, f2, mode="median_mad")
    assert (lo.item(), hi.item()) == pytest.approx((1.999999, 2.0), abs=1e-7)
    assert forking_mask(torch.tensor([[1.0]]), torch.ones(1, 1), method="otsu").all()
    lo, hi = band_bounds(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2, dtype=torch.bool))
    assert (lo.item(), hi.item()) == (0.0, 0.0)  # no forking token: unused band


@pytest.mark.parametrize("dtype", [torch.float32, D])
def test_p1_scopes(dtype):
    s = torch.tensor([[0.1, 0.9, 0.5], [0.3, 9.0, 9.0], [2.0, 1.0, 9.0]], dtype=dtype)
    m = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    g = torch.tensor([0, 0, 1])
    T, F = True, False
    assert forking_mask(s, m, 0.5, "per_sequence").tolist() == [[F, T, T], [T, F, F], [T, F, F]]
    assert forking_mask(s, m, 0.5, "per_group", group_ids=g).tolist() == [[F, T, T], [F, F, F], [T, F, F]]
    assert forking_mask(s, m, 0.5, "global_batch").tolist() == [[F, T, F], [F, F, F], [T, T, F]]


def test_w1_window_entropy():
    s = torch.tensor([[1.0, 2, 3, 4, 5, 6]], dtype=D)
    m = torch.ones(1, 6)
    assert window_entropy(s, m, 4).tolist() == [[2.5, 3.5, 4.5, 5.0, 5.5, 6.0]]
    assert window_entropy(s, m, 4, offset=1).tolist() == [[3.5, 4.5, 5.0, 5.5, 6.0, 6.0]]
    out = window_entropy(s, torch.tensor([[1, 1, 0, 1, 1, 1]]), 2)
    assert out.tolist() == [[1.5, 3.0, 0.0, 4.5, 5.5, 6.0]]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="unknown method"):
        forking_mask(torch.zeros(1, 2), torch.ones(1, 2), method="kmeans")
    with pytest.raises(ValueError, match="unknown band mode"):
        band_bounds(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), mode="iqr")
    with pytest.raises(ValueError, match="non-finite"):
        forking_mask(torch.tensor([[1.0, float("nan")]]), torch.ones(1, 2), method="otsu")


def slow_window(s: list[float], m: list[int], w: int, offset: int) -> list[float]:
    idx = [t for t, v in enumerate(m) if v]
    out = [0.0] * len(s)
    for j, t in enumerate(idx):
        window = [s[idx[k]] for k in range(j + offset, min(j + offset + w, len(idx)))]
        out[t] = sum(window) / len(window) if window else s[t]
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.booleans()), min_size=1, max_size=12), st.integers(1, 5),
       st.sampled_from([0, 1]))
def test_window_entropy_matches_slow_reference(tokens, w, offset):
    s = [t[0] for t in tokens]
    m = [int(t[1]) for t in tokens]
    got = window_entropy(torch.tensor([s], dtype=D), torch.tensor([m]), w, offset=offset)[0].tolist()
    assert got == pytest.approx(slow_window(s, m, w, offset), abs=1e-12)
