"""An activation's or a weight's FP4 GEMM operand in the "vector" format, one read of each row: its absmax
scale, the E2M1 values in float8_e4m3fn; the bits of ``quantize.gemm_operand(x, "vector")`` (CUDA, Triton),
and the scale's reciprocal (``quantize.reciprocal``) that the kernel multiplied the row by, for the
backward's DGE and requantize to multiply by (from the scale, Inductor's code would divide in float64 for
every element).

Why a kernel: Inductor fuses the reference into the activation's producer as a looped reduction that reads
each row twice and computes the producer twice (for the SwiGLU output: silu and the product of both inputs,
per element, twice), and stores the values once per kernel that reads them: for the SwiGLU output that cost
more than twice BF16's silu-multiply (CHANGELOG.md). Here the producer is stored once in the activation's
dtype, as BF16 stores it, and each program holds BLOCK_M whole rows in registers (BLOCK_K, the next power of
two of K, at most MAX_K). A weight is read once where Inductor's reduction read it twice. An operator of
kernels/triton_operator.py, as kernels/transpose_triton.py says why: AOTAutograd's CSE merges the calls for an
input several sites share (q/k/v's, gate/up's).

With a rotation matrix (``FP4Config.rotation``: hadamard.rotation_matrix, [G, G] in x's dtype), each row
is first multiplied by it in groups of G along K (one tensor-core dot per program in x's dtype, FP32
accumulation, rounded to x's dtype as ``hadamard.rotate`` rounds it), so the rotated operand is never
stored: the bits of ``gemm_operand(rotate(x, G), "vector")`` wherever the dot's FP32 sums are exact (the
order of the additions is the kernel's own, as it is cuBLAS's in the reference's GEMM).

``fp4_rows_swiglu(gate, up)`` quantizes SwiGLU's product ``silu(gate) * up`` (then rotated, with a
matrix), computed in registers as Inductor's code computes it (silu as ``x / (1 + exp(-x))`` in FP32 with
libdevice's exp, rounded to the inputs' dtype, times ``up``, rounded again): the product, which nothing
else reads, is never stored. The joint-graph pass passes/swiglu.py puts it in place of ``fp4_rows`` of
the product.
"""

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from fp4compile.runtime.e2m1 import E2M1_MAX
from fp4compile.runtime.kernels.triton_operator import define
from fp4compile.runtime.kernels.triton_quantize import absmax_scale, bf16_rne, e2m1_rne, magnitude_bits
from fp4compile.runtime.quantize import MIN_SCALE

MAX_K = 16384  # BLOCK_K FP32 values over 8 warps, 64 per thread (rotated: 4 warps, 128)


