"""The four scaling formats: fake_quantize against an independent brute-force reference (bit-exact), the
max-error bound per format, hand-worked MXFP4 / NVFP4 scales, and the QuantizedTensor it returns.

The reference below is written from the format definitions (docs/formats.md), not from fp4compile's code:
E2M1 rounding is an argmin over the grid with ties to the even code, E4M3 rounding an argmin over all finite
E4M3 values built from their bit fields, the MX exponent comes from math.frexp.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp4compile import QuantizedTensor, fake_quantize, quantize
from fp4compile.runtime import e2m1
from fp4compile.runtime.quantize import gemm_operand, operand_values, reciprocal, scaled_domain

FORMATS = ("tensor", "vector", "mxfp4", "nvfp4")
BLOCK = {"tensor": None, "vector": None, "mxfp4": 32, "nvfp4": 16}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ---------------------------------------------------------------- independent reference

E2M1_MAGS = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)  # codes 0..7


def _argmin_even(value: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Index of the nearest grid point to each value (both float64, value >= 0); ties to the even index."""
    dist = (value.unsqueeze(-1) - grid).abs()
    cand = dist == dist.min(-1, keepdim=True).values
    even = cand & (torch.arange(len(grid)) % 2 == 0)
    return torch.where(even.any(-1), even.to(torch.uint8).argmax(-1), cand.to(torch.uint8).argmax(-1))


def ref_round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """float32 scaled values -> nearest E2M1 value (float32), ties to even code, sign kept, NaN kept.
    Anything above 6 is nearest to 6, so saturation needs no special case."""
    v64 = v.double()
    out = torch.copysign(E2M1_MAGS[_argmin_even(v64.abs().nan_to_num(0.0), E2M1_MAGS)], v64)
    return torch.where(v64.isnan(), torch.nan, out).float()


def _e4m3_value(code: int) -> float:
    exp, man = (code >> 3) & 0xF, code & 0x7
    if exp == 0:
        return man * 2.0**-9  # subnormal: 2^(1-7) * man/8
    return 2.0 ** (exp - 7) * (1 + man / 8)


E4M3_VALUES = torch.tensor([_e4m3_value(c) for c in range(127)], dtype=torch.float64)  # 127 = 0x7F is NaN


def ref_round_e4m3(t: torch.Tensor) -> torch.Tensor:
    """float32 values in [0, 448] (or NaN) -> nearest E4M3 value as float32, ties to the even code."""
    t64 = t.double()
    out = E4M3_VALUES[_argmin_even(t64.nan_to_num(0.0), E4M3_VALUES)]
    return torch.where(t64.isnan(), torch.nan, out).float()


def _mx_exponent(amax: float) -> float:
    """OCP MX shared exponent floor(log2 amax) - 2, clamped to E8M0's [-127, 127]; -127 for amax 0."""
    if not math.isfinite(amax):
        return math.nan
    if amax == 0:
        return -127
    _, e = math.frexp(amax)  # amax = m * 2^e, m in [0.5, 1)  ->  floor(log2 amax) = e - 1
    return min(max(e - 1 - 2, -127), 127)


def ref_groups(x: torch.Tensor, fmt: str, dim: int) -> torch.Tensor:
    """x as float32 with dim moved last, cut into scaling groups: [G, group_size]."""
    xf = x.float()
    if xf.dim() == 0:
        xf = xf.reshape(1)
    xm = xf.movedim(dim, -1).contiguous()
    if fmt == "tensor":
        return xm.reshape(1, -1)
    n = xm.shape[-1]
    return xm.reshape(-1, BLOCK[fmt] or n)


