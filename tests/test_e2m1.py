"""E2M1 element level: the grid, codes, round-to-nearest-even, stochastic rounding, packing, FP8 container.

Expected values come from the E2M1 bit layout (sign, 2 exponent bits with bias 1, 1 mantissa bit) and from a
brute-force nearest-grid-point search written here, never from running fp4compile.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp4compile.runtime import e2m1


def _code_value(code: int) -> float:
    """E2M1 value of a 4-bit code from its bit fields (OCP MX v1.0, table of E2M1)."""
    sign = -1.0 if code & 0b1000 else 1.0
    exp = (code >> 1) & 0b11
    man = code & 0b1
    if exp == 0:  # subnormal: 2^(1 - bias) * (0.m), bias 1
        return sign * (man / 2)
    return sign * 2.0 ** (exp - 1) * (1 + man / 2)


CODE_VALUES = [_code_value(c) for c in range(16)]
MAGNITUDES = CODE_VALUES[:8]  # codes 0..7, ascending magnitude


def brute_round(v: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value by argmin over the 8 magnitudes; a tie goes to the even code; sign copied;
    NaN stays NaN. Distances in float64 (exact for float32 inputs)."""
    v64 = v.double()
    mags = torch.tensor(MAGNITUDES, dtype=torch.float64)
    dist = (v64.abs().unsqueeze(-1) - mags).abs()
    best = dist.min(-1, keepdim=True).values
    cand = dist == best
    even = cand & (torch.arange(8) % 2 == 0)
    idx = torch.where(even.any(-1), even.to(torch.uint8).argmax(-1), cand.to(torch.uint8).argmax(-1))
    out = torch.copysign(mags[idx], v64)
    return torch.where(v64.isnan(), torch.nan, out).float()


def test_code_table_matches_module():
    assert MAGNITUDES == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert list(e2m1.E2M1_MAGNITUDES) == MAGNITUDES
    assert e2m1.E2M1_MAX == 6.0


def test_decode_all_16_codes():
    codes = torch.arange(16, dtype=torch.uint8)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        out = e2m1.decode_e2m1(codes, dtype)
        assert out.dtype == dtype
        assert out.tolist() == CODE_VALUES
        # code 8 is -0: sign bit set
        assert torch.signbit(out).tolist() == [c >= 8 for c in range(16)]


def test_encode_all_16_codes_incl_negative_zero():
    values = torch.tensor(CODE_VALUES)
    assert torch.signbit(values[8])  # -0.0 really is negative zero
    assert e2m1.encode_e2m1(values).tolist() == list(range(16))
    assert e2m1.encode_e2m1(values).dtype == torch.uint8
    # encode . decode is the identity on codes, decode . encode on values (incl. the sign of zero)
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(e2m1.encode_e2m1(e2m1.decode_e2m1(codes)), codes)


def test_grid_values_round_trip():
    values = torch.tensor(CODE_VALUES)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        out = e2m1.round_to_e2m1(values.to(dtype))
        assert out.tolist() == CODE_VALUES
        assert torch.equal(torch.signbit(out), torch.signbit(values))


TIES = [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0)]


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("x,expected", TIES)
def test_ties_to_even_code(x, expected, sign):
    out = e2m1.round_to_e2m1(torch.tensor([sign * x]))
    assert out.item() == sign * expected
    assert torch.signbit(out).item() == (sign < 0)
    # the chosen neighbour has an even code
    assert int(e2m1.encode_e2m1(out).item()) % 2 == 0


@pytest.mark.parametrize(
    "x,expected",
    [(0.2499, 0.0), (0.2501, 0.5), (1.74, 1.5), (1.76, 2.0), (2.49, 2.0), (2.51, 3.0), (4.99, 4.0), (5.01, 6.0)],
)
def test_just_off_ties(x, expected):
    assert e2m1.round_to_e2m1(torch.tensor([x, -x])).tolist() == [expected, -expected]


