"""OCC (outlier clamping and compensation): nearest-rank quantile thresholds, clamp, residual."""

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp4compile.runtime.occ import occ_clamp, occ_thresholds


def ref_thresholds(values: list[float], q: float) -> tuple[float, float]:
    """Nearest rank: upper is the smallest value v with #(x <= v) >= q * n; lower the largest v with #(x >= v) >= q * n."""
    s = sorted(values)
    n = len(s)
    qn = Fraction(str(q)) * n  # exact: alpha is meant as the decimal it is written as
    upper = next(s[i] for i in range(n) if i + 1 >= qn)
    lower = next(s[n - 1 - i] for i in range(n) if i + 1 >= qn)
    return lower, upper


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 3000),
    q=st.sampled_from([0.99, 0.999, 0.9995, 0.9, 0.75, 0.51, 1.0]),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_thresholds_nearest_rank(n, q, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))).to(dtype)
    lower, upper = occ_thresholds(x.reshape(-1, 1) if n % 2 else x, q)  # any shape: the whole tensor counts
    assert lower.dtype == dtype and upper.dtype == dtype and lower.dim() == 0
    assert (lower.item(), upper.item()) == ref_thresholds(x.tolist(), q)
    # about (1 - q) * n entries lie strictly beyond each threshold (fewer only with ties at the threshold)
    above, below = int((x > upper).sum()), int((x < lower).sum())
    k = -(-Fraction(str(q)) * n // 1)  # exact ceil(q n)
    assert above <= n - k and below <= n - k
    if x.unique().numel() == n:
        assert above == n - k and below == n - k
    assert abs((n - k) - (1 - q) * n) < 1


@settings(max_examples=50, deadline=None)
@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    q=st.sampled_from([0.99, 0.999, 0.9]),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
)
def test_clamp_residual_exact_half_precision(shape, q, seed, dtype):
    """For bf16/fp16 activations (whose differences fit float32's 24 bits) clamp + residual == x exactly."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))).to(dtype)
    clamped, residual = occ_clamp(x, q)
    lower, upper = occ_thresholds(x, q)
    assert clamped.dtype == dtype and residual.dtype == torch.float32 and clamped.shape == x.shape
    assert torch.equal(clamped.double() + residual.double(), x.double())
    inside = (x >= lower) & (x <= upper)
    assert torch.equal(clamped[inside], x[inside])
    assert bool((residual[inside] == 0).all())
    assert bool((residual[x > upper] > 0).all()) and bool((residual[x < lower] < 0).all())
    assert bool((clamped >= lower).all()) and bool((clamped <= upper).all())


def test_clamp_residual_float32():
    """float32 activations: the residual is x - clamp(x) rounded to float32 once (exact when x and the threshold
    are within a factor 2, Sterbenz), so clamp + residual is x up to half an ulp of the residual."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100000, generator=g) * torch.exp(torch.randn(100000, generator=g) * 2)
    clamped, residual = occ_clamp(x, 0.99)
    assert torch.equal(residual, x - clamped)
    err = (clamped.double() + residual.double() - x.double()).abs()
    assert bool((err <= 2.0**-24 * residual.double().abs()).all())
    lower, upper = occ_thresholds(x, 0.99)
    near = ((x > upper) & (x <= 2 * upper)) | ((x < lower) & (x >= 2 * lower))
    assert torch.equal(clamped.double()[near] + residual.double()[near], x.double()[near])
    assert int((residual != 0).sum()) == 2 * 1000  # (1 - 0.99) * n on each side, no ties in random floats


def test_quantile_one_is_identity():
    x = torch.randn(500, generator=torch.Generator().manual_seed(1))
    clamped, residual = occ_clamp(x, 1.0)
    assert torch.equal(clamped, x) and bool((residual == 0).all())
    lower, upper = occ_thresholds(x, 1.0)
    assert lower == x.min() and upper == x.max()


def test_hand_worked():
    # n = 10, q = 0.9: upper = ceil(9)-th smallest = 9, lower = 2nd smallest = 2
    x = torch.tensor([5.0, 1.0, 10.0, 3.0, 2.0, 9.0, 4.0, 8.0, 6.0, 7.0])
    lower, upper = occ_thresholds(x, 0.9)
    assert (lower.item(), upper.item()) == (2.0, 9.0)
    clamped, residual = occ_clamp(x, 0.9)
    assert clamped.tolist() == [5.0, 2.0, 9.0, 3.0, 2.0, 9.0, 4.0, 8.0, 6.0, 7.0]
    assert residual.tolist() == [0.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("q", [0.5, 0.3, 0.0, 1.01, -0.99])
def test_bad_quantile(q):
    with pytest.raises(ValueError, match=r"\(0\.5, 1\]"):
        occ_thresholds(torch.randn(10), q)
    with pytest.raises(ValueError):
        occ_clamp(torch.randn(10), q)


def test_empty():
    x = torch.empty(0, 8, dtype=torch.bfloat16)
    clamped, residual = occ_clamp(x, 0.99)
    assert clamped.shape == (0, 8) and residual.shape == (0, 8) and residual.dtype == torch.float32
