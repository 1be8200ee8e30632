"""The reference quantizers' formulas restated for Triton kernels (Triton cannot call torch): absmax
scales and their reciprocals (quantize.py, fp8.py), E2M1 rounding (e2m1.py), E4M3 and BF16 rounding.
E4M3 and BF16 rounding are integer arithmetic rather than casts, so that the result is the same wherever
the kernel runs (Triton's interpreter does not round float8 casts and truncates BF16 ones); E2M1 values
are exact in any float8."""

import triton
import triton.language as tl


@triton.jit
def e4m3_rne(s):
    """(value, byte) of ``s`` (>= 0, at most 448, or NaN) rounded to E4M3, nearest with ties to even.
    Normals (>= 2^-6) keep 3 mantissa bits of the FP32 pattern; subnormals are multiples of 2^-9."""
    bits = s.to(tl.int32, bitcast=True)
    rbits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576 = 0xFFF00000
    sub = (s * 512.0 + 8388608.0) - 8388608.0  # rint(s * 2^9), ties to even
    is_sub = s < 0.015625
    value = tl.where(is_sub, sub * 0.001953125, rbits.to(tl.float32, bitcast=True))
    byte = tl.where(is_sub, sub.to(tl.int32), ((((rbits >> 23) & 0xFF) - 120) << 3) | ((rbits >> 20) & 7))
    return value, tl.where(s != s, 0x7F, byte)


@triton.jit
def bf16_rne(v):
    """FP32 ``v`` rounded to BF16 (nearest, ties to even; inf and NaN kept), as an FP32 value."""
    bits = v.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 = 0xFFFF0000
    return tl.where(v != v, v, rounded.to(tl.float32, bitcast=True))


@triton.jit
def e4m3_neighbours(s):
    """(down, up): adjacent E4M3 values with down <= s < up, for 0 < s <= 448 (at 448, up is past E4M3's
    range; callers round up only with probability (s - down) / (up - down), which is then 0)."""
    is_sub = s < 0.015625
    sub_down = tl.floor(s * 512.0) * 0.001953125
    down = tl.where(is_sub, sub_down, (s.to(tl.int32, bitcast=True) & -1048576).to(tl.float32, bitcast=True))
    up = tl.where(is_sub, sub_down + 0.001953125,
                  ((down.to(tl.int32, bitcast=True)) + 1048576).to(tl.float32, bitcast=True))
    return down, up


@triton.jit
def magnitude_bits(v):
    """|v| as int32 bits: these order like the magnitudes, with a NaN above inf, so an integer max (or
    atomic max) over them is the amax, NaN if any (torch's amax propagates NaN; ``tl.max`` drops it)."""
    return v.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def absmax_scale(amax, INV_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
    """(scale, 1 / scale) of an FP32 amax, as quantize.py's "vector" scale and fp8.quantize_fp8_rows
    compute it: amax * fl32(1 / max), at least MIN_SCALE unless 0, NaN for a NaN or inf amax; the
    reciprocal an IEEE division (equal to quantize.reciprocal's float64 one rounded), 0 for a zero scale."""
    s = amax * INV_MAX
    s = tl.where(s > 0, tl.maximum(s, MIN_SCALE), s)
    s = tl.where(amax < float("inf"), s, float("nan"))
    return s, tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), tl.where(s == 0, float("inf"), s))


@triton.jit
def e2m1_rne(v):
    """e2m1.round_to_e2m1: the nearest E2M1 value (ties to even), saturating at +-6, NaN kept, with v's
    sign also on a zero (Triton's ``-q`` is 0 - q, +0 for q = 0). Within a binade the grid is uniform:
    rint(|v| / step) * step, with |v| / step = |v| * (1 / step) exactly (powers of two)."""
    mag = tl.minimum(tl.abs(v), 6.0, propagate_nan=tl.PropagateNan.ALL)
    below2, below4 = mag < 2.0, mag < 4.0
    step = tl.where(below2, 0.5, tl.where(below4, 1.0, 2.0))
    inverse = tl.where(below2, 2.0, tl.where(below4, 1.0, 0.5))
    q = ((mag * inverse + 8388608.0) - 8388608.0) * step  # x + 2^23 - 2^23: rint(x), ties to even, x < 2^23
    sign = v.to(tl.int32, bitcast=True) & -2147483648  # -2147483648 = 0x80000000
    return (q.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def e2m1_code(v):
    """e2m1.encode_e2m1 of v rounded to nearest E2M1 (ties to even, saturating at 6), by comparisons with
    the grid's midpoints: the 4-bit code, v's sign in bit 3 (-0 included). Of an E2M1 value, its code."""
    mag = tl.abs(v)
    code = ((mag > 0.25).to(tl.int32) + (mag >= 0.75).to(tl.int32) + (mag > 1.25).to(tl.int32)
            + (mag >= 1.75).to(tl.int32) + (mag > 2.5).to(tl.int32) + (mag >= 3.5).to(tl.int32)
            + (mag > 5.0).to(tl.int32))
    return code | (((v.to(tl.int32, bitcast=True) >> 31) & 1) << 3)


@triton.jit
def pack_codes(code, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Codes [ROWS, COLS] two per byte along the columns (e2m1.pack_e2m1): [ROWS, COLS / 2] uint8."""
    lo, hi = tl.split(tl.reshape(code, (ROWS, COLS // 2, 2)))
    return (lo | (hi << 4)).to(tl.uint8)
