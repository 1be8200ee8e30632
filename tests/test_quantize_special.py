"""Special values and bad inputs of fp4compile.quantize / fake_quantize (the behaviour documented in
fp4compile/runtime/quantize.py's module docstring and docs/formats.md)."""

import math

import pytest
import torch

from fp4compile import fake_quantize, quantize

FORMATS = ("tensor", "vector", "mxfp4", "nvfp4")
BLOCK = {"tensor": None, "vector": None, "mxfp4": 32, "nvfp4": 16}
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_zeros(fmt, dtype):
    x = torch.zeros(4, 64, dtype=dtype)
    qt = quantize(x, fmt)
    out = fake_quantize(x, fmt)
    assert out.dtype == dtype and torch.equal(out, x)
    assert torch.equal(qt.dequantize(), x)
    assert not qt.scale_float().isnan().any()
    assert torch.equal(qt.data.float(), torch.zeros(4, 64))
    if fmt in ("tensor", "vector"):
        assert bool((qt.scales == 0).all())
    elif fmt == "mxfp4":
        assert bool((qt.scales == 0).all())  # exponent clamped to -127: E8M0 code 0
    else:
        assert qt.tensor_scale.item() == 0.0 and bool((qt.scales.float() == 0).all())


@pytest.mark.parametrize("fmt", ["vector", "mxfp4", "nvfp4"])
def test_zero_group_next_to_nonzero(fmt):
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    x[0] = 0.0  # a zero row: one zero group in every format
    out = fake_quantize(x, fmt)
    assert torch.equal(out[0], torch.zeros(64))
    assert not out.isnan().any()
    assert torch.equal(fake_quantize(x[1:], fmt), out[1:])  # the zero row changes no other group's scale


@pytest.mark.parametrize("fmt", ["tensor", "vector"])
def test_tiny_groups_scale_at_least_smallest_normal(fmt):
    """Scales are floored at 2^-126 so that the reciprocal the quantizer multiplies by is finite: a group of
    subnormal values (amax / 6 below 2^-128, where 1 / scale would overflow) still rounds to the nearest
    multiple of its scale instead of saturating to +-6."""
    tiny = 2.0**-126
    x = torch.tensor([[tiny / 4, -tiny / 2, tiny / 8, 0.0]])
    qt = quantize(x, fmt)
    assert qt.scale_float().flatten()[0].item() == tiny
    assert qt.data.float().tolist() == [[0.0, -0.5, 0.0, 0.0]]  # x / 2^-126 = 0.25 (tie to 0), -0.5, 0.125
    assert torch.equal(qt.dequantize(), torch.tensor([[0.0, -tiny / 2, 0.0, 0.0]]))


