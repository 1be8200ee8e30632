"""``grouped_mm_fp32`` (runtime/grouped.py) in one Triton launch, with no device-to-host sync:

    rows form    a [S, K] x b [E, N, K] -> out [S, N],    out[s] = a[s] @ b[e].T for offs[e-1] <= s < offs[e]
    weight form  a [N, S] x b [S, K]    -> out [E, N, K], out[e] = a[:, offs[e-1]:offs[e]] @ b[offs[e-1]:offs[e]]

offs [E] int32 holds the cumulative group ends (offs[-1] := 0 before expert 0). Rows past offs[-1] belong
to no expert and get zeros in the rows form; an expert with no rows gets a zero matrix in the weight form.

Why: the custom op's per-expert loop needs ``offs.tolist()`` and launches E GEMMs; on an H100 that loop
was 40 of 48 ms of an MoE layer's step. Here each program finds its expert by reading offs itself.

Products are exact and accumulate in FP32 either way: where both operands are exact in BF16 (FP8 values,
BF16) the loaded tiles are converted to BF16 for the BF16 tensor cores (FP32 accumulator); with any
FP16 / FP32 operand they are converted to FP32 and multiplied in IEEE FP32 (no TF32). The result differs
from the loop only by FP32 summation order.

Operands are read through their strides (a transposed view costs no copy). FP8 operands are passed as
uint8 views and bitcast in the kernel: Triton's interpreter, which the CPU tests use, does not move
float8 tensors well.
"""

import os

import torch
import triton
import triton.language as tl

from fp4compile.runtime.gemm import BF16_EXACT, BF16_MIN_CAPABILITY

# Tiles by path: BF16 tensor cores (wgmma) or FP32 FMA (smaller: accumulator and operand tiles live in
# registers). Rows form: BLOCK_M x BLOCK_N output tiles over BLOCK_K; weight form: BLOCK_N x BLOCK_K
# output tiles over BLOCK_S rows. BF16 tiles picked on an H100 (triton 3.6) for Qwen3-30B-A3B's
# gate_up backward (S = 131072, 128 experts, 2048 x 1536): rows form e5m2 x e4m3 2.5 ms (the per-expert
# loop: 12.1 ms; 128 x 128 tiles: 3.2 ms), weight form e5m2 x e4m3 3.4 ms (loop 9.9 ms; 128 x 128: 4.1).
CONFIGS = {
    ("rows", True): dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
    ("rows", False): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
    ("weight", True): dict(BLOCK_N=256, BLOCK_K=128, BLOCK_S=64, num_warps=8, num_stages=3),
    ("weight", False): dict(BLOCK_N=64, BLOCK_K=64, BLOCK_S=32, num_warps=4, num_stages=2),
}
# The interpreter runs a program at a time in numpy: small tiles keep CPU tests fast.
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_S=16, num_warps=1, num_stages=1)

DTYPES = (*BF16_EXACT, torch.float16, torch.float32)
_FP8_KIND = {torch.float8_e4m3fn: 1, torch.float8_e5m2: 2}  # the kernels' FP8 constexpr; 0: not FP8


@triton.jit
def _upcast(x, FP8: tl.constexpr, BF16_DOT: tl.constexpr):
    """A loaded tile (FP8 as uint8 bytes) as the dot's operand type, exactly. FP8 goes through FP16,
    which holds every FP8 value, inf and NaN too: Triton's direct E5M2 -> BF16 on sm_90 rebiases the
    exponent by a multiply, which makes inf and NaN finite. E5M2 is FP16's upper byte, so it is shifted
    into place (the interpreter's E5M2 -> FP16 flushes subnormals)."""
    if FP8 == 1:
        x = x.to(tl.float8e4nv, bitcast=True).to(tl.float16)
    elif FP8 == 2:
        x = (x.to(tl.uint16) << 8).to(tl.float16, bitcast=True)
    return x.to(tl.bfloat16) if BF16_DOT else x.to(tl.float32)


