"""A tiled transpose of a contiguous 2-D tensor of 1-byte elements, for _scaled_mm's operand layouts.

Why a kernel of our own: given ``.contiguous()`` on a transposed view, Inductor fuses the copy into the
quantize kernel that produced the operand as a loop whose stores walk down a column, one byte per thread
at a stride of M bytes (a 32-sector store per warp instruction), an order of magnitude slower than a
copy of the same bytes (CHANGELOG.md). Here each program loads a tile along rows and
stores it along rows of the output (Triton moves the tile through shared memory), so both sides
coalesce.

An operator of its own (not a ``triton_op``): torch.compile sees one opaque call that reads ``x``, so
AOTAutograd's CSE merges the transposes of a tensor that several sites share (the FP4 values of q/k/v's
or gate/up's input). A traced triton_op writes into a fresh ``empty`` buffer per call, which CSE never
merges. Defined with ``torch.library.Library`` rather than ``torch.library.custom_op``: its calls skip
custom_op's Python autograd layer, about a third of the op's host time per call (CHANGELOG.md); the op
never sees a tensor that requires grad.
"""

import torch
import triton
import triton.language as tl

from fp4compile.runtime.kernels.launch import launch

_TILE = 128


@triton.jit
def _transpose_tiles(x_ptr, y_ptr, R, C, TILE: tl.constexpr):
    rows = tl.program_id(0) * TILE + tl.arange(0, TILE)
    cols = tl.program_id(1) * TILE + tl.arange(0, TILE)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    tile = tl.load(x_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], mask=mask)
    tl.store(y_ptr + cols[:, None].to(tl.int64) * R + rows[None, :], tl.trans(tile), mask=tl.trans(mask))


_lib = torch.library.Library("fp4compile", "FRAGMENT")
_lib.define("transpose_bytes(Tensor x) -> Tensor")


def _transpose_bytes(x: torch.Tensor) -> torch.Tensor:
    rows, cols = x.shape
    out = torch.empty((cols, rows), dtype=x.dtype, device=x.device)
    if x.numel():
        grid = (triton.cdiv(rows, _TILE), triton.cdiv(cols, _TILE))
        launch(_transpose_tiles, grid, (x.view(torch.uint8), out.view(torch.uint8), rows, cols), {"TILE": _TILE}, 4)
    return out


_lib.impl("transpose_bytes", _transpose_bytes, "CompositeExplicitAutograd")


@torch.library.register_fake("fp4compile::transpose_bytes")
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[1], x.shape[0]))


# x [R, C] (contiguous, 1-byte dtype, CUDA) -> x.t().contiguous() [C, R].
transpose_bytes = torch.ops.fp4compile.transpose_bytes.default
