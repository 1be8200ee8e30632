"""E4M3 rounding inside Triton kernels, in integer arithmetic rather than by a float8 cast, so that the
result is the same wherever the kernel runs (Triton's interpreter does not round float8 casts)."""

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
def e4m3_neighbours(s):
    """(down, up): adjacent E4M3 values with down <= s < up, for 0 < s <= 448 (at 448, up is past E4M3's
    range; callers round up only with probability (s - down) / (up - down), which is then 0)."""
    is_sub = s < 0.015625
    sub_down = tl.floor(s * 512.0) * 0.001953125
    down = tl.where(is_sub, sub_down, (s.to(tl.int32, bitcast=True) & -1048576).to(tl.float32, bitcast=True))
    up = tl.where(is_sub, sub_down + 0.001953125,
                  ((down.to(tl.int32, bitcast=True)) + 1048576).to(tl.float32, bitcast=True))
    return down, up
