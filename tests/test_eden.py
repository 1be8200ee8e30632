"""MS-EDEN: unbiased over random rotations and scale rounding, with less error than stochastic rounding.

Statistical tolerances: a mean over N independent draws is compared with the exact value in units of
its standard error estimated from the same draws. For E elements tested at once, the largest |z| of
unbiased estimates exceeds 5 with probability about E * 5.7e-7, so "every |z| < 5" fails by chance in
under 1 in 1000 runs for E <= 1000, while a bias of 5 standard errors is caught.
"""

import pytest
import torch

from fp4compile.runtime.eden import ms_eden, stochastic_e4m3
from fp4compile.runtime.hadamard import inverse_rht, random_signs, rht
from fp4compile.runtime.quantize import fake_quantize


def _z(draws: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|mean - exact| / standard error of the mean, elementwise, over dim 0."""
    n = draws.shape[0]
    return (draws.mean(0) - exact).abs() / (draws.std(0) / n**0.5).clamp_min(1e-30)


def test_stochastic_e4m3_is_unbiased_and_lands_on_neighbours():
    gen = torch.Generator().manual_seed(0)
    s = torch.tensor([1.03, 0.3001, 200.0, 17.5, 0.0041])
    draws = torch.stack([stochastic_e4m3(s, gen) for _ in range(4000)])
    assert bool((_z(draws, s) < 5).all())
    for i in range(len(s)):
        assert draws[:, i].unique().numel() <= 2  # only the two neighbours
    assert torch.equal(draws.to(torch.float8_e4m3fn).float(), draws)  # E4M3 values


def test_ms_eden_is_unbiased_over_rotations():
    torch.manual_seed(0)
    x = torch.randn(2, 128) * torch.tensor([[1.0], [30.0]])
    draws = []
    for _ in range(2000):
        signs = random_signs(128)
        draws.append(inverse_rht(ms_eden(rht(x, signs)), signs))
    z = _z(torch.stack(draws), x)
    assert bool((z < 5).all()), float(z.max())


def test_ms_eden_product_is_unbiased():
    """E[Q(A R) Q(B R)^T] = A B^T for a random rotation R along the reduction dim shared by both
    operands and independent scale rounding: the backward GEMMs' estimator."""
    torch.manual_seed(1)
    a, b = torch.randn(4, 256), torch.randn(3, 256)
    draws = []
    for _ in range(2000):
        signs = random_signs(128)
        draws.append(ms_eden(rht(a, signs)) @ ms_eden(rht(b, signs)).T)
    z = _z(torch.stack(draws), a @ b.T)
    assert bool((z < 5).all()), float(z.max())


@pytest.mark.parametrize("dist", ["gaussian", "student_t3"])
def test_ms_eden_error_is_below_stochastic_rounding(dist):
    """Mean squared error on rotated inputs against NVFP4 with stochastic rounding of the values (the
    NVIDIA recipe's quantizer). Measured ratio: 0.52 on both (the paper reports better than 2x)."""
    torch.manual_seed(2)
    x = torch.randn(64, 256) if dist == "gaussian" else torch.distributions.StudentT(3.0).sample((64, 256))
    eden = sr = 0.0
    for _ in range(20):
        r = rht(x, random_signs(128))
        eden += float((ms_eden(r) - r).pow(2).mean())
        sr += float((fake_quantize(r, "nvfp4", rounding="stochastic") - r).pow(2).mean())
    assert eden / sr < 0.6, f"MS-EDEN / SR mean squared error = {eden / sr:.3f}"


def test_bad_group_is_refused():
    with pytest.raises(ValueError, match="multiple of the rotation group"):
        ms_eden(torch.randn(4, 96), group=64)
