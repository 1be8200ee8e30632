"""An activation's FP4 GEMM operand in the "vector" format, one read of each row: its absmax scale, the
E2M1 values in float8_e4m3fn; the bits of ``quantize.gemm_operand(x, "vector")`` (CUDA, Triton).

Why a kernel: Inductor fuses the reference into the activation's producer as a looped reduction that
reads each row twice and computes the producer twice (for the SwiGLU output: silu and the product of
both inputs, per element, twice), and stores the values once per kernel that reads them: for the
SwiGLU output that cost more than twice BF16's silu-multiply (CHANGELOG.md). Here the producer is stored once in the activation's dtype, as BF16 stores it,
and each program holds BLOCK_M whole rows in registers (BLOCK_K, the next power of two of K, at most
MAX_K). An operator of its own, as kernels/transpose_triton.py says why: AOTAutograd's CSE merges the
calls for an input several sites share (q/k/v's, gate/up's).
"""

import torch
import triton
import triton.language as tl

from fp4compile.runtime.e2m1 import E2M1_MAX
from fp4compile.runtime.kernels.launch import launch
from fp4compile.runtime.kernels.triton_quantize import absmax_scale, e2m1_rne, magnitude_bits
from fp4compile.runtime.quantize import MIN_SCALE

MAX_K = 16384  # BLOCK_K FP32 values over 8 warps, 64 per thread


@triton.jit
def _fp4_rows_kernel(x_ptr, v_ptr, s_ptr, M, K, stride_x, INV_MAX: tl.constexpr, MIN_SCALE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    rmask = rows < M
    mask = rmask[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(magnitude_bits(x), axis=1).to(tl.float32, bitcast=True)
    scale, recip = absmax_scale(amax, INV_MAX, MIN_SCALE)
    values = e2m1_rne(x * recip[:, None])
    tl.store(v_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], values.to(v_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows, scale, mask=rmask)


def _launch_shape(k: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, warps): 8192 elements per program (one row from BLOCK_K = 8192 up), 64 per
    thread, the fastest for K = 2048, 4096, 5632, 14336 (CHANGELOG.md)."""
    block_k = triton.next_power_of_2(k)
    block_m = max(1, 8192 // block_k)
    return block_m, block_k, block_m * block_k // 2048


_lib = torch.library.Library("fp4compile", "FRAGMENT")
_lib.define("fp4_rows(Tensor x) -> (Tensor, Tensor)")


def _fp4_rows(x: torch.Tensor):
    m, k = x.shape
    if k > MAX_K or x.stride(1) != 1:
        raise ValueError(f"fp4_rows takes rows of at most {MAX_K} elements with unit column stride, got shape "
                         f"{tuple(x.shape)} and strides {x.stride()}; quantize.gemm_operand takes any")
    values = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block_m, block_k, warps = _launch_shape(k)
        launch(_fp4_rows_kernel, (triton.cdiv(m, block_m),), (x, values, scale, m, k, x.stride(0)),
               {"INV_MAX": 1.0 / E2M1_MAX, "MIN_SCALE": MIN_SCALE, "BLOCK_M": block_m, "BLOCK_K": block_k}, warps)
    return values, scale


_lib.impl("fp4_rows", _fp4_rows, "CompositeExplicitAutograd")


@torch.library.register_fake("fp4compile::fp4_rows")
def _(x):
    m, k = x.shape
    return x.new_empty((m, k), dtype=torch.float8_e4m3fn), x.new_empty((m, 1), dtype=torch.float32)


# x [M, K] (CUDA, unit column stride, 0 < K <= MAX_K) -> (E2M1 values in float8_e4m3fn [M, K], FP32 scale
# [M, 1]): gemm_operand(x, "vector").
fp4_rows = torch.ops.fp4compile.fp4_rows.default