def ref_scales(groups: torch.Tensor, fmt: str) -> torch.Tensor:
    """Effective float32 scale of each group, [G, 1], from the format's definition."""
    amax = groups.abs().amax(-1, keepdim=True) if groups.numel() else groups.new_zeros(groups.shape[0], 1)
    bad = ~torch.isfinite(amax)
    if fmt in ("tensor", "vector"):
        s = amax * (1 / 6)  # defined as a multiply by fl32(1/6), as CUDA computes amax / 6
        s = torch.where(s > 0, s.clamp(min=2.0**-126), s)  # at least float32's smallest normal
    elif fmt == "mxfp4":
        s = torch.tensor([[2.0 ** _mx_exponent(a) if math.isfinite(a) else math.nan] for a in amax.flatten().tolist()])
        s = s.reshape(amax.shape).float()
    else:  # nvfp4
        t_amax = amax.max() if amax.numel() else amax.new_zeros(())
        ts = t_amax * (1 / (6 * 448))  # float32
        if not torch.isfinite(ts):
            return torch.full_like(amax, math.nan)
        if ts == 0:
            return torch.zeros_like(amax)
        block = ref_round_e4m3(torch.clamp(amax * (1 / 6) / ts, max=448))
        s = block * ts
    return torch.where(bad, torch.nan, s)


def ref_fake_quantize(x: torch.Tensor, fmt: str, dim: int = -1) -> torch.Tensor:
    dim = dim % max(x.dim(), 1)
    groups = ref_groups(x, fmt, dim)
    s = ref_scales(groups, fmt)
    # an all-zero group has scale 0: its values are +-0 (sign of x kept). NVFP4 divides by its scale, the
    # others multiply by its float32 reciprocal.
    scaled = groups / s if fmt == "nvfp4" else groups * (1 / s)
    scaled = torch.where(s == 0, groups * 0, scaled)
    q = ref_round_e2m1(scaled) * s
    if x.dim() == 0:
        return q.reshape(()).to(x.dtype)
    moved = list(x.shape)
    moved.append(moved.pop(dim))
    return q.reshape(moved).movedim(-1, dim).to(x.dtype)


_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    nan = a.isnan()
    assert torch.equal(nan, b.isnan()), "NaN positions differ"
    ia, ib = a[~nan].view(_INT[a.dtype]), b[~nan].view(_INT[b.dtype])
    if not torch.equal(ia, ib):
        i = (ia != ib).nonzero()[0, 0]
        raise AssertionError(f"{int((ia != ib).sum())} values differ, first: {a[~nan][i]} vs {b[~nan][i]}")


# ---------------------------------------------------------------- reference self-checks


def test_reference_e4m3_matches_torch_cast():
    """The brute-force E4M3 rounding agrees with torch's float8_e4m3fn cast (RNE) on every tie and at random."""
    vals = E4M3_VALUES.float()
    mids = ((E4M3_VALUES[1:] + E4M3_VALUES[:-1]) / 2).float()  # exact in float32: ties
    g = torch.Generator().manual_seed(0)
    rnd = torch.rand(20000, generator=g) * 448 * torch.rand(20000, generator=g) ** 8
    t = torch.cat([vals, mids, rnd])
    assert torch.equal(ref_round_e4m3(t), t.to(torch.float8_e4m3fn).float())
    assert E4M3_VALUES.max() == 448 and E4M3_VALUES[1] == 2.0**-9


# ---------------------------------------------------------------- random data for the property tests


