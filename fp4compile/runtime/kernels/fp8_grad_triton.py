"""Both FP8 operands of a linear's gradient GEMMs from dY [M, N], in two passes over dY (CUDA, Triton).

dX = dY @ W takes (dY * fold_cols) quantized per row of dY; dW = dY^T @ X takes (dY^T * fold_rows^T)
quantized per row of dY^T, row-major for _scaled_mm's A ([N, M] contiguous). The reference is two calls
of ``fp8.quantize_fp8_rows``; this computes the same bits. Inductor fuses those calls into dY's producer,
but as a column-amax kernel plus a looped row reduction that reads the producer's inputs twice per row
and stores the dW operand in dY's layout, so a transpose kernel follows. Here pass 1 reduces each tile's
row and column amaxes into one vector (an atomic max on the float bits, which order like the floats
since they are >= 0; a NaN's bits order above inf's), a small kernel turns the M + N amaxes into scales
and their reciprocals, and pass 2 re-reads each tile, quantizes it both ways and stores the dW operand
transposed (Triton moves the tile through shared memory, so both stores coalesce). Each reciprocal is
computed once, not (in float64) in every tile that needs it: replicated per tile, the float64
divisions bounded pass 2 well below copy bandwidth (CHANGELOG.md).

An operator of kernels/triton_operator.py rather than a ``triton_op``: its schema says dY is only read,
so the compiled backward writes dY once (traced as a triton_op, each kernel's inputs went through torch's
analysis of what a kernel mutates, and the compiled backward stored dY once per kernel: CHANGELOG.md);
Inductor launches the three kernels from its generated code.
"""

import torch
import triton
import triton.language as tl

from fp4compile.runtime.kernels.triton_operator import define
from fp4compile.runtime.kernels.triton_quantize import absmax_scale, magnitude_bits
from fp4compile.runtime.quantize import MIN_SCALE

# (BLOCK_M, BLOCK_N, warps), the fastest tiles for 16384 x {2048, 4096, 5632, 14336} (CHANGELOG.md).
AMAX_TILE = (128, 64, 4)
QUANTIZE_TILE = (64, 128, 4)
_SCALE_BLOCK = 1024


@triton.jit
def _tile(x_ptr, fc_ptr, fr_ptr, rows, cols, M, N):
    """dY[rows, cols] (FP32) times each fold, and the masks."""
    rmask, cmask = rows < M, cols < N
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    fc = tl.load(fc_ptr + cols, mask=cmask, other=0.0)
    fr = tl.load(fr_ptr + rows, mask=rmask, other=0.0)
    return x * fc[None, :], x * fr[:, None], rmask, cmask, mask


@triton.jit
def _amax_kernel(x_ptr, fc_ptr, fr_ptr, amax_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """amax_ptr [M + N]: each row's amax of dY * fold_cols, then each column's of dY * fold_rows."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    for_dx, for_dw, rmask, cmask, _ = _tile(x_ptr, fc_ptr, fr_ptr, rows, cols, M, N)
    tl.atomic_max(amax_ptr + rows, tl.max(magnitude_bits(for_dx), axis=1), mask=rmask, sem="relaxed")
    tl.atomic_max(amax_ptr + M + cols, tl.max(magnitude_bits(for_dw), axis=0), mask=cmask, sem="relaxed")


@triton.jit
def _scale_kernel(amax_ptr, recip_ptr, dx_scale_ptr, dw_scale_ptr, M, N, INV_MAX: tl.constexpr,
                  MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """Each amax (as the int32 bits _amax_kernel maxed) as a scale, as fp8.quantize_fp8_rows computes it,
    and the scale's reciprocal."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    amax = tl.load(amax_ptr + i, mask=i < M + N, other=0).to(tl.float32, bitcast=True)
    s, recip = absmax_scale(amax, INV_MAX, MIN_SCALE)
    tl.store(recip_ptr + i, recip, mask=i < M + N)
    tl.store(dx_scale_ptr + i, s, mask=i < M)
    tl.store(dw_scale_ptr + i - M, s, mask=(i >= M) & (i < M + N))


@triton.jit
def _quantize_kernel(x_ptr, fc_ptr, fr_ptr, recip_ptr, dx_ptr, dw_ptr, M, N, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    for_dx, for_dw, rmask, cmask, mask = _tile(x_ptr, fc_ptr, fr_ptr, rows, cols, M, N)
    row_r = tl.load(recip_ptr + rows, mask=rmask, other=0.0)
    col_r = tl.load(recip_ptr + M + cols, mask=cmask, other=0.0)
    dx = (for_dx * row_r[:, None]).to(dx_ptr.dtype.element_ty)
    tl.store(dx_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], dx, mask=mask)
    dw = (for_dw * col_r[None, :]).to(dw_ptr.dtype.element_ty)
    tl.store(dw_ptr + cols[:, None].to(tl.int64) * M + rows[None, :], tl.trans(dw), mask=tl.trans(mask))


def _fp8_grad_operands(ex, dy, fold_cols, fold_rows, dtype: torch.dtype):
    m, n = ex.size(dy)
    dy, fold_cols, fold_rows = ex.contiguous(dy), ex.contiguous(fold_cols), ex.contiguous(fold_rows)
    dx, dw = ex.empty((m, n), dtype), ex.empty((n, m), dtype)
    dx_scale, dw_scale = ex.empty((m, 1), torch.float32), ex.empty((n, 1), torch.float32)
    amax, recip = ex.zeros((m + n,), torch.int32), ex.empty((m + n,), torch.float32)
    tiles = {"x_ptr": dy, "fc_ptr": fold_cols, "fr_ptr": fold_rows, "M": m, "N": n}
    bm, bn, warps = AMAX_TILE
    ex.run(_amax_kernel, (ex.cdiv(m, bm), ex.cdiv(n, bn)), {**tiles, "amax_ptr": amax},
           {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps})
    ex.run(_scale_kernel, (ex.cdiv(m + n, _SCALE_BLOCK),),
           {"amax_ptr": amax, "recip_ptr": recip, "dx_scale_ptr": dx_scale, "dw_scale_ptr": dw_scale, "M": m, "N": n},
           {"INV_MAX": 1.0 / torch.finfo(dtype).max, "MIN_SCALE": MIN_SCALE, "BLOCK": _SCALE_BLOCK, "num_warps": 4})
    bm, bn, warps = QUANTIZE_TILE
    ex.run(_quantize_kernel, (ex.cdiv(m, bm), ex.cdiv(n, bn)), {**tiles, "recip_ptr": recip, "dx_ptr": dx, "dw_ptr": dw},
           {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps})
    return dx, dx_scale, dw, dw_scale


def _fake(dy, fold_cols, fold_rows, dtype):
    m, n = dy.shape
    return (dy.new_empty((m, n), dtype=dtype), dy.new_empty((m, 1), dtype=torch.float32),
            dy.new_empty((n, m), dtype=dtype), dy.new_empty((n, 1), dtype=torch.float32))


# dY [M, N] (CUDA, M, N > 0), fold_cols [N] and fold_rows [M] (FP32, contiguous) -> (dX operand [M, N], its
# scale [M, 1], dW operand [N, M], its scale [N, 1]), FP8 ``dtype`` data and FP32 scales.
fp8_grad_operands = define("fp8_grad_operands(Tensor dy, Tensor fold_cols, Tensor fold_rows, ScalarType dtype)"
                           " -> (Tensor, Tensor, Tensor, Tensor)", _fp8_grad_operands, _fake)