def test_saturation_beyond_6():
    x = torch.tensor([6.0, 6.5, 7.0, 8.0, 1e30, math.inf, -6.5, -1e30, -math.inf])
    assert e2m1.round_to_e2m1(x).tolist() == [6.0, 6.0, 6.0, 6.0, 6.0, 6.0, -6.0, -6.0, -6.0]


def test_nan_propagates():
    assert e2m1.round_to_e2m1(torch.tensor([math.nan])).isnan().all()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), spread=st.floats(0.1, 8.0))
def test_round_matches_brute_force(seed, spread):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(512, generator=g) * 2 - 1) * spread
    # sprinkle exact ties and grid points (midpoints of neighbouring grid values)
    mids = torch.tensor([(a + b) / 2 for a, b in zip(MAGNITUDES, MAGNITUDES[1:])] + MAGNITUDES)
    x[: 2 * len(mids)] = torch.cat([mids, -mids])
    got = e2m1.round_to_e2m1(x)
    want = brute_round(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, want)
    assert torch.equal(torch.signbit(got), torch.signbit(want))


def test_round_matches_torch_internal_reference():
    """Cross-check against torch's own FP4 test helper (copied from torchao), an independent RNE encoder."""
    ref = pytest.importorskip("torch.testing._internal.common_quantized")
    g = torch.Generator().manual_seed(1)
    x = torch.cat([(torch.rand(4096, generator=g) * 2 - 1) * 7, torch.tensor([0.25, 0.75, 1.75, 2.5, 3.5, 5.0])])
    assert torch.equal(e2m1.encode_e2m1(e2m1.round_to_e2m1(x)), ref._f32_to_floatx_unpacked(x, 2, 1))


def test_grid_step():
    mag = torch.tensor([0.0, 0.5, 1.99, 2.0, 3.99, 4.0, 6.0])
    assert e2m1.grid_step(mag).tolist() == [0.5, 0.5, 0.5, 1.0, 1.0, 2.0, 2.0]


# ---- stochastic rounding ----

SR_POINTS = [0.1, 0.25, 0.3, 0.9, 1.2, 1.9, 2.25, 2.7, 3.5, 4.2, 5.0, 5.9]


def _neighbours(v: float):
    m = abs(v)
    lo = max(g for g in MAGNITUDES if g <= m)
    hi = min(g for g in MAGNITUDES if g >= m)
    return math.copysign(lo, v), math.copysign(hi, v)


@pytest.mark.parametrize("v", SR_POINTS + [-p for p in SR_POINTS])
def test_stochastic_rounding_unbiased(v):
    """The number of round-ups is Binomial(n, p) with p = (|v| - lo) / (hi - lo); accept within 6 standard
    deviations (false-failure probability < 2e-9 per case), which also bounds the mean:
    |mean - v| <= 6 * (hi - lo) * sqrt(p (1 - p) / n)."""
    n = 20000
    g = torch.Generator().manual_seed(1234)
    out = e2m1.stochastic_round_to_e2m1(torch.full((n,), v), generator=g)
    lo, hi = _neighbours(v)
    assert lo != hi
    is_hi, is_lo = out == hi, out == lo
    assert bool((is_hi | is_lo).all()), "result must be one of the two neighbours"
    p = (abs(v) - abs(lo)) / (abs(hi) - abs(lo))
    sigma = math.sqrt(n * p * (1 - p))
    ups = int(is_hi.sum())
    assert abs(ups - n * p) <= 6 * sigma + 1
    gap = abs(hi - lo)
    assert abs(out.double().mean().item() - v) <= 6 * gap * math.sqrt(p * (1 - p) / n) + gap / n


