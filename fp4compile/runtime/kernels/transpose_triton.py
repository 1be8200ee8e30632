"""A tiled transpose of a contiguous 2-D tensor of 1-byte elements, for _scaled_mm's operand layouts.

Why a kernel of our own: given ``.contiguous()`` on a transposed view, Inductor fuses the copy into the
quantize kernel that produced the operand as a loop whose stores walk down a column, one byte per thread
at a stride of M bytes (a 32-sector store per warp instruction), an order of magnitude slower than a
copy of the same bytes (CHANGELOG.md). Here each program loads a tile along rows and
stores it along rows of the output (Triton moves the tile through shared memory), so both sides
coalesce.

An operator of kernels/triton_operator.py (not a ``triton_op``): AOTAutograd sees one opaque call that
reads ``x``, so its CSE merges the transposes of a tensor that several sites share (the FP4 values of
q/k/v's or gate/up's input), where a traced triton_op writes into a fresh ``empty`` buffer per call that
CSE never merges; Inductor then launches the kernel from its generated code.
"""

import triton
import triton.language as tl

from fp4compile.runtime.kernels.triton_operator import define

_TILE = 128


@triton.jit
def _transpose_tiles(x_ptr, y_ptr, R, C, TILE: tl.constexpr):
    rows = tl.program_id(0) * TILE + tl.arange(0, TILE)
    cols = tl.program_id(1) * TILE + tl.arange(0, TILE)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    tile = tl.load(x_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], mask=mask)
    tl.store(y_ptr + cols[:, None].to(tl.int64) * R + rows[None, :], tl.trans(tile), mask=tl.trans(mask))


def _transpose_bytes(ex, x):
    rows, cols = ex.size(x)
    x = ex.contiguous(x)
    out = ex.empty((cols, rows), ex.dtype(x))
    if rows and cols:
        grid = (ex.cdiv(rows, _TILE), ex.cdiv(cols, _TILE))
        ex.run(_transpose_tiles, grid, {"x_ptr": ex.as_bytes(x), "y_ptr": ex.as_bytes(out), "R": rows, "C": cols},
               {"TILE": _TILE, "num_warps": 4})
    return out


# x [R, C] (1-byte dtype, CUDA) -> x.t().contiguous() [C, R].
transpose_bytes = define("transpose_bytes(Tensor x) -> Tensor", _transpose_bytes,
                         lambda x: x.new_empty((x.shape[1], x.shape[0])))