EMPTY_SHAPES = [(0,), (0, 32), (3, 0), (2, 0, 32), (0, 0)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_empty(fmt, shape):
    for dim in range(-len(shape), len(shape)):
        x = torch.empty(shape)
        if BLOCK[fmt] and shape[dim] % BLOCK[fmt]:
            with pytest.raises(ValueError):
                quantize(x, fmt, dim)
            continue
        out = fake_quantize(x, fmt, dim)
        assert out.shape == x.shape and out.dtype == x.dtype
        qt = quantize(x, fmt, dim)
        assert qt.shape == x.shape
        deq = qt.dequantize()
        assert deq.shape == x.shape
        if fmt != "tensor":
            expected = list(shape)
            expected[dim] = shape[dim] // BLOCK[fmt] if BLOCK[fmt] else 1
            assert list(qt.scales.shape) == expected


@pytest.mark.parametrize("fmt", ["tensor", "vector"])
def test_zero_dim_tensor(fmt):
    x = torch.tensor(-2.5)
    out = fake_quantize(x, fmt)
    assert out.shape == () and out.item() == -2.5  # amax 2.5 -> s = 2.5/6, -2.5/s = -6 exactly (up to float32)
    assert torch.equal(quantize(x, fmt).dequantize(), out)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_zero_dim_tensor_block_format(fmt):
    with pytest.raises(ValueError, match="0-d"):
        quantize(torch.tensor(1.0), fmt)


# NaN / inf: the scaling group holding it dequantizes to NaN. For nvfp4 the FP32 tensor scale is computed from
# the whole tensor's amax, so the whole tensor becomes NaN.
POISONED_ROWS = {"tensor": "all", "vector": "row", "mxfp4": "block", "nvfp4": "all"}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_inf_poison_their_group(fmt, bad, dtype):
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    x[1, 40] = bad  # block 1 of row 1 for mxfp4 (elements 32..63)
    out = fake_quantize(x, fmt)
    qt = quantize(x, fmt)
    nan = out.isnan()
    assert torch.equal(qt.dequantize().isnan(), nan)
    expected = torch.zeros(3, 64, dtype=torch.bool)
    scope = POISONED_ROWS[fmt]
    if scope == "all":
        expected[:] = True
    elif scope == "row":
        expected[1] = True
    else:
        expected[1, 32:] = True
    assert torch.equal(nan, expected)
    # groups without a NaN/inf are quantized as if it were not there
    if scope != "all":
        clean = x.clone()
        clean[1, 40] = 0.0
        assert torch.equal(out[~expected], fake_quantize(clean, fmt)[~expected])
    if fmt == "mxfp4":
        assert qt.scales.tolist()[1][1] == 255


@pytest.mark.parametrize("fmt", FORMATS)
def test_float64(fmt):
    """float64 is accepted and returned as float64; it is quantized in float32 (the reference's working dtype)."""
    x = torch.randn(4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 1e-2
    out = fake_quantize(x, fmt)
    assert out.dtype == torch.float64
    assert torch.equal(out, fake_quantize(x.float(), fmt).double())
    qt = quantize(x, fmt)
    assert qt.dtype == torch.float64 and torch.equal(qt.dequantize(), out)


# ---------------------------------------------------------------- input errors


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "x",
    [
        torch.ones(2, 32, dtype=torch.int32),
        torch.ones(2, 32, dtype=torch.int64),
        torch.ones(2, 32, dtype=torch.uint8),
        torch.ones(2, 32, dtype=torch.bool),
        torch.ones(2, 32, dtype=torch.complex64),
        torch.ones(2, 32).to(torch.float8_e4m3fn),
        torch.ones(2, 32).to(torch.float8_e5m2),
    ],
    ids=lambda t: str(t.dtype),
)
def test_bad_dtype(fmt, x):
    for fn in (quantize, fake_quantize):
        with pytest.raises(TypeError, match=r"x\.float\(\)"):
            fn(x, fmt)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize([1.0, 2.0])


@pytest.mark.parametrize("fmt,block", [("mxfp4", 32), ("nvfp4", 16)])
def test_block_dim_not_divisible(fmt, block):
    x = torch.ones(block, block + 8)
    for fn in (quantize, fake_quantize):
        with pytest.raises(ValueError, match=rf"blocks of {block} along dim 1\b.*size {block + 8}"):
            fn(x, fmt, dim=-1)
        fn(x, fmt, dim=0)  # dim 0 has size `block`: fine


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dim", [2, -3, 5])
def test_dim_out_of_range(fmt, dim):
    for fn in (quantize, fake_quantize):
        with pytest.raises(IndexError, match="out of range"):
            fn(torch.ones(32, 32), fmt, dim)


def test_unknown_format():
    for fn in (quantize, fake_quantize):
        with pytest.raises(ValueError, match=r"unknown FP4 format 'fp4'.*'mxfp4', 'nvfp4', 'tensor', 'vector'"):
            fn(torch.ones(32), "fp4")


def test_exact_div_is_float32_division():
    """exact_div's float64 quotient rounded to float32 is the IEEE float32 quotient, over random bit
    patterns (subnormals, huge and tiny quotients, overflow and underflow included) and special values."""
    from fp4compile.runtime.quantize import exact_div

    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31, (2, 1_000_000), generator=g, dtype=torch.int64).to(torch.int32)
    a, b = bits.view(torch.float32)
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, 2.0**-149, 3.4e38])
    a = torch.cat([a, special.repeat_interleave(len(special))])
    b = torch.cat([b, special.repeat(len(special))])
    got, want = exact_div(a, b), a / b
    same = (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())
    assert bool(same.all()), f"{int((~same).sum())} quotients differ"