def test_stochastic_rounding_grid_points_exact_and_saturates():
    g = torch.Generator().manual_seed(0)
    grid = torch.tensor(CODE_VALUES).repeat(100)
    assert torch.equal(e2m1.stochastic_round_to_e2m1(grid, generator=g), grid)
    big = torch.tensor([6.5, 100.0, -7.0] * 100)
    assert e2m1.stochastic_round_to_e2m1(big, generator=g).abs().eq(6.0).all()
    assert e2m1.stochastic_round_to_e2m1(torch.tensor([math.nan]), generator=g).isnan().all()


def test_stochastic_rounding_reproducible():
    x = torch.linspace(-6, 6, 1001)
    a = e2m1.stochastic_round_to_e2m1(x, generator=torch.Generator().manual_seed(7))
    b = e2m1.stochastic_round_to_e2m1(x, generator=torch.Generator().manual_seed(7))
    c = e2m1.stochastic_round_to_e2m1(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # every result is a neighbour: within one grid step of x, on the grid
    assert torch.equal(brute_round(a), a)
    assert bool(((a - x).abs() <= e2m1.grid_step(x.abs()) + 1e-6).all())


# ---- packing ----


def test_pack_layout_by_hand():
    codes = torch.tensor([[0x1, 0x2, 0xF, 0x8], [0x7, 0x0, 0x3, 0xC]], dtype=torch.uint8)
    # byte i = code[2i] | code[2i+1] << 4  (element 2i in the low nibble)
    assert e2m1.pack_e2m1(codes).tolist() == [[0x21, 0x8F], [0x07, 0xC3]]


@settings(max_examples=50, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    half=st.integers(0, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(shape, half, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (*shape, 2 * half), generator=g, dtype=torch.uint8)
    packed = e2m1.pack_e2m1(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape, half)
    rows = math.prod(shape)
    flat_c, flat_p = codes.reshape(rows, 2 * half).tolist(), packed.reshape(rows, half).tolist()
    for row_c, row_p in zip(flat_c, flat_p):
        assert row_p == [row_c[2 * i] + 16 * row_c[2 * i + 1] for i in range(half)]
    assert torch.equal(e2m1.unpack_e2m1(packed), codes)


def test_pack_odd_last_dim_raises():
    with pytest.raises(ValueError, match="even last dim"):
        e2m1.pack_e2m1(torch.zeros(3, 5, dtype=torch.uint8))


@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="no torch.float4_e2m1fn_x2")
def test_float4_x2_view_and_nibble_order():
    codes = torch.arange(16, dtype=torch.uint8)
    packed = e2m1.pack_e2m1(codes)
    fp4 = e2m1.as_float4_x2(packed)
    assert fp4.dtype == torch.float4_e2m1fn_x2
    assert fp4.shape == (8,)
    raw = fp4.view(torch.uint8)
    assert torch.equal(raw & 0xF, codes[0::2])  # element 2i in the low nibble
    assert torch.equal(raw >> 4, codes[1::2])
    assert torch.equal(e2m1.unpack_e2m1(fp4), codes)  # unpack accepts the float4 view
    # torch's own test helper builds float4_e2m1fn_x2 with the same layout
    ref = pytest.importorskip("torch.testing._internal.common_quantized")
    theirs = ref._bfloat16_to_float4_e2m1fn_x2(torch.tensor(CODE_VALUES, dtype=torch.bfloat16))
    assert torch.equal(theirs.view(torch.uint8), packed)


# ---- FP8 container ----


def test_fp8_container_exact():
    values = torch.tensor(CODE_VALUES)
    fp8 = e2m1.to_fp8_container(values)
    assert fp8.dtype == torch.float8_e4m3fn
    back = fp8.float()
    assert back.tolist() == CODE_VALUES
    assert torch.equal(torch.signbit(back), torch.signbit(values))
    assert torch.equal(e2m1.encode_e2m1(back), torch.arange(16, dtype=torch.uint8))
    # also from every float dtype
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert e2m1.to_fp8_container(values.to(dtype)).float().tolist() == CODE_VALUES
