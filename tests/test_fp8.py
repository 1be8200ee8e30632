"""FP8 row quantization of gradients (fp4compile.runtime.fp8)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp4compile.runtime.fp8 import FP8_DTYPES, get_fp8_dtype, quantize_fp8_rows

# (max, unit roundoff 2^-(mantissa bits + 1), smallest subnormal) from the formats' definitions
FP8_PARAMS = {
    torch.float8_e4m3fn: (448.0, 2.0**-4, 2.0**-9),  # 3 mantissa bits, bias 7
    torch.float8_e5m2: (57344.0, 2.0**-3, 2.0**-16),  # 2 mantissa bits, bias 15
}


def test_dtype_params_match_torch():
    for dtype, (fmax, _, tiny) in FP8_PARAMS.items():
        assert torch.finfo(dtype).max == fmax
        assert torch.tensor(tiny).to(dtype).float().item() == tiny
        assert torch.tensor(tiny / 2 * 0.99).to(dtype).float().item() == 0.0


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 20), min_size=1, max_size=3),
    log_mag=st.floats(-4, 4),
    seed=st.integers(0, 2**31 - 1),
    fp8=st.sampled_from(list(FP8_PARAMS)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_rows_error_bound(shape, log_mag, seed, fp8, dtype):
    """|data * scale - x| <= u |x| (relative rounding of the FP8 dtype) + half the smallest subnormal times the
    row's scale (underflow of entries far below the row max), plus float32 slack."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g)) * 10.0**log_mag)
    x = x.clamp(-6e4, 6e4).to(dtype)
    data, scale = quantize_fp8_rows(x, fp8)
    fmax, u, tiny = FP8_PARAMS[fp8]
    assert data.dtype == fp8 and data.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (*x.shape[:-1], 1)
    x64 = x.double()
    amax = x64.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(scale.double(), amax / fmax, rtol=2.0**-23, atol=0)
    approx = data.double() * scale.double()
    bound = u * x64.abs() + tiny / 2 * scale.double() + 2.0**-22 * x64.abs()
    assert bool(((approx - x64).abs() <= bound).all())
    # the row's amax maps onto the FP8 max (no overflow to NaN/inf)
    nonzero = amax.squeeze(-1) > 0
    assert bool((data.float().abs().amax(-1)[nonzero] == fmax).all())
    assert bool(torch.isfinite(data.float()).all())


@pytest.mark.parametrize("fp8", list(FP8_PARAMS))
def test_zero_rows(fp8):
    x = torch.randn(3, 16)
    x[1] = 0.0
    data, scale = quantize_fp8_rows(x, fp8)
    assert scale[1].item() == 0.0
    assert torch.equal(data[1].float(), torch.zeros(16))
    assert not data.float().isnan().any() and not scale.isnan().any()


@pytest.mark.parametrize("fp8", list(FP8_PARAMS))
def test_tiny_rows_scale_at_least_smallest_normal(fp8):
    """A row whose amax / max is below 2^-126 gets scale 2^-126 (its reciprocal stays finite): its values
    are then x / 2^-126, well inside the FP8 range, and round-trip exactly here."""
    x = torch.tensor([[2.0**-130, -(2.0**-127), 0.0]])
    data, scale = quantize_fp8_rows(x, fp8)
    assert scale.item() == 2.0**-126
    assert data.float().tolist() == [[2.0**-4, -0.5, 0.0]]


@pytest.mark.parametrize("fp8", list(FP8_PARAMS))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_inf_rows(fp8, bad):
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    x[1, 3] = bad
    data, scale = quantize_fp8_rows(x, fp8)
    assert scale[1].isnan().all() and not scale[[0, 2]].isnan().any()
    assert not data[[0, 2]].float().isnan().any()


def test_hand_worked_e4m3():
    # amax 896 -> scale 2; 896 / 2 = 448; 3 / 2 = 1.5; 100 / 2 = 50 -> E4M3 48 or 52 (step 4 in [32, 64)): tie -> 48
    x = torch.tensor([[896.0, 3.0, 100.0, -0.001]])
    data, scale = quantize_fp8_rows(x, torch.float8_e4m3fn)
    assert scale.item() == 2.0
    # -0.001 / 2 = -0.0005 < 2^-10 (half the smallest subnormal): flushes to -0
    assert data.float().tolist() == [[448.0, 1.5, 48.0, -0.0]]


def test_get_fp8_dtype():
    assert get_fp8_dtype("float8_e5m2") is torch.float8_e5m2
    assert get_fp8_dtype("float8_e4m3fn") is torch.float8_e4m3fn
    assert set(FP8_DTYPES) == {"float8_e5m2", "float8_e4m3fn"}
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        get_fp8_dtype("float8_e4m3")


@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_grad_operands_fold_quantize_and_skip_what_is_not_needed(need):
    """grad_operands (the reference path, on CPU): dY times B's per-row scales quantized per row for dA,
    dY^T times A's per-row scales quantized per row for dB ([N, M]), None where a gradient is not needed."""
    from fp4compile.runtime.fp8 import grad_operands

    g = torch.Generator().manual_seed(0)
    dy = torch.randn(6, 5, generator=g).bfloat16()
    fold_dx, fold_dw = torch.rand(1, 5, generator=g) + 0.5, torch.rand(1, 6, generator=g) + 0.5
    for_dx, for_dw = grad_operands(dy, fold_dx, fold_dw, torch.float8_e5m2, *need)
    want_dx = quantize_fp8_rows(dy.float() * fold_dx, torch.float8_e5m2)
    want_dw = quantize_fp8_rows(dy.float().mT * fold_dw, torch.float8_e5m2)
    for got, want, needed in ((for_dx, want_dx, need[0]), (for_dw, want_dw, need[1])):
        assert (got is not None) == needed
        if needed:
            assert got[0].shape == want[0].shape and torch.equal(got[0].float(), want[0].float())
            assert torch.equal(got[1], want[1])
    if need[1]:
        assert for_dw[0].shape == (5, 6)