@st.composite
def cases(draw, formats=FORMATS, dtypes=DTYPES):
    """(x, format, dim): random shape (1-4 dims), dim anywhere, magnitude 1e-3..1e3, per-row magnitude spread,
    a few exact zeros and zero groups."""
    fmt = draw(st.sampled_from(formats))
    dtype = draw(st.sampled_from(dtypes))
    ndim = draw(st.integers(1, 4))
    dim = draw(st.integers(-ndim, ndim - 1))
    shape = [draw(st.integers(1, 4)) for _ in range(ndim)]
    block = BLOCK[fmt]
    shape[dim] = block * draw(st.integers(1, 3)) if block else draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    mag = 10.0 ** draw(st.floats(-3, 3))
    spread = draw(st.sampled_from([0.0, 1.0, 4.0]))  # decades of magnitude variation along the other dims
    kind = draw(st.sampled_from(["normal", "uniform", "heavy"]))
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(shape, generator=g)
    elif kind == "uniform":
        x = torch.rand(shape, generator=g) * 2 - 1
    else:
        x = torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape, generator=g))
    row_scale = 10.0 ** (spread * (torch.rand([*shape[:dim % ndim], 1, *shape[dim % ndim + 1 :]], generator=g) - 0.5))
    x = x * row_scale * mag
    x[torch.rand(shape, generator=g) < 0.05] = 0.0
    if draw(st.booleans()):  # zero the first group along dim
        idx = [slice(None)] * ndim
        idx[dim] = slice(0, block or shape[dim])
        x[tuple(idx)] = 0.0
    if dtype == torch.float16:
        x = x.clamp(-60000, 60000)
    return x.to(dtype), fmt, dim


# ---------------------------------------------------------------- brute-force equality


@settings(max_examples=100, deadline=None)
@given(case=cases())
def test_fake_quantize_matches_reference(case):
    x, fmt, dim = case
    assert_bitwise_equal(fake_quantize(x, fmt, dim), ref_fake_quantize(x, fmt, dim))


