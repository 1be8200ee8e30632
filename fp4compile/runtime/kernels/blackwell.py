"""Blackwell (sm_100) native FP4: block-scaled E2M1 x E2M1 GEMMs through Triton's ``tl.dot_scaled``.

    block_scaled_mm(a, a_scale, b, b_scale, a_ts, b_ts) = (A @ B^T) * a_ts * b_ts,   FP32 accumulation

with A [M, K] and B [N, K] given as packed E2M1 codes and block scales along K (the reduction dim):

- ``a``, ``b``: uint8 [M, K/2] / [N, K/2], two E2M1 codes per byte along K, element 2i in the low nibble
  (``QuantizedTensor.packed()``, the layout of ``torch.float4_e2m1fn_x2`` and of ``tl.dot_scaled``).
- ``a_scale``, ``b_scale``: row-major [M, K/block] / [N, K/block], one scale per block of K
  (``QuantizedTensor.scales``): MXFP4 block 32, uint8 E8M0 (exponent + 127, 255 = NaN); NVFP4 block 16,
  float8_e4m3fn. Both sides use this plain layout (``tl.dot_scaled``'s: B's scales are *not* transposed).
- ``a_ts``, ``b_ts``: NVFP4's FP32 tensor scales (0-d, read on the device and applied in the epilogue);
  None for MXFP4.

On sm_100 Triton lowers the kernel's ``tl.dot_scaled`` to ``tcgen05.mma ... kind::mxf4.block_scale``
(MXFP4) and ``kind::mxf4nvf4.block_scale`` (NVFP4); :func:`fp4compile.aot.compile_for` checks this ahead
of time on any machine (the triton wheel carries ptxas). On Hopper Triton emulates ``dot_scaled`` (upcast
to bf16, exact for these values), on CPU the op decodes and multiplies in FP32 (:func:`reference_mm`).

The "vector" format (E2M1 values, one FP32 scale per row along K) runs on the same kernel and the same
native MMA (:func:`vector_scaled_mm`): its codes with every E8M0 block scale 2^0 give the plain dot
products, and the FP32 row scales of A and B multiply the accumulator in the epilogue, as rowwise
``_scaled_mm`` does on Hopper.

The same NT kernel serves the forward and both backward GEMMs: each operand is quantized along that
GEMM's reduction dim (Y = X W^T: X and W along K; dX = dY W: dY along N and W^T along N; dW = dY^T X:
dY^T and X^T along the tokens), see :func:`block_scaled_matmul`.

The formats, the operands in this layout and the Triton quantize kernel that writes them are in
blackwell_quantize.py; ahead-of-time compilation is in fp4compile/aot.py.
"""

from __future__ import annotations

import re

import torch

from fp4compile.runtime import e2m1, gemm
from fp4compile.runtime.kernels.blackwell_quantize import (
    HAS_TRITON,
    BlockFormat,
    PackedOperand,
    _check_k,
    block_format,
    gemm_format,
    pack_operand,
    split_vector,
    unpack_operand,
)

if HAS_TRITON:
    import triton
    import triton.language as tl


# Tiles for sm_100: a 128 x 128 tcgen05 MMA, 256 K-elements (128 packed bytes) per step and 3 stages
# (A + B tiles are 32 KiB per stage). Small tiles for tests and the interpreter.
DEFAULT_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=3)


