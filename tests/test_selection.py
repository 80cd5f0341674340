"""Selection primitives: spec vectors (entropy_band_grpo.md §9), TRL parity and a slow reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from objectives.selection import check_finite, quantile_linear, top_fraction_mask
from tests.trl_standin import high_entropy_mask

T_, F_ = True, False


def reference_mask(stat, mask, keep, units):
    """Slow reference: for each unit (list of (row, col)), keep tokens >= torch.quantile(values, 1 - keep)."""
    out = torch.zeros_like(mask, dtype=torch.bool)
    for unit in units:
        cells = [(i, j) for i, j in unit if mask[i, j]]
        if not cells:
            continue
        vals = torch.stack([stat[i, j] for i, j in cells]).to(torch.float64 if stat.dtype == torch.float64 else torch.float32)
        tau = torch.quantile(vals, 1 - keep) if keep < 1 else None
        for i, j in cells:
            out[i, j] = keep >= 1 or bool(vals.new_tensor(stat[i, j].item()) >= tau)
    return out


def test_s1_per_sequence_top_two():
    s = torch.tensor([[0.1 * i for i in range(1, 11)]])
    sel, tau = top_fraction_mask(s, torch.ones_like(s), 0.2)
    assert sel[0].nonzero().flatten().tolist() == [8, 9]
    assert tau.item() == pytest.approx(0.82)


@pytest.mark.parametrize("pad", [100.0, float("nan")])
@pytest.mark.parametrize("scope", ["per_sequence", "per_group", "global_batch"])
def test_s2_padding_is_never_selected(pad, scope):
    s = torch.tensor([[0.1 * i for i in range(1, 11)] + [pad]])
    m = torch.tensor([[1] * 10 + [0]])
    sel, _ = top_fraction_mask(s, m, 0.2, scope, group_ids=torch.tensor([0]))
    assert sel[0].nonzero().flatten().tolist() == [8, 9]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_p1_scopes(dtype):
    s = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.0, 0.0], [2.0, 1.0, 0.0]], dtype=dtype)
    m = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    g = torch.tensor([0, 0, 1])
    expect = {
        "per_sequence": [[F_, T_, T_], [T_, F_, F_], [T_, F_, F_]],
        "per_group": [[F_, T_, T_], [F_, F_, F_], [T_, F_, F_]],
        "global_batch": [[F_, T_, F_], [F_, F_, F_], [T_, T_, F_]],
    }
    for scope, want in expect.items():
        sel, _ = top_fraction_mask(s, m, 0.5, scope, group_ids=g)
        assert sel.tolist() == want, scope


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_t1_global_mask_matches_trl(dtype):
    h = torch.tensor([[0.1, 0.5, 0.9, 0.0], [0.2, 0.3, 0.4, 0.8]], dtype=dtype)
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    ours, _ = top_fraction_mask(h, m, 0.5, "global_batch")
    assert ours.tolist() == [[F_, T_, T_, F_], [F_, F_, T_, T_]]
    assert torch.equal(ours, high_entropy_mask(h, m, 0.5))


def test_t1_float64_keeps_exact_threshold():
    h = torch.tensor([[0.1, 0.5, 0.9, 0.0], [0.2, 0.3, 0.4, 0.8]], dtype=torch.float64)
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    ours, _ = top_fraction_mask(h, m, 0.5, "global_batch")
    assert ours.tolist() == [[F_, T_, T_, F_], [F_, F_, T_, T_]]
    assert high_entropy_mask(h, m, 0.5).tolist() == [[F_, T_, T_, F_], [F_, F_, F_, T_]]  # TRL's fp32 threshold


def test_keep_one_and_zero():
    s = torch.tensor([[3.0, 1.0, 2.0], [5.0, 5.0, 0.0]])
    m = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert torch.equal(top_fraction_mask(s, m, 1.0)[0], m.bool())
    assert top_fraction_mask(s, m, 0.0)[0].tolist() == [[T_, F_, F_], [T_, T_, F_]]  # maximum, ties kept


def test_empty_unit_selects_nothing():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    m = torch.tensor([[0, 0], [1, 1]])
    sel, tau = top_fraction_mask(s, m, 0.5)
    assert sel.tolist() == [[F_, F_], [F_, T_]]
    assert torch.isnan(tau[0])


def test_errors():
    s = torch.tensor([[1.0, float("inf")]])
    with pytest.raises(ValueError, match=r"row 0, position 1"):
        check_finite(s, torch.ones_like(s))
    with pytest.raises(ValueError, match="keep"):
        top_fraction_mask(s, torch.ones_like(s), 1.5)
    with pytest.raises(ValueError, match="scope"):
        top_fraction_mask(s, torch.ones_like(s), 0.5, "per_batch")
    with pytest.raises(ValueError, match="group_ids"):
        top_fraction_mask(torch.ones(1, 2), torch.ones(1, 2), 0.5, "per_group")


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.floats(0.0, 1.0), st.sampled_from([torch.float32, torch.float64]), st.integers(0, 10**6))
def test_quantile_linear_matches_torch(n, q, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g, dtype=dtype)
    assert torch.equal(quantile_linear(v, q, 0), torch.quantile(v, q))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 7),
    st.floats(0.0, 1.0),
    st.sampled_from(["per_sequence", "per_group", "global_batch"]),
    st.integers(0, 10**6),
)
def test_top_fraction_matches_reference(B, T, keep, scope, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(B, T, generator=g, dtype=torch.float64).round(decimals=1)  # ties on purpose
    m = (torch.rand(B, T, generator=g) < 0.7).long()
    groups = torch.randint(0, 2, (B,), generator=g)
    if scope == "per_sequence":
        units = [[(i, j) for j in range(T)] for i in range(B)]
    elif scope == "per_group":
        units = [[(i, j) for i in range(B) if groups[i] == gid for j in range(T)] for gid in groups.unique()]
    else:
        units = [[(i, j) for i in range(B) for j in range(T)]]
    ours, _ = top_fraction_mask(s, m, keep, scope, group_ids=groups)
    assert torch.equal(ours, reference_mask(s, m, keep, units))
