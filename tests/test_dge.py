"""DGE (differentiable gradient estimator): the smooth quantizer f and its clipped derivative, checked against
the method's formula evaluated here in float64 and against torch.autograd of f."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp4compile.runtime.dge import _interval, dge_derivative, dge_smooth

# The quantization intervals of the scaled weight's magnitude (docs/method.md): width 0.5 below 2, 1 below 4, 2 to 6.
INTERVALS = [(0.0, 0.5), (0.5, 1.0), (1.0, 1.5), (1.5, 2.0), (2.0, 3.0), (3.0, 4.0), (4.0, 6.0)]
GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
MIDPOINTS = [(a + b) / 2 for a, b in INTERVALS]


def _t(m: float) -> tuple[float, float, float]:
    """(a, d, t = 2u - 1) for magnitude m in [0, 6]."""
    for a, b in INTERVALS:
        if a <= m < b or (b == 6.0 and m == 6.0):
            d = b - a
            return a, d, 2 * (m - a) / d - 1
    raise ValueError(m)


def ref_f(w: float, k: float = 5.0) -> float:
    a, d, t = _t(abs(w))
    return math.copysign(a + d * (1 + math.copysign(abs(t) ** (1 / k), t)) / 2, w)


def ref_df(w: float, k: float = 5.0, clip: float = 3.0) -> float:
    _, _, t = _t(abs(w))
    return clip if t == 0 else min(abs(t) ** (1 / k - 1) / k, clip)


POINTS = torch.linspace(-6, 6, 4801)  # float32, includes every grid point and midpoint


@pytest.mark.parametrize("k", [5.0, 3.0])
def test_f_matches_formula(k):
    got = dge_smooth(POINTS, k).double()
    want = torch.tensor([ref_f(w, k) for w in POINTS.tolist()], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k,clip", [(5.0, 3.0), (3.0, 10.0)])
def test_derivative_matches_formula(k, clip):
    got = dge_derivative(POINTS, k, clip).double()
    want = torch.tensor([ref_df(w, k, clip) for w in POINTS.tolist()], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_hand_worked_values():
    # w = 0.375: interval [0, 0.5], u = 0.75, t = 0.5: f = 0.5 * (1 + 0.5^0.2) / 2, f' = 0.2 * 0.5^-0.8
    w = torch.tensor([0.375, -0.375, 5.5])
    f = dge_smooth(w).tolist()
    assert f[0] == pytest.approx(0.25 * (1 + 0.5**0.2), rel=1e-6)
    assert f[1] == pytest.approx(-0.25 * (1 + 0.5**0.2), rel=1e-6)
    # w = 5.5: interval [4, 6], u = 0.75, t = 0.5: f = 4 + 2 * (1 + 0.5^0.2) / 2
    assert f[2] == pytest.approx(4 + (1 + 0.5**0.2), rel=1e-6)
    assert dge_derivative(w).tolist() == pytest.approx([0.2 * 0.5**-0.8] * 3, rel=1e-6)


def test_f_hits_grid_points_and_is_continuous():
    grid = torch.tensor(GRID + [-g for g in GRID])
    assert torch.equal(dge_smooth(grid), grid)
    for g in GRID[1:]:
        for eps in (1e-3, 1e-4):
            near = torch.tensor([g - eps, g + eps] if g < 6 else [g - eps])
            # slope at an interval end is 1/k = 0.2, so |f(g +- eps) - g| ~ 0.2 eps on both sides
            assert bool(((dge_smooth(near) - g).abs() <= 0.3 * eps + 1e-6).all()), (g, eps)


def test_f_midpoints_odd_monotone_and_within_interval():
    mids = torch.tensor(MIDPOINTS)
    assert torch.allclose(dge_smooth(mids), mids)  # t = 0: f = a + d/2
    f = dge_smooth(POINTS)
    assert torch.equal(dge_smooth(-POINTS), -f)
    assert bool((f[1:] >= f[:-1]).all())
    for a, b in INTERVALS:
        inside = (POINTS.abs() >= a) & (POINTS.abs() <= b)
        assert bool(((f.abs()[inside] >= a) & (f.abs()[inside] <= b)).all())


def test_k1_is_identity():
    torch.testing.assert_close(dge_smooth(POINTS, k=1.0), POINTS, rtol=0, atol=1e-6)
    assert torch.allclose(dge_derivative(POINTS, k=1.0), torch.ones_like(POINTS))


@pytest.mark.parametrize("k", [1.0, 5.0])
def test_derivative_equals_the_xlogy_form_with_nan_and_midpoints(k):
    """exp(e * ln t) with a Python exponent computes what exp(xlogy(e, t)) did: the same at the midpoints
    (t = 0, where k = 1 needs t^0 = 1) and for NaN weights, elsewhere within a few ulp (CPU's vectorized log
    and xlogy's scalar one differ by an ulp, which exp scales by e * ln t)."""
    def xlogy_form(w):
        _, _, u = _interval(w)
        return (torch.exp(torch.special.xlogy(1 / k - 1, (2 * u - 1).abs())) / k).clamp(max=3.0)

    special = torch.tensor(MIDPOINTS + [float("nan"), 0.0, 6.0, -6.0])
    assert torch.equal(dge_derivative(special, k).nan_to_num(-1.0), xlogy_form(special).nan_to_num(-1.0))
    torch.testing.assert_close(dge_derivative(POINTS, k), xlogy_form(POINTS), rtol=1e-6, atol=0)


def test_clip_at_midpoints():
    mids = torch.tensor(MIDPOINTS + [-m for m in MIDPOINTS])
    assert dge_derivative(mids).tolist() == [3.0] * len(mids)
    assert dge_derivative(mids, clip=10.0).tolist() == [10.0] * len(mids)
    # (1/5) |t|^-0.8 reaches 3 at |t| = 15^-1.25 = 0.0339: clipped inside, not outside
    for a, b in INTERVALS:
        d = b - a
        mid = (a + b) / 2
        inner = torch.tensor([mid - 0.015 * d, mid + 0.015 * d])  # |t| = 0.03
        outer = torch.tensor([mid - 0.025 * d, mid + 0.025 * d])  # |t| = 0.05 -> 0.2 * 0.05^-0.8 = 2.198
        assert dge_derivative(inner).tolist() == [3.0, 3.0]
        assert dge_derivative(outer).tolist() == pytest.approx([0.2 * 0.05**-0.8] * 2, rel=1e-4)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.sampled_from([5.0, 3.0, 8.0]))
def test_derivative_matches_autograd(seed, k):
    """Away from the midpoints (where the clip is active) dge_derivative is exactly d dge_smooth / dw."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(2000, generator=g) * 12 - 6).clamp(-6, 6)
    t = torch.tensor([_t(abs(v))[2] for v in w.tolist()])
    thresh = (3.0 * k) ** (-1 / (1 - 1 / k))  # |t| where (1/k)|t|^(1/k - 1) = 3
    keep = (t.abs() > 1.5 * thresh) & (w != 0)
    w = w[keep].requires_grad_(True)
    dge_smooth(w, k).sum().backward()
    torch.testing.assert_close(w.grad, dge_derivative(w.detach(), k), rtol=1e-4, atol=1e-6)
    assert bool((w.grad < 3.0).all())


def test_derivative_even():
    assert torch.equal(dge_derivative(-POINTS), dge_derivative(POINTS))