# ---------------------------------------------------------------------------------------------------------
# The Triton kernel
# ---------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _block_scaled_gemm_kernel(
        a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, a_ts_ptr, b_ts_ptr,
        M, N, K,
        stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
        VEC: tl.constexpr,  # elements of K per scale: 32 (MXFP4, vector) or 16 (NVFP4)
        HAS_TENSOR_SCALE: tl.constexpr,
        ROW_SCALES: tl.constexpr,  # vector format: a/b_scale_ptr hold FP32 per-row scales [M] / [N]
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # Grouped tile order: GROUP_M row-tiles share each B column-tile while it is in L2.
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        group_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % group_m
        pid_n = (pid % group) // group_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_kb = tl.arange(0, BLOCK_K // 2)  # packed bytes of one K step
        offs_ks = tl.arange(0, BLOCK_K // VEC)  # scales of one K step
        mask_m = offs_m[:, None] < M
        mask_n = offs_n[:, None] < N
        a_rows = a_ptr + offs_m[:, None] * stride_am
        b_rows = b_ptr + offs_n[:, None] * stride_bn
        as_rows = a_scale_ptr + offs_m[:, None] * stride_asm
        bs_rows = b_scale_ptr + offs_n[:, None] * stride_bsn

        if ROW_SCALES:
            # Every block scale 2^0 (E8M0 127), made once here instead of loaded (rows out of range get 0:
            # their codes are 0 anyway). A None scale would make Triton upcast the codes to a kind::f16 MMA.
            # Two constant tiles would do on triton 3.9, but 3.6 fails to compile them for sm_100 when equal
            # shapes let CSE merge them into one tensor-memory buffer; tiles built from the row masks stay
            # distinct and lower to kind::mxf4 on both (checked AOT).
            a_s = tl.broadcast_to(tl.where(mask_m, 127, 0).to(tl.uint8), (BLOCK_M, BLOCK_K // VEC))
            b_s = tl.broadcast_to(tl.where(mask_n, 127, 0).to(tl.uint8), (BLOCK_N, BLOCK_K // VEC))

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kb = k0 // 2 + offs_kb
            in_kb = kb[None, :] < K // 2
            # Out-of-range codes load as 0 (E2M1 zero): the tail of K and ragged M/N add nothing.
            a = tl.load(a_rows + kb[None, :], mask=mask_m & in_kb, other=0)
            b = tl.load(b_rows + kb[None, :], mask=mask_n & in_kb, other=0)
            if not ROW_SCALES:
                ks = k0 // VEC + offs_ks
                in_ks = ks[None, :] < K // VEC
                a_s = tl.load(as_rows + ks[None, :], mask=mask_m & in_ks, other=0)
                b_s = tl.load(bs_rows + ks[None, :], mask=mask_n & in_ks, other=0)
            if VEC == 16:  # NVFP4: the scale bytes are E4M3 (read as uint8, so that `other` is a plain 0)
                a_s = a_s.to(tl.float8e4nv, bitcast=True)
                b_s = b_s.to(tl.float8e4nv, bitcast=True)
            acc = tl.dot_scaled(a, a_s, "e2m1", b.T, b_s, "e2m1", acc)

        if HAS_TENSOR_SCALE:  # NVFP4: both FP32 tensor scales in the epilogue
            acc = acc * (tl.load(a_ts_ptr) * tl.load(b_ts_ptr))
        if ROW_SCALES:  # vector: (acc * a's row scale) * b's as columns, gemm.emulated's order of roundings
            acc = acc * tl.load(a_scale_ptr + offs_m * stride_asm, mask=offs_m < M, other=0.0)[:, None]
            acc = acc * tl.load(b_scale_ptr + offs_n * stride_bsn, mask=offs_n < N, other=0.0)[None, :]
        c = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_m & (offs_n[None, :] < N))

else:
    _block_scaled_gemm_kernel = None


def _check_operands(a, a_scale, b, b_scale, a_ts, b_ts, fmt: BlockFormat):
    for name, t in (("a", a), ("b", b), ("a_scale", a_scale), ("b_scale", b_scale)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-d, got shape {tuple(t.shape)}")
    for name, t in (("a", a), ("b", b)):
        if t.dtype != torch.uint8:
            raise TypeError(f"{name} must hold packed E2M1 codes as uint8 (two per byte along K), got {t.dtype}")
    for name, t in (("a_scale", a_scale), ("b_scale", b_scale)):
        if t.dtype != fmt.scale_dtype:
            raise TypeError(f"{fmt.name} {name} must be {fmt.scale_dtype}, got {t.dtype}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a holds K = {2 * a.shape[1]} but b holds K = {2 * b.shape[1]}")
    k = 2 * a.shape[1]
    _check_k(k, fmt)
    for name, t, rows in (("a_scale", a_scale, a.shape[0]), ("b_scale", b_scale, b.shape[0])):
        if tuple(t.shape) != (rows, k // fmt.block_size):
            raise ValueError(f"{name} must be [{rows}, {k // fmt.block_size}] (one scale per {fmt.block_size} "
                             f"elements of K = {k}), got {tuple(t.shape)}")
    if fmt.name == "nvfp4" and (a_ts is None or b_ts is None):
        raise ValueError("nvfp4 needs both FP32 tensor scales (a_tensor_scale, b_tensor_scale)")
    if fmt.name == "mxfp4" and (a_ts is not None or b_ts is not None):
        raise ValueError("mxfp4 has no tensor scales; pass None")
    for name, t in (("a", a), ("b", b)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along K")


def launch(a, a_scale, b, b_scale, a_ts, b_ts, format: str, out: torch.Tensor, kernel=None, **config):
    """Run the Triton kernel into ``out`` [M, N]. ``kernel`` overrides the launched function (e.g. a
    ``wrap_triton`` wrapper, or an interpreted copy of the kernel for CPU tests). For "vector",
    ``a_scale`` / ``b_scale`` are the FP32 row scales [M] / [N] and the tensor scales None."""
    fmt = gemm_format(format)
    cfg = {**DEFAULT_CONFIG, **config}
    if cfg["BLOCK_K"] % fmt.block_size or cfg["BLOCK_K"] % 64:
        raise ValueError(f"BLOCK_K must be a multiple of 64 and of the block size {fmt.block_size}")
    M, N, K = a.shape[0], b.shape[0], 2 * a.shape[1]
    kernel = kernel or _block_scaled_gemm_kernel
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    has_ts, rows = fmt.name == "nvfp4", fmt.name == "vector"
    a_ts_arg = a_ts if has_ts else None  # MXFP4, vector: None, specialized away
    b_ts_arg = b_ts if has_ts else None
    if not rows:  # the kernel reads block scales as bytes
        a_scale, b_scale = a_scale.view(torch.uint8), b_scale.view(torch.uint8)
    kernel[grid](
        a, a_scale, b, b_scale, out, a_ts_arg, b_ts_arg,
        M, N, K,
        a.stride(0), a_scale.stride(0), b.stride(0), b_scale.stride(0), out.stride(0),
        VEC=fmt.block_size, HAS_TENSOR_SCALE=has_ts, ROW_SCALES=rows,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def reference_mm(a, a_scale, b, b_scale, a_ts, b_ts, format: str, out_dtype=torch.float32) -> torch.Tensor:
    """What the kernel computes, decoded and multiplied in FP32 with torch ops (any device)."""
    av = unpack_operand(PackedOperand(a, a_scale, a_ts, format))
    bv = unpack_operand(PackedOperand(b, b_scale, b_ts, format))
    out = av @ bv.T
    if a_ts is not None:
        out = out * (a_ts.float() * b_ts.float())
    return out.to(out_dtype)


def _triton_version() -> tuple[int, int]:
    return tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2]) if HAS_TRITON else (0, 0)


# The CUDA capability majors whose tensor cores run the kernel's dot_scaled as native block-scaled FP4
# MMAs (tcgen05: sm_100, sm_103), what gemm.plan reads. sm_120 compiles (mma.sync block_scale) but its
# tiles are not sized yet; sm_90 runs the kernel with dot_scaled emulated (tests only, never dispatched).
NATIVE_MAJORS = (10,)


def kernel_reason(device: torch.device, format: str) -> str | None:
    """Why the Triton kernel does not run on ``device`` for ``format`` (None: it does). sm_100/sm_103
    lower it to native FP4 MMAs (checked AOT); on sm_90 Triton emulates dot_scaled (NVFP4 there needs
    triton >= 3.8: 3.6 and 3.7 fail to compile E4M3-scaled dot_scaled for sm_90). Elsewhere the op
    decodes and multiplies in FP32 (:func:`reference_mm`)."""
    fmt = gemm_format(format)
    if not HAS_TRITON:
        return "triton is not installed"
    if device.type != "cuda":
        return f"device {device.type!r}: the FP32 decode (reference_mm) runs instead"
    cap = torch.cuda.get_device_capability(device)
    if cap[0] != 9 and cap[0] not in NATIVE_MAJORS:
        return f"sm_{cap[0]}{cap[1]}: the kernel is built for sm_90 (emulated) and sm_100/sm_103 (native) only"
    if fmt.name == "nvfp4" and cap < (10, 0) and _triton_version() < (3, 8):
        return (f"triton {triton.__version__} cannot compile E4M3-scaled dot_scaled for sm_{cap[0]}{cap[1]} "
                "(needs >= 3.8)")
    return None


def _block_scaled_mm_impl(a, a_scale, b, b_scale, a_tensor_scale, b_tensor_scale, format, out_dtype):
    fmt = block_format(format)
    _check_operands(a, a_scale, b, b_scale, a_tensor_scale, b_tensor_scale, fmt)
    if kernel_reason(a.device, fmt.name) is not None:
        return reference_mm(a, a_scale, b, b_scale, a_tensor_scale, b_tensor_scale, format, out_dtype)
    out = torch.empty((a.shape[0], b.shape[0]), dtype=out_dtype, device=a.device)
    if out.numel() == 0:
        return out
    if a.shape[1] == 0:
        return out.zero_()
    return launch(a, a_scale, b, b_scale, a_tensor_scale, b_tensor_scale, format, out,
                  kernel=torch.library.wrap_triton(_block_scaled_gemm_kernel))


if HAS_TRITON:
    # A triton_op: torch.compile / Inductor sees the Triton kernel inside (and can trace through it).
    @torch.library.triton_op("fp4compile::block_scaled_mm", mutates_args=())
    def block_scaled_mm(
        a: torch.Tensor,
        a_scale: torch.Tensor,
        b: torch.Tensor,
        b_scale: torch.Tensor,
        a_tensor_scale: torch.Tensor | None,
        b_tensor_scale: torch.Tensor | None,
        format: str,
        out_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """(A @ B^T) * a_ts * b_ts for packed block-scaled FP4 operands; see the module doc for layouts."""
        return _block_scaled_mm_impl(a, a_scale, b, b_scale, a_tensor_scale, b_tensor_scale, format, out_dtype)

else:

    def block_scaled_mm(a, a_scale, b, b_scale, a_tensor_scale, b_tensor_scale, format, out_dtype=torch.float32):
        """(A @ B^T) * a_ts * b_ts for packed block-scaled FP4 operands (no triton: the FP32 emulation)."""
        return _block_scaled_mm_impl(a, a_scale, b, b_scale, a_tensor_scale, b_tensor_scale, format, out_dtype)


def block_scaled_matmul(x: torch.Tensor, w: torch.Tensor, format: str, out_dtype=torch.float32,
                        quantizer: str = "reference") -> torch.Tensor:
    """Q(x) @ Q(w)^T with both quantized along K (the last dim): x [..., K], w [N, K] -> [..., N].

    For the backward GEMMs pass the operands with their reduction dim last: dX = block_scaled_matmul(dY, W.T)
    and dW = block_scaled_matmul(dY.T, X.T) (each then quantized along that GEMM's reduction dim).
    """
    fmt = block_format(format)
    _check_k(x.shape[-1], fmt)
    if w.dim() != 2 or w.shape[1] != x.shape[-1]:
        raise ValueError(f"w must be [N, K] with K = {x.shape[-1]}, got {tuple(w.shape)}")
    qa = pack_operand(x.reshape(-1, x.shape[-1]), fmt.name, quantizer=quantizer)
    qb = pack_operand(w, fmt.name, quantizer=quantizer)
    out = block_scaled_mm(qa.packed, qa.scales, qb.packed, qb.scales, qa.tensor_scale, qb.tensor_scale,
                          fmt.name, out_dtype)
    return out.reshape(*x.shape[:-1], w.shape[0])


# ---------------------------------------------------------------------------------------------------------
# The vector format on the same kernel: unit block scales, FP32 row scales in the epilogue
# ---------------------------------------------------------------------------------------------------------



def _check_vector_operands(a, a_row_scale, b, b_row_scale):
    for name, t in (("a", a), ("b", b)):
        if t.dim() != 2 or t.dtype != torch.uint8:
            raise TypeError(f"{name} must be packed E2M1 codes, uint8 [rows, ceil(K/2)] (split_vector makes them), "
                            f"got {t.dtype} {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along K")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a holds {a.shape[1]} packed bytes per row but b holds {b.shape[1]}")
    for name, t, rows in (("a_row_scale", a_row_scale, a.shape[0]), ("b_row_scale", b_row_scale, b.shape[0])):
        if t.dtype != torch.float32 or tuple(t.shape) != (rows,):
            raise ValueError(f"{name} must be FP32 [{rows}] (one scale per row), got {t.dtype} {tuple(t.shape)}")


def vector_reference_mm(a, a_row_scale, b, b_row_scale, out_dtype=torch.float32) -> torch.Tensor:
    """What the kernel computes for "vector" (any device): ``gemm.emulated`` of the decoded codes, i.e. an
    FP32 GEMM, then A's row scales and B's as columns."""
    av, bv = (e2m1.decode_e2m1(e2m1.unpack_e2m1(t)) for t in (a, b))
    return gemm.emulated(av, a_row_scale[:, None], bv, b_row_scale[:, None]).to(out_dtype)


def _vector_scaled_mm_impl(a, a_row_scale, b, b_row_scale, out_dtype):
    _check_vector_operands(a, a_row_scale, b, b_row_scale)
    if kernel_reason(a.device, "vector") is not None or a.shape[1] == 0:
        return vector_reference_mm(a, a_row_scale, b, b_row_scale, out_dtype)
    out = torch.empty((a.shape[0], b.shape[0]), dtype=out_dtype, device=a.device)
    if out.numel() == 0:
        return out
    return launch(a, a_row_scale, b, b_row_scale, None, None, "vector", out,
                  kernel=torch.library.wrap_triton(_block_scaled_gemm_kernel))


if HAS_TRITON:

    @torch.library.triton_op("fp4compile::vector_scaled_mm", mutates_args=())
    def vector_scaled_mm(
        a: torch.Tensor,
        a_row_scale: torch.Tensor,
        b: torch.Tensor,
        b_row_scale: torch.Tensor,
        out_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """(A @ B^T) * a_row_scale[:, None] * b_row_scale[None, :] for packed E2M1 codes A [M, K/2], B [N, K/2]
        (the vector format; :func:`split_vector` makes them), FP32 accumulation, rounded once to out_dtype."""
        return _vector_scaled_mm_impl(a, a_row_scale, b, b_row_scale, out_dtype)

else:

    def vector_scaled_mm(a, a_row_scale, b, b_row_scale, out_dtype=torch.float32):
        """(A @ B^T) * a_row_scale[:, None] * b_row_scale[None, :] (no triton: the FP32 emulation)."""
        return _vector_scaled_mm_impl(a, a_row_scale, b, b_row_scale, out_dtype)


def vector_gemm(a, a_scale, b, b_scale, out_dtype=torch.float32) -> torch.Tensor:
    """``gemm.scaled_gemm`` for vector-format operands (values and row scales as ``gemm_operand`` returns
    them) with a 2-D ``b``, on the native kernel: [..., M, K] x [N, K] -> [..., M, N]."""
    if b.dim() != 2 or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"vector_gemm takes a [..., M, K] and b [N, K], got {tuple(a.shape)} x {tuple(b.shape)}")
    (pa, sa), (pb, sb) = split_vector(a, a_scale), split_vector(b, b_scale)
    return vector_scaled_mm(pa, sa, pb, sb, out_dtype).reshape(*a.shape[:-1], b.shape[0])