@triton.jit
def _rounded(y, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """FP32 y rounded to ``dtype`` (as storing it would), kept in FP32: the conversion instructions on a
    GPU (a sixth less time for the SwiGLU kernel than bf16_rne's integer steps on an H100), bf16_rne in
    Triton's interpreter, which converts FP32 subnormals to BF16 wrong."""
    if dtype == tl.bfloat16 and INTERPRETED:
        y = bf16_rne(y)
    elif dtype == tl.bfloat16 or dtype == tl.float16:
        y = y.to(dtype).to(tl.float32)
    return y


@triton.jit
def _rotated(x, r_ptr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
             INTERPRETED: tl.constexpr):
    """x [BLOCK_M, BLOCK_K] (FP32 holding values of the matrix's dtype) times the [GROUP, GROUP] matrix at
    r_ptr in groups of GROUP along K, rounded to that dtype, in FP32. The dot multiplies that dtype on the
    tensor cores: BF16 and FP16 values times the matrix's +-1 are exact products, summed in FP32 (2.4-2.9x
    faster than TF32 operands on an H200: CHANGELOG.md); FP32 inputs take IEEE products. In Triton's
    interpreter, whose BF16 and FP16 dots are wrong, it multiplies in FP32: the same exact products."""
    idx = tl.arange(0, GROUP)
    r = tl.load(r_ptr + idx[:, None] * GROUP + idx[None, :])
    groups = tl.reshape(x, (BLOCK_M * BLOCK_K // GROUP, GROUP))
    if r.dtype == tl.float32 or INTERPRETED:
        y = tl.dot(groups, r.to(tl.float32), input_precision="ieee")
    else:
        y = tl.dot(groups.to(r.dtype), r, out_dtype=tl.float32)
    return tl.reshape(_rounded(y, r.dtype, INTERPRETED), (BLOCK_M, BLOCK_K))


@triton.jit
def _tile(x_ptr, up_ptr, M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SWIGLU: tl.constexpr,
          INTERPRETED: tl.constexpr):
    """This program's BLOCK_M rows of x in FP32, their offsets and masks; with ``SWIGLU``, of silu(x) * up,
    each rounded to x's dtype as Inductor's kernel for it rounds them (kept in FP32: Triton's interpreter
    converts subnormals to BF16 wrong, and has no libdevice: numpy's exp there)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    rmask = rows < M
    mask = rmask[:, None] & (cols < K)[None, :]
    offsets = rows[:, None].to(tl.int64) * K + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if SWIGLU:
        exp = tl.exp(-x) if INTERPRETED else libdevice.exp(-x)
        silu = _rounded(x / (1.0 + exp), x_ptr.dtype.element_ty, INTERPRETED)
        up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = _rounded(silu * up, x_ptr.dtype.element_ty, INTERPRETED)
    return x, offsets, rows, rmask, mask


@triton.jit
def _store_rows(x, offsets, rows, rmask, mask, v_ptr, s_ptr, i_ptr, INV_MAX: tl.constexpr,
                MIN_SCALE: tl.constexpr):
    """Each row of x (FP32) quantized: its absmax scale, its E2M1 values, the scale's reciprocal."""
    amax = tl.max(magnitude_bits(x), axis=1).to(tl.float32, bitcast=True)
    scale, recip = absmax_scale(amax, INV_MAX, MIN_SCALE)
    values = e2m1_rne(x * recip[:, None])
    tl.store(v_ptr + offsets, values.to(v_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows, scale, mask=rmask)
    tl.store(i_ptr + rows, recip, mask=rmask)


@triton.jit
def _fp4_rows_kernel(x_ptr, up_ptr, v_ptr, s_ptr, i_ptr, M, K, INV_MAX: tl.constexpr, MIN_SCALE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SWIGLU: tl.constexpr, INTERPRETED: tl.constexpr):
    x, offsets, rows, rmask, mask = _tile(x_ptr, up_ptr, M, K, BLOCK_M, BLOCK_K, SWIGLU, INTERPRETED)
    _store_rows(x, offsets, rows, rmask, mask, v_ptr, s_ptr, i_ptr, INV_MAX, MIN_SCALE)


@triton.jit
def _rotated_fp4_rows_kernel(x_ptr, up_ptr, r_ptr, v_ptr, s_ptr, i_ptr, M, K, INV_MAX: tl.constexpr,
                             MIN_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                             SWIGLU: tl.constexpr, GROUP: tl.constexpr, INTERPRETED: tl.constexpr):
    x, offsets, rows, rmask, mask = _tile(x_ptr, up_ptr, M, K, BLOCK_M, BLOCK_K, SWIGLU, INTERPRETED)
    x = _rotated(x, r_ptr, BLOCK_M, BLOCK_K, GROUP, INTERPRETED)
    _store_rows(x, offsets, rows, rmask, mask, v_ptr, s_ptr, i_ptr, INV_MAX, MIN_SCALE)


def _launch_shape(k: int, rotated: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, warps): 8192 elements per program (one row from BLOCK_K = 8192 up), 64 per
    thread, the fastest for K = 2048, 4096, 5632, 14336 (CHANGELOG.md); with a rotation 4 warps also for
    longer rows (at K = 14336 on an H100: 8% less time than 8 warps, 12% less with SwiGLU's product)."""
    block_k = triton.next_power_of_2(k)
    block_m = max(1, 8192 // block_k)
    return block_m, block_k, 4 if rotated else block_m * block_k // 2048


def _fp4_rows(ex, x, rotation=None, up=None):
    m, k = ex.size(x)
    width = ex.static(k)
    if width > MAX_K:
        raise ValueError(f"fp4_rows takes rows of at most {MAX_K} elements, got {k}; quantize.gemm_operand takes any")
    group = 0 if rotation is None else ex.static(ex.size(rotation)[0])
    if group and (width % group or ex.dtype(rotation) != ex.dtype(x)):
        raise ValueError(f"fp4_rows rotates rows of {k} elements in groups of {group} with a matrix of x's dtype "
                         f"({ex.dtype(x)}), got {ex.dtype(rotation)}; K must be a multiple of the group")
    block_m, block_k, warps = _launch_shape(width, bool(group))
    x = ex.contiguous(x)
    values = ex.empty((m, k), torch.float8_e4m3fn)
    scale, inverse = ex.empty((m, 1), torch.float32), ex.empty((m, 1), torch.float32)
    args = {"x_ptr": x, "up_ptr": x if up is None else ex.contiguous(up), "v_ptr": values, "s_ptr": scale,
            "i_ptr": inverse, "M": m, "K": k}
    meta = {"INV_MAX": 1.0 / E2M1_MAX, "MIN_SCALE": MIN_SCALE, "BLOCK_M": block_m, "BLOCK_K": block_k,
            "SWIGLU": up is not None, "INTERPRETED": os.environ.get("TRITON_INTERPRET") == "1", "num_warps": warps}
    if m and group:
        ex.run(_rotated_fp4_rows_kernel, (ex.cdiv(m, block_m),), {**args, "r_ptr": ex.contiguous(rotation)},
               {**meta, "GROUP": group})
    elif m:
        ex.run(_fp4_rows_kernel, (ex.cdiv(m, block_m),), args, meta)
    return values, scale, inverse


def _fp4_rows_swiglu(ex, gate, up, rotation=None):
    if ex.size(gate) != ex.size(up) or ex.dtype(gate) != ex.dtype(up):
        raise ValueError(f"fp4_rows_swiglu takes gate and up of one shape and dtype, got {ex.size(gate)} "
                         f"{ex.dtype(gate)} and {ex.size(up)} {ex.dtype(up)}; for others quantize the product: "
                         "fp4_rows(silu(gate) * up)")
    return _fp4_rows(ex, gate, rotation, up)


def _fake(x, *args):
    scale = x.new_empty((x.shape[0], 1), dtype=torch.float32)
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), scale, torch.empty_like(scale)


# x [M, K] (CUDA, 0 < K <= MAX_K), optionally a [G, G] rotation of x's dtype (G dividing K) -> (E2M1
# values in float8_e4m3fn [M, K], FP32 scale [M, 1], its reciprocal [M, 1]): gemm_operand(x, "vector"), or
# of hadamard.rotate(x, G), and quantize.reciprocal(scale).
fp4_rows = define("fp4_rows(Tensor x, Tensor? rotation=None) -> (Tensor, Tensor, Tensor)", _fp4_rows, _fake)
# The same of x = silu(gate) * up (gate, up [M, K] of one dtype), x never stored.
fp4_rows_swiglu = define("fp4_rows_swiglu(Tensor gate, Tensor up, Tensor? rotation=None) -> (Tensor, Tensor, Tensor)",
                         _fp4_rows_swiglu, _fake)
