"""Both FP8 operands of a linear's gradient GEMMs from dY [M, N], in two passes over dY (CUDA, Triton).

dX = dY @ W takes (dY * fold_cols) quantized per row of dY; dW = dY^T @ X takes (dY^T * fold_rows^T)
quantized per row of dY^T, row-major for _scaled_mm's A ([N, M] contiguous). The reference is two calls
of ``fp8.quantize_fp8_rows``; this computes the same bits. Inductor fuses those calls into dY's producer,
but as a column-amax kernel plus a looped row reduction that reads the producer's inputs twice per row
and stores the dW operand in dY's layout, so a transpose kernel follows. Here pass 1 reduces each tile's
row and column amaxes into two vectors (an atomic max on the float bits, which order like the floats
since they are >= 0), and pass 2 re-reads the tile, quantizes it both ways and stores the dW operand
transposed (Triton moves the tile through shared memory, so both stores coalesce).

A ``torch.library.custom_op`` rather than a ``triton_op``: its schema says dY is only read, so the
compiled backward writes dY once. Traced as a triton_op, each kernel's inputs went through Inductor's
analysis of what a kernel mutates, which failed under torch 2.11 and cloned dY for each of the two
kernels (docs/performance.md).
"""

import torch
import triton
import triton.language as tl

from fp4compile.runtime.quantize import MIN_SCALE

# (BLOCK_M, BLOCK_N) at Triton's default 4 warps, the fastest of the tiles measured on an H200
# (docs/performance.md).
AMAX_TILE = (128, 64)
QUANTIZE_TILE = (64, 64)


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
def _amax_bits(v):
    """|v| as int32 bits, NaN as +inf: either makes the scale NaN (quantize.poison)."""
    a = tl.abs(v)
    return tl.where(a == a, a, float("inf")).to(tl.int32, bitcast=True)


@triton.jit
def _amax_kernel(x_ptr, fc_ptr, fr_ptr, row_amax_ptr, col_amax_ptr, M, N, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    for_dx, for_dw, rmask, cmask, _ = _tile(x_ptr, fc_ptr, fr_ptr, rows, cols, M, N)
    tl.atomic_max(row_amax_ptr + rows, tl.max(_amax_bits(for_dx), axis=1), mask=rmask, sem="relaxed")
    tl.atomic_max(col_amax_ptr + cols, tl.max(_amax_bits(for_dw), axis=0), mask=cmask, sem="relaxed")


@triton.jit
def _scale(amax, INV_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
    """(scale, reciprocal) as fp8.quantize_fp8_rows computes them from an amax (inf where it was not finite)."""
    s = amax * INV_MAX
    s = tl.where(s > 0, tl.maximum(s, MIN_SCALE), s)
    s = tl.where(amax < float("inf"), s, float("nan"))
    r = (1.0 / tl.where(s == 0, float("inf"), s).to(tl.float64)).to(tl.float32)
    return s, r


@triton.jit
def _quantize_kernel(x_ptr, fc_ptr, fr_ptr, row_amax_ptr, col_amax_ptr, dx_ptr, dx_scale_ptr, dw_ptr,
                     dw_scale_ptr, M, N, INV_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    for_dx, for_dw, rmask, cmask, mask = _tile(x_ptr, fc_ptr, fr_ptr, rows, cols, M, N)
    row_scale, row_r = _scale(tl.load(row_amax_ptr + rows, mask=rmask, other=0.0), INV_MAX, MIN_SCALE)
    col_scale, col_r = _scale(tl.load(col_amax_ptr + cols, mask=cmask, other=0.0), INV_MAX, MIN_SCALE)
    dx = (for_dx * row_r[:, None]).to(dx_ptr.dtype.element_ty)
    tl.store(dx_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], dx, mask=mask)
    dw = (for_dw * col_r[None, :]).to(dw_ptr.dtype.element_ty)
    tl.store(dw_ptr + cols[:, None].to(tl.int64) * M + rows[None, :], tl.trans(dw), mask=tl.trans(mask))
    if tl.program_id(1) == 0:
        tl.store(dx_scale_ptr + rows, row_scale, mask=rmask)
    if tl.program_id(0) == 0:
        tl.store(dw_scale_ptr + cols, col_scale, mask=cmask)


@torch.library.custom_op("fp4compile::fp8_grad_operands", mutates_args=())
def fp8_grad_operands(
    dy: torch.Tensor, fold_cols: torch.Tensor, fold_rows: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dY [M, N] (CUDA, M, N > 0), fold_cols [N] and fold_rows [M] (FP32, contiguous) -> (dX operand
    [M, N], its scale [M, 1], dW operand [N, M], its scale [N, 1]), FP8 ``dtype`` data and FP32 scales."""
    m, n = dy.shape
    dy = dy.contiguous()
    dx, dw = torch.empty((m, n), dtype=dtype, device=dy.device), torch.empty((n, m), dtype=dtype, device=dy.device)
    dx_scale = torch.empty((m, 1), dtype=torch.float32, device=dy.device)
    dw_scale = torch.empty((n, 1), dtype=torch.float32, device=dy.device)
    amax = torch.zeros(m + n, dtype=torch.int32, device=dy.device)  # one memset for both
    row_amax, col_amax = amax[:m], amax[m:]
    bm, bn = AMAX_TILE
    _amax_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        dy, fold_cols, fold_rows, row_amax, col_amax, m, n, BLOCK_M=bm, BLOCK_N=bn)
    bm, bn = QUANTIZE_TILE
    _quantize_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        dy, fold_cols, fold_rows, row_amax.view(torch.float32), col_amax.view(torch.float32), dx, dx_scale, dw,
        dw_scale, m, n, INV_MAX=1.0 / torch.finfo(dtype).max, MIN_SCALE=MIN_SCALE, BLOCK_M=bm, BLOCK_N=bn)
    return dx, dx_scale, dw, dw_scale


@fp8_grad_operands.register_fake
def _(dy, fold_cols, fold_rows, dtype):
    m, n = dy.shape
    return (dy.new_empty((m, n), dtype=dtype), dy.new_empty((m, 1), dtype=torch.float32),
            dy.new_empty((n, m), dtype=dtype), dy.new_empty((n, 1), dtype=torch.float32))
