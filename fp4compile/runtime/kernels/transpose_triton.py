"""Tiled transposes of 1-byte operands for _scaled_mm's layouts: of a contiguous 2-D tensor, and of
E2M1 codes packed two to a byte into their float8_e4m3fn values (what the backward keeps of an
activation, unpacked into the layout its weight-gradient GEMM reads).

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

import torch
import triton
import triton.language as tl

from fp4compile.runtime.kernels.triton_operator import define
from fp4compile.runtime.kernels.triton_quantize import e2m1_code_bits

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


@triton.jit
def _unpack_transpose_tiles(c_ptr, y_ptr, R, P, TILE: tl.constexpr):
    """codes [R, P] (two a byte, element 2i in the low nibble) -> y [2P, R], their E4M3 bytes."""
    rows = tl.program_id(0) * TILE + tl.arange(0, TILE)
    pairs = tl.program_id(1) * (TILE // 2) + tl.arange(0, TILE // 2)
    packed = tl.load(c_ptr + rows[:, None].to(tl.int64) * P + pairs[None, :],
                     mask=(rows[:, None] < R) & (pairs[None, :] < P), other=0).to(tl.int32)
    tile = e2m1_code_bits(tl.reshape(tl.join(packed & 0xF, packed >> 4), (TILE, TILE)))
    cols = tl.program_id(1) * TILE + tl.arange(0, TILE)
    mask = (cols[:, None] < 2 * P) & (rows[None, :] < R)
    tl.store(y_ptr + cols[:, None].to(tl.int64) * R + rows[None, :],
             tl.trans(tile).to(y_ptr.dtype.element_ty, bitcast=True), mask=mask)


def _unpack_transposed(ex, codes):
    rows, pairs = ex.size(codes)
    codes = ex.contiguous(codes)
    out = ex.empty((2 * pairs, rows), torch.float8_e4m3fn)
    if rows and pairs:
        grid = (ex.cdiv(rows, _TILE), ex.cdiv(pairs, _TILE // 2))
        ex.run(_unpack_transpose_tiles, grid, {"c_ptr": codes, "y_ptr": ex.as_bytes(out), "R": rows, "P": pairs},
               {"TILE": _TILE, "num_warps": 4})
    return out


# codes [R, P] (uint8, two E2M1 codes a byte as fp4_rows_packed writes them; CUDA) -> their values in
# float8_e4m3fn, transposed: [2P, R], decode_e2m1(unpack_e2m1(codes)).t() in E4M3, contiguous.
unpack_transposed = define("unpack_transposed(Tensor codes) -> Tensor", _unpack_transposed,
                           lambda codes: codes.new_empty((2 * codes.shape[1], codes.shape[0]),
                                                         dtype=torch.float8_e4m3fn))