@triton.jit
def _mma(acc, a, b, BF16_DOT: tl.constexpr, INTERPRETED: tl.constexpr):
    if BF16_DOT and not INTERPRETED:
        acc = tl.dot(a, b, acc, out_dtype=tl.float32)
    else:
        # The interpreter multiplies BF16 tiles as their raw 16-bit patterns (it stores BF16 as uint16):
        # it takes the (exact) FP32 values of the BF16 tiles instead, the same products.
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def _find_tile(offs_ptr, pid, S, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(segment, first row, end row) of row tile ``pid``. Segment e < E holds expert e's rows
    offs[e-1]:offs[e], segment E the rows past offs[-1] (zeros); each makes cdiv(rows, BLOCK_M) tiles,
    in order. A segment past E: no tile (the grid is an upper bound). Offsets are clamped to [0, S], as
    slicing clips them. One vector over the segments (BLOCK_E > E lanes), not a loop of E dependent
    scalar loads per program."""
    e = tl.arange(0, BLOCK_E)
    ends = tl.minimum(tl.maximum(tl.load(offs_ptr + e, mask=e < E, other=0), 0), S)
    ends = tl.where(e == E, S, ends)
    starts = tl.minimum(tl.maximum(tl.load(offs_ptr + e - 1, mask=(e > 0) & (e <= E), other=0), 0), S)
    tiles = tl.cdiv(tl.maximum(ends - starts, 0), BLOCK_M)  # 0 past segment E
    done = tl.cumsum(tiles, 0)  # the tiles of segments 0..e
    segment = tl.sum((done <= pid).to(tl.int32), 0)  # the first segment that has not ended before pid
    mine = e == segment
    row0 = tl.sum(tl.where(mine, starts + (pid - done + tiles) * BLOCK_M, 0), 0)
    return segment, row0, tl.sum(tl.where(mine, ends, 0), 0)


@triton.jit
def _rows_kernel(a_ptr, b_ptr, offs_ptr, out_ptr, S, N, K, E,
                 stride_as, stride_ak, stride_be, stride_bn, stride_bk, stride_os,
                 A_FP8: tl.constexpr, B_FP8: tl.constexpr, BF16_DOT: tl.constexpr, INTERPRETED: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
    expert, row0, row_end = _find_tile(offs_ptr, tl.program_id(0), S, E, BLOCK_M, BLOCK_E)
    if expert > E:  # past the last tile
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    rmask, cmask = rows < row_end, cols < N
    # int64 offsets: S * K, E * N * K and the like can pass 2^31. The tiles of the rows past offs[-1]
    # (expert E) skip the loop and store zeros, so the output needs no memset; b's pointer stays in
    # bounds for them.
    b_base = b_ptr + tl.minimum(expert, E - 1).to(tl.int64) * stride_be
    a_tile = a_ptr + rows.to(tl.int64)[:, None] * stride_as + ks.to(tl.int64)[None, :] * stride_ak
    b_tile = b_base + ks.to(tl.int64)[:, None] * stride_bk + cols.to(tl.int64)[None, :] * stride_bn
    a_step, b_step = tl.cast(stride_ak, tl.int64) * BLOCK_K, tl.cast(stride_bk, tl.int64) * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if expert < E:
        for k in range(0, K, BLOCK_K):
            kmask = ks < K - k
            a = tl.load(a_tile, mask=rmask[:, None] & kmask[None, :], other=0)
            b = tl.load(b_tile, mask=kmask[:, None] & cmask[None, :], other=0)
            acc = _mma(acc, _upcast(a, A_FP8, BF16_DOT), _upcast(b, B_FP8, BF16_DOT), BF16_DOT, INTERPRETED)
            a_tile += a_step
            b_tile += b_step
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_os + cols[None, :]
    tl.store(out, acc, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _segment_step(acc, a_ptrs, b_ptrs, rows, start, end, a_mask, b_mask, A_FP8: tl.constexpr,
                  B_FP8: tl.constexpr, BF16_DOT: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + a[:, rows] @ b[rows] over the ``rows`` in [start, end), zeroed in both operands: a
    neighbouring group's inf or NaN times a zero would not be zero."""
    inside = (rows >= start) & (rows < end)
    a = tl.where(inside[None, :], _upcast(tl.load(a_ptrs, mask=a_mask, other=0), A_FP8, BF16_DOT), 0.0)
    b = tl.where(inside[:, None], _upcast(tl.load(b_ptrs, mask=b_mask, other=0), B_FP8, BF16_DOT), 0.0)
    return _mma(acc, a, b, BF16_DOT, INTERPRETED)


@triton.jit
def _weight_kernel(a_ptr, b_ptr, offs_ptr, out_ptr, S, N, K,
                   stride_an, stride_as, stride_bs, stride_bk,
                   A_FP8: tl.constexpr, B_FP8: tl.constexpr, BF16_DOT: tl.constexpr, INTERPRETED: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    # Output tiles on axis 0, experts on axis 1: the programs running together share an expert's rows
    # of a and b in L2 (experts first, each would stream its own).
    tiles_k = tl.cdiv(K, BLOCK_K)
    e = tl.program_id(1)
    cols_n = (tl.program_id(0) // tiles_k) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_k = (tl.program_id(0) % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    nmask, kmask = cols_n < N, cols_k < K
    start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    start = tl.minimum(tl.maximum(start, 0), S)
    end = tl.minimum(tl.maximum(tl.load(offs_ptr + e), 0), S)
    # Groups start anywhere: the steps start at a multiple of BLOCK_S and load whole aligned blocks, then
    # zero the rows outside [start, end) in registers (_segment_step). Only the block that S cuts
    # (from `last` on) masks its loads at S: elsewhere the loads stay vectorized, also where S is not a
    # multiple of 16. An empty group stores zeros.
    first = (start // BLOCK_S) * BLOCK_S
    last = (S // BLOCK_S) * BLOCK_S
    ss = tl.arange(0, BLOCK_S)
    a_tile = a_ptr + cols_n.to(tl.int64)[:, None] * stride_an + (first.to(tl.int64) + ss)[None, :] * stride_as
    b_tile = b_ptr + (first.to(tl.int64) + ss)[:, None] * stride_bs + cols_k.to(tl.int64)[None, :] * stride_bk
    a_step, b_step = tl.cast(stride_as, tl.int64) * BLOCK_S, tl.cast(stride_bs, tl.int64) * BLOCK_S
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for s in range(first, tl.minimum(end, last), BLOCK_S):
        acc = _segment_step(acc, a_tile, b_tile, s + ss, start, end, nmask[:, None], kmask[None, :],
                            A_FP8, B_FP8, BF16_DOT, INTERPRETED)
        a_tile += a_step
        b_tile += b_step
    if end > last:  # a_tile and b_tile point at row `last`
        in_s = last + ss < S
        acc = _segment_step(acc, a_tile, b_tile, last + ss, start, end, nmask[:, None] & in_s[None, :],
                            in_s[:, None] & kmask[None, :], A_FP8, B_FP8, BF16_DOT, INTERPRETED)
    out = out_ptr + e.to(tl.int64) * N * K + cols_n.to(tl.int64)[:, None] * K + cols_k[None, :]
    tl.store(out, acc, mask=nmask[:, None] & kmask[None, :])


def _operand(t: torch.Tensor):
    """(the tensor the kernel reads, its FP8 kind): FP8 as uint8 bytes (same strides), for the interpreter."""
    if t.dtype not in DTYPES:
        raise TypeError(f"grouped_mm takes operands of {', '.join(map(str, DTYPES))}, got {t.dtype}")
    kind = _FP8_KIND.get(t.dtype, 0)
    return (t.view(torch.uint8) if kind else t), kind


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _launch(kernel, form: str, grid_of, args, a_fp8: int, b_fp8: int, bf16_dot: bool, config: dict | None,
            **constexprs):
    """Run ``kernel`` on ``args`` with the form's tiles (``config`` overrides them) over ``grid_of(tiles)``."""
    cfg = {**(INTERPRETER_CONFIG if _interpreted() else CONFIGS[form, bf16_dot]), **(config or {})}
    blocks = ("BLOCK_M", "BLOCK_N", "BLOCK_K") if form == "rows" else ("BLOCK_N", "BLOCK_K", "BLOCK_S")
    tiles = {name: cfg[name] for name in blocks}
    kernel[grid_of(tiles)](*args, A_FP8=a_fp8, B_FP8=b_fp8, BF16_DOT=bf16_dot, INTERPRETED=_interpreted(),
                           **tiles, **constexprs, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _check(a, b, offs):
    if offs.dim() != 1 or offs.dtype != torch.int32:
        raise ValueError(f"offs must be 1-D int32 group ends, got {offs.dtype} of shape {tuple(offs.shape)}")
    if not (a.device == b.device == offs.device):
        raise ValueError(f"a, b and offs must be on one device, got {a.device}, {b.device}, {offs.device}")
    if a.dim() != 2 or b.dim() not in (2, 3):
        raise ValueError(f"a must be 2-D and b 2-D or 3-D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if b.dim() == 3 and (a.shape[1] != b.shape[2] or b.shape[0] < offs.shape[0]):
        raise ValueError(f"rows form: a [S, K] x b [E, N, K] with E >= offs' {offs.shape[0]}, got "
                         f"{tuple(a.shape)} x {tuple(b.shape)}")
    if b.dim() == 2 and a.shape[1] != b.shape[0]:
        raise ValueError(f"weight form: a [N, S] x b [S, K], got {tuple(a.shape)} x {tuple(b.shape)}")


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """``grouped_mm_fp32(a, b, offs)`` in one launch (see the module docstring), FP32 output. offs must be
    non-decreasing (entries are clamped to [0, S]). ``config`` overrides the tile sizes, warps and stages
    (CONFIGS)."""
    _check(a, b, offs)
    # BF16 tensor cores from sm_80 on; older GPUs multiply in FP32.
    bf16_dot = a.dtype in BF16_EXACT and b.dtype in BF16_EXACT and (
        not a.is_cuda or torch.cuda.get_device_capability(a.device) >= BF16_MIN_CAPABILITY)
    (a_, a_fp8), (b_, b_fp8) = _operand(a), _operand(b)
    offs = offs.contiguous()
    E = offs.shape[0]
    if b.dim() == 3:
        (S, K), N = a.shape, b.shape[1]
        out = torch.empty(S, N, dtype=torch.float32, device=a.device)  # every row is stored, zeros too
        if E == 0:  # b may have no storage to point at
            return out.zero_()
        if out.numel():
            # An upper bound of the row tiles, so that the host needs no offs: E + 1 segments (the experts
            # and the rows past offs[-1]) adding up to S rows make at most cdiv(S, BLOCK_M) + E tiles.
            grid = lambda t: (triton.cdiv(S, t["BLOCK_M"]) + E, triton.cdiv(N, t["BLOCK_N"]))  # noqa: E731
            args = (a_, b_, offs, out, S, N, K, E, *a_.stride(), *b_.stride(), out.stride(0))
            _launch(_rows_kernel, "rows", grid, args, a_fp8, b_fp8, bf16_dot, config,
                    BLOCK_E=triton.next_power_of_2(E + 1))
        return out
    (N, S), K = a.shape, b.shape[1]
    out = torch.empty(E, N, K, dtype=torch.float32, device=a.device)
    if out.numel():
        grid = lambda t: (triton.cdiv(N, t["BLOCK_N"]) * triton.cdiv(K, t["BLOCK_K"]), E)  # noqa: E731
        args = (a_, b_, offs, out, S, N, K, *a_.stride(), *b_.stride())
        _launch(_weight_kernel, "weight", grid, args, a_fp8, b_fp8, bf16_dot, config)
    return out