@pytest.mark.parametrize("fmt", FORMATS)
def test_fake_quantize_matches_reference_wide_range(fmt):
    """Magnitudes over float32's whole range, incl. MX exponent clamping and NVFP4 subnormal block scales."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 64, generator=g) * 2.0 ** torch.randint(-140, 120, (64, 1), generator=g).float()
    assert_bitwise_equal(fake_quantize(x, fmt), ref_fake_quantize(x, fmt))
    assert_bitwise_equal(fake_quantize(x, fmt, 0), ref_fake_quantize(x, fmt, 0))


# ---------------------------------------------------------------- max-error bound


def _half_step(m: torch.Tensor) -> torch.Tensor:
    """Half the E2M1 grid spacing at scaled magnitude m in [0, 6]: 0.25 on [0, 2), 0.5 on [2, 4), 1 on [4, 6]."""
    return torch.where(m < 2, 0.25, torch.where(m < 4, 0.5, 1.0)).double()


_UNIT_ROUNDOFF = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
_HALF_TINY = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0**-25}  # half fp16's smallest subnormal


@settings(max_examples=100, deadline=None)
@given(case=cases())
def test_max_error_bound(case):
    """|x - fake_quantize(x)| <= s * max(h(min(m, 6)), m - 6), m = |x| / s, h = half the grid step, s the group's
    scale, plus float32 rounding of x / s and of q * s (2^-24 each, relative) and the final cast to bf16/fp16.

    The m - 6 term is saturation; how far above 6 m can get is format specific:
    tensor/vector  s = amax / 6, so m <= 6 (up to float32 rounding);
    mxfp4          s = 2^(floor(log2 amax) - 2) puts amax / s in [4, 8): values in (6s, 8s) clip to 6s, error < 2s;
    nvfp4          E4M3 rounds the block scale by at most 2^-4 relative (normal range), so m <= 6 / (1 - 2^-4)
                   = 6.4 and the clip error (<= 0.4 s) stays under h(6) s = s; a block whose E4M3 scale underflows
                   to 0 (amax_block / (6 ts) <= 2^-10, half E4M3's smallest subnormal) is flushed to zeros.
    """
    x, fmt, dim = case
    dim %= x.dim()
    fq = fake_quantize(x, fmt, dim)
    groups = ref_groups(x, fmt, dim).double()
    out = ref_groups(fq, fmt, dim).double()
    s = ref_scales(ref_groups(x, fmt, dim), fmt).double()
    amax = ref_groups(x, fmt, dim).abs().amax(-1, keepdim=True)  # float32, as the scale formulas use it
    err = (groups - out).abs()
    pos = s > 0
    m = torch.where(pos, groups.abs() / torch.where(pos, s, 1.0), 0.0)
    bound = s * torch.maximum(_half_step(m.clamp(max=6)), m - 6)
    slack = 2.0**-23 * (groups.abs() + out.abs()) + _UNIT_ROUNDOFF[x.dtype] * out.abs() + _HALF_TINY[x.dtype]
    assert bool((err[pos.expand_as(err)] <= (bound + slack)[pos.expand_as(err)]).all())
    live = pos & (amax > 0)
    mmax = (amax.double() / torch.where(pos, s, 1.0))[live]
    if fmt in ("tensor", "vector"):
        assert bool((mmax <= 6 * (1 + 2.0**-22)).all())
        assert not bool((~pos & (amax > 0)).any())
    elif fmt == "mxfp4":
        assert bool(((mmax >= 4) & (mmax < 8)).all())
    else:
        ts = amax.max() / (6 * 448)
        normal = (amax / 6 / ts >= 2.0**-6)[live]
        assert bool((mmax[normal] <= 6.4 * (1 + 2.0**-22)).all())
        flushed = ~pos & (amax > 0)
        assert bool((amax[flushed] / 6 / ts <= 2.0**-10).all())
        assert bool((out[flushed.expand_as(out)] == 0).all())
    # an all-zero group stays exactly zero
    zero = amax == 0
    assert bool((out[zero.expand_as(out)] == 0).all())


# ---------------------------------------------------------------- hand-worked MXFP4 scales

MX_CASES = [
    # (block amax, stored E8M0 code, scale, fake_quantize(amax))   scale = 2^(floor(log2 amax) - 2)
    (6.0, 127, 1.0, 6.0),  # floor(log2 6) = 2
    (7.9, 127, 1.0, 6.0),  # 7.9 / 1 saturates to 6
    (8.0, 128, 2.0, 8.0),  # floor(log2 8) = 3 -> 8 / 2 = 4, exact
    (4.0, 127, 1.0, 4.0),
    (1.0, 125, 0.25, 1.0),  # 1 / 0.25 = 4
    (0.75, 124, 0.125, 0.75),  # floor(log2 0.75) = -1 -> 2^-3; 0.75 * 8 = 6
    (3.99, 126, 0.5, 3.0),  # floor(log2 3.99) = 1 -> 3.99 / 0.5 = 7.98 saturates to 6 -> 3.0
    (12.0, 128, 2.0, 12.0),  # 12 / 2 = 6
    (2.0**-126, 0, 2.0**-127, 2.0**-126),  # -128 clamps to -127 (E8M0 code 0); 2^-126 / 2^-127 = 2
    (3e38, 252, 2.0**125, 6 * 2.0**125),  # floor(log2 3e38) = 127; 3e38 / 2^125 = 7.05 saturates
]


@pytest.mark.parametrize("amax,code,scale,expected", MX_CASES)
def test_mx_scale_hand_worked(amax, code, scale, expected):
    x = torch.zeros(2, 32)
    x[0, 0] = amax
    x[1, 5] = -amax
    qt = quantize(x, "mxfp4")
    assert qt.scales.dtype == torch.uint8
    assert qt.scales.tolist() == [[code], [code]]
    assert qt.scale_float().tolist() == [[scale], [scale]]
    out = fake_quantize(x, "mxfp4")
    assert out[0, 0].item() == expected and out[1, 5].item() == -expected
    assert torch.equal(qt.dequantize(), out)


def test_mx_ties_within_block():
    # amax 6 -> scale 1: 2.5 -> 2, 5 -> 4 (ties to even code); amax 12 -> scale 2: 5 -> 2.5 -> 2 -> 4, 9 -> 4.5 -> 4 -> 8
    x = torch.zeros(2, 32)
    x[0, :4] = torch.tensor([6.0, 2.5, 5.0, -0.25])
    x[1, :4] = torch.tensor([12.0, 5.0, 9.0, 0.5])
    out = fake_quantize(x, "mxfp4")
    assert out[0, :4].tolist() == [6.0, 2.0, 4.0, -0.0]
    assert out[1, :4].tolist() == [12.0, 4.0, 8.0, 0.0]


def test_mx_zero_and_nan_block_codes():
    x = torch.ones(3, 64)
    x[0, :32] = 0.0  # all-zero block: exponent clamps to -127, code 0
    x[1, 40] = math.nan  # NaN block: code 255
    x[2, 3] = -math.inf  # inf block: code 255
    qt = quantize(x, "mxfp4")
    # ones: floor(log2 1) - 2 = -2 -> code 125
    assert qt.scales.tolist() == [[0, 125], [125, 255], [255, 125]]
    out = qt.dequantize()
    assert torch.equal(out[0, :32], torch.zeros(32))
    assert out[1, 32:].isnan().all() and out[2, :32].isnan().all()
    assert torch.equal(out[1, :32], torch.ones(32)) and torch.equal(out[2, 32:], torch.ones(32))
    assert not out[0].isnan().any()
    assert_bitwise_equal(out, fake_quantize(x, "mxfp4"))


# ---------------------------------------------------------------- NVFP4


def test_nvfp4_hand_worked():
    """Block A amax 2688 -> ts = 2688 / (6 * 448) = 1, block scale 448. Block B amax 10: 10 / 6 = 1.667 rounds
    to E4M3 1.625 (1 + 5/8; 1.75 is farther), so 10 / 1.625 = 6.15 saturates to 6 -> 9.75, and 3 / 1.625 =
    1.85 -> 2 -> 3.25."""
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1] = 2688.0, 1000.0  # 1000 / 448 = 2.23 -> 2 -> 896
    x[0, 16], x[0, 17], x[0, 18] = 10.0, 3.0, -1.0  # -1 / 1.625 = -0.615 -> -0.5 -> -0.8125
    qt = quantize(x, "nvfp4")
    assert qt.tensor_scale.dtype == torch.float32 and qt.tensor_scale.dim() == 0
    assert qt.tensor_scale.item() == 1.0
    assert qt.scales.dtype == torch.float8_e4m3fn
    assert qt.scales.float().tolist() == [[448.0, 1.625]]
    out = fake_quantize(x, "nvfp4")
    assert out[0, :2].tolist() == [2688.0, 896.0]
    assert out[0, 16:19].tolist() == [9.75, 3.25, -0.8125]
    assert torch.equal(qt.dequantize(), out)


@settings(max_examples=50, deadline=None)
@given(case=cases(formats=("nvfp4",)))
def test_nvfp4_scales(case):
    x, fmt, dim = case
    qt = quantize(x, fmt, dim)
    amax = x.float().abs().amax()
    assert qt.tensor_scale.item() == (amax * (1 / (6 * 448))).item()
    assert qt.scales.dtype == torch.float8_e4m3fn
    assert bool((qt.scales.float() <= 448).all())
    if amax > 0:  # the block holding the tensor's amax gets (about) the largest E4M3 scale
        assert qt.scales.float().max().item() == 448.0


# ---------------------------------------------------------------- QuantizedTensor

_SCALE_DTYPE = {"tensor": torch.float32, "vector": torch.float32, "mxfp4": torch.uint8, "nvfp4": torch.float8_e4m3fn}


def _scales_shape(shape, fmt, dim):
    if fmt == "tensor":
        return [1] * len(shape)
    out = list(shape)
    out[dim] = shape[dim] // BLOCK[fmt] if BLOCK[fmt] else 1
    return out


@settings(max_examples=100, deadline=None)
@given(case=cases(dtypes=DTYPES + (torch.float64,)))
def test_quantized_tensor_fields_and_dequantize(case):
    x, fmt, dim = case
    qt = quantize(x, fmt, dim)
    assert isinstance(qt, QuantizedTensor)
    assert qt.format == fmt and qt.dim == dim % x.dim() and qt.dtype == x.dtype
    assert qt.shape == x.shape and qt.data.dtype == torch.float8_e4m3fn
    assert list(qt.scales.shape) == _scales_shape(x.shape, fmt, dim % x.dim())
    assert qt.scales.dtype == _SCALE_DTYPE[fmt]
    assert (qt.tensor_scale is not None) == (fmt == "nvfp4")
    fq = fake_quantize(x, fmt, dim)
    assert_bitwise_equal(qt.dequantize(), fq)
    # dequantize(dtype) overrides the output dtype; fake_quantize is the float32 product cast once to x.dtype
    deq32 = qt.dequantize(torch.float32)
    assert deq32.dtype == torch.float32
    assert_bitwise_equal(deq32.to(x.dtype), fq)
    assert qt.dequantize(torch.float64).dtype == torch.float64
    # data holds E2M1 values exactly; codes decode to the same values (-0 aside, which decodes to -0)
    data = qt.data.float()
    assert torch.equal(ref_round_e2m1(data), data)
    assert torch.equal(e2m1.decode_e2m1(qt.codes), data)
    assert qt.codes.dtype == torch.uint8 and bool((qt.codes < 16).all())
    # the effective scale reproduces fake_quantize: data * scale broadcast along the groups
    # the effective scales are the reference's, group by group (groups ordered with dim moved last)
    s = ref_scales(ref_groups(x, fmt, dim % x.dim()), fmt)
    assert_bitwise_equal(qt.scale_float().movedim(dim % x.dim(), -1).reshape(-1), s.reshape(-1))


@settings(max_examples=50, deadline=None)
@given(case=cases())
def test_packed_along_dim(case):
    x, fmt, dim = case
    dim %= x.dim()
    qt = quantize(x, fmt, dim)
    if x.shape[dim] % 2:
        with pytest.raises(ValueError, match="even"):
            qt.packed()
        return
    p = qt.packed()
    assert p.dtype == torch.uint8
    expected_shape = list(x.shape)
    expected_shape[dim] //= 2
    assert list(p.shape) == expected_shape
    codes = qt.codes.movedim(dim, -1)
    pl = p.movedim(dim, -1)
    assert torch.equal(pl & 0xF, codes[..., 0::2])
    assert torch.equal(pl >> 4, codes[..., 1::2])
    assert torch.equal(e2m1.unpack_e2m1(pl).movedim(-1, dim), qt.codes)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
def test_dequantize_equals_fake_quantize_all_dims(fmt, dim, dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(32, 32, 32, generator=g) * 3).to(dtype)
    qt = quantize(x, fmt, dim)
    assert_bitwise_equal(qt.dequantize(), fake_quantize(x, fmt, dim))
    assert_bitwise_equal(fake_quantize(x, fmt, dim), ref_fake_quantize(x, fmt, dim))


def test_vector_worked_example():
    """docs/formats.md: x = [0.3, -1.2, 2.5, 4.0, -6.6, 0.0], amax 6.6 -> s = 1.1;
    x / s = [0.273, -1.091, 2.273, 3.636, -6, 0] -> [0.5, -1, 2, 4, -6, 0] -> [0.55, -1.1, 2.2, 4.4, -6.6, 0]."""
    x = torch.tensor([[0.3, -1.2, 2.5, 4.0, -6.6, 0.0]], dtype=torch.float64)
    qt = quantize(x, "vector")
    assert qt.data.float().tolist() == [[0.5, -1.0, 2.0, 4.0, -6.0, 0.0]]
    assert qt.scales.item() == pytest.approx(1.1, rel=1e-6)
    assert fake_quantize(x, "vector").tolist() == [pytest.approx([0.55, -1.1, 2.2, 4.4, -6.6, 0.0], rel=1e-6)]
    assert qt.codes.tolist() == [[1, 10, 4, 6, 15, 0]]
    assert qt.packed().tolist() == [[0xA1, 0x64, 0x0F]]


# ---------------------------------------------------------------- stochastic rounding through quantize


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_stochastic_unbiased(fmt):
    """Each row is [6, 0.8, 2.3, 4.6, 0, ...] times 2^k (scale exactly 2^k in every format: amax 6 -> s = 1 for
    vector/tensor, MX 2^(2-2) = 1; NVFP4 448 * 6/2688 = 1), so the scaled values are known and the row mean of n
    draws must be within 6 sigma of x (sigma from the Bernoulli variance of each value's two neighbours)."""
    n = 4000
    base = torch.zeros(32)
    base[:4] = torch.tensor([6.0, 0.8, 2.3, 4.6])
    x = base.repeat(n, 1)
    g = torch.Generator().manual_seed(11)
    out = fake_quantize(x, fmt, rounding="stochastic", generator=g)
    lo = torch.tensor([6.0, 0.5, 2.0, 4.0])
    gap = torch.tensor([0.0, 0.5, 1.0, 2.0])
    p = torch.tensor([0.0, 0.6, 0.3, 0.3])
    vals = out[:, :4]
    assert bool(((vals == lo) | (vals == lo + gap)).all())
    sigma = gap * torch.sqrt(p * (1 - p) / n)
    assert bool(((vals.double().mean(0) - base[:4]).abs() <= 6 * sigma + 1e-9).all())
    assert bool((out[:, 4:] == 0).all())
    again = fake_quantize(x, fmt, rounding="stochastic", generator=torch.Generator().manual_seed(11))
    assert torch.equal(out, again)
    qt = quantize(x, fmt, rounding="stochastic", generator=torch.Generator().manual_seed(11))
    assert torch.equal(qt.dequantize(), out)


def test_unknown_rounding():
    with pytest.raises(ValueError, match="nearest"):
        fake_quantize(torch.ones(4), rounding="up")


@settings(max_examples=100, deadline=None)
@given(case=cases(), nan=st.booleans())
def test_scaled_domain_takes_the_forward_outer_scale(case, nan):
    """DGE's scaled weight from the reciprocal of the forward's outer scale (gemm_operand's) is the one
    computed from the weight again, bit for bit, NaN rows included; the block formats ignore it (their
    scales vary along K)."""
    x, fmt, dim = case
    x = x.movedim(dim, -1).contiguous()  # along K, the last dim
    if nan:
        x.view(-1)[0] = float("nan")
    _, outer = gemm_operand(x, fmt)
    assert_bitwise_equal(scaled_domain(x, fmt, reciprocal(outer)), scaled_domain(x, fmt))
    if fmt in ("vector", "tensor"):  # taken, not computed again
        assert_bitwise_equal(scaled_domain(x, fmt, torch.full_like(outer, 0.5)), x.float() * 0.5)


@settings(max_examples=100, deadline=None)
@given(case=cases(), nan=st.booleans())
def test_operand_values_from_the_outer_scale_are_gemm_operands(case, nan):
    """A requantized operand (matmul.requantized): the values gemm_operand gave, from its outer scale's
    reciprocal and no reduction, bit for bit (NaN rows, zeros and -0 included); the block formats are
    refused."""
    x, fmt, dim = case
    x = x.movedim(dim, -1).contiguous()
    if nan:
        x.view(-1)[0] = float("nan")
    values, outer = gemm_operand(x, fmt)
    if fmt in ("vector", "tensor"):
        assert torch.equal(operand_values(x, fmt, reciprocal(outer)).view(torch.uint8), values.view(torch.uint8))
    else:
        with pytest.raises(ValueError, match="'vector' and 'tensor'"):
            operand_values(x, fmt, reciprocal(outer))

