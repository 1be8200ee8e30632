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
(MXFP4) and ``kind::mxf4nvf4.block_scale`` (NVFP4); :func:`compile_for` checks this ahead of time on any
machine (the triton wheel carries ptxas). On Hopper Triton emulates ``dot_scaled`` (upcast to bf16,
exact for these values), on CPU the op decodes and multiplies in FP32 (:func:`reference_mm`).

The "vector" format (E2M1 values, one FP32 scale per row along K) runs on the same kernel and the same
native MMA (:func:`vector_scaled_mm`): its codes with every E8M0 block scale 2^0 give the plain dot
products, and the FP32 row scales of A and B multiply the accumulator in the epilogue, as rowwise
``_scaled_mm`` does on Hopper.

The same NT kernel serves the forward and both backward GEMMs: each operand is quantized along that
GEMM's reduction dim (Y = X W^T: X and W along K; dX = dY W: dY along N and W^T along N; dW = dY^T X:
dY^T and X^T along the tokens), see :func:`block_scaled_matmul`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import subprocess

import torch

from fp4compile.runtime import e2m1, gemm
from fp4compile.runtime.formats import get_format
from fp4compile.runtime.quantize import QuantizedTensor, nvfp4_tensor_scale, poison, quantize

try:
    import triton
    import triton.language as tl

    from fp4compile.runtime.kernels.triton_quantize import e4m3_rne

    HAS_TRITON = True
except ImportError:  # the CPU emulation and the shape checks still work
    triton = tl = None
    HAS_TRITON = False


@dataclasses.dataclass(frozen=True)
class BlockFormat:
    name: str
    block_size: int  # elements of K per scale
    scale_dtype: torch.dtype  # the kernel reads the scale bytes as uint8 and bitcasts E4M3 ones itself
    mma_kind: str  # the tcgen05.mma kind sm_100 multiplies it with


BLOCK_FORMATS = {
    "mxfp4": BlockFormat("mxfp4", 32, torch.uint8, "kind::mxf4"),
    "nvfp4": BlockFormat("nvfp4", 16, torch.float8_e4m3fn, "kind::mxf4nvf4"),
}
# "vector" in the GEMM kernel: MXFP4's MMA with unit block scales (made in the kernel, so block_size is the
# MMA's 32 and not a constraint on K), and FP32 per-row scales of A and B.
VECTOR = BlockFormat("vector", 32, torch.float32, "kind::mxf4")

# Tiles for sm_100: a 128 x 128 tcgen05 MMA, 256 K-elements (128 packed bytes) per step and 3 stages
# (A + B tiles are 32 KiB per stage). Small tiles for tests and the interpreter.
DEFAULT_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=3)


def block_format(format: str) -> BlockFormat:
    """The block format named ``format``; a clear error for anything else."""
    get_format(format)  # unknown names: the same error as everywhere else
    try:
        return BLOCK_FORMATS[format]
    except KeyError:
        raise ValueError(
            f"the native FP4 GEMM multiplies block-scaled formats only ({sorted(BLOCK_FORMATS)}), got "
            f"{format!r}; 'vector' has its own GEMM (vector_scaled_mm), 'tensor' takes the FP8 tensor-core or "
            "emulated path"
        ) from None


def gemm_format(format: str) -> BlockFormat:
    """The GEMM kernel's formats: the block formats and "vector"."""
    return VECTOR if format == "vector" else block_format(format)


def _check_k(k: int, fmt: BlockFormat, what: str = "K") -> None:
    if k % fmt.block_size:
        raise ValueError(
            f"{fmt.name} scales blocks of {fmt.block_size} elements along the reduction dim, but {what} = {k} "
            f"is not a multiple of {fmt.block_size}; pad it to a multiple of {fmt.block_size}"
        )


# ---------------------------------------------------------------------------------------------------------
# Operands
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PackedOperand:
    """One GEMM operand in the kernel's layout: packed codes [R, K/2], scales [R, K/block], tensor scale."""

    packed: torch.Tensor
    scales: torch.Tensor
    tensor_scale: torch.Tensor | None
    format: str

    @property
    def k(self) -> int:
        return self.packed.shape[-1] * 2


def pack_operand(x: torch.Tensor, format: str, rounding: str = "nearest", generator=None,
                 quantizer: str = "reference") -> PackedOperand:
    """Quantize ``x`` [R, K] along K (its last dim) and lay it out for the kernel: with the reference
    quantizer (default; any device, any rounding) or ``quantizer="triton"`` (:func:`quantize_triton`:
    the same bytes, round to nearest only; checked bit-exact in Triton's interpreter, not yet on a GPU)."""
    fmt = block_format(format)
    if x.dim() != 2:
        raise ValueError(f"pack_operand takes a 2-d [rows, K] operand, got shape {tuple(x.shape)}")
    _check_k(x.shape[-1], fmt)
    if quantizer == "triton":
        if rounding != "nearest":
            raise ValueError("the Triton quantizer rounds to nearest only; use quantizer='reference'")
        return quantize_triton(x, fmt.name)
    if quantizer != "reference":
        raise ValueError(f"quantizer must be 'reference' or 'triton', got {quantizer!r}")
    return from_quantized(quantize(x, fmt.name, dim=-1, rounding=rounding, generator=generator))


def from_quantized(q: QuantizedTensor) -> PackedOperand:
    """A reference ``QuantizedTensor`` (block format, quantized along its last dim) in the kernel's layout."""
    block_format(q.format)
    if q.dim != q.data.dim() - 1:
        raise ValueError(f"the kernel reads scales along the last dim; this tensor was quantized along dim {q.dim}")
    ts = None if q.tensor_scale is None else q.tensor_scale.reshape(()).float()
    return PackedOperand(q.packed().contiguous(), q.scales.contiguous(), ts, q.format)


def split_nvfp4(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 products back into the kernel's layout: ``values`` [R, K] holding E2M1 values times E4M3 block
    scales (as ``gemm_operand(x, "nvfp4")`` and the unbiased recipes' quantizers write them, in BF16) ->
    (packed codes [R, K/2], float8_e4m3fn scales [R, K/16]) whose decoded products equal ``values``
    exactly. A block's scale is max|v| / m for the largest E2M1 magnitude m that reproduces every value
    of the block (the quantizer's own scale is one such m); an all-zero block gets scale 0, a block with a
    NaN or inf the NaN scale (so it stays poisoned). Finite values that are not such products give a wrong
    result, unchecked: the check would cost a host sync per GEMM."""
    blocks = values.float().unflatten(-1, (-1, 16))
    amax = blocks.abs().amax(-1, keepdim=True)
    scale, found = torch.zeros_like(amax), amax == 0
    for m in (6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5):
        s = (amax / m).to(torch.float8_e4m3fn).float()
        fits = ~found & (s > 0) & (e2m1.round_to_e2m1(blocks / s) * s == blocks).all(-1, keepdim=True)
        scale, found = torch.where(fits, s, scale), found | fits
    codes = e2m1.encode_e2m1(torch.where(scale > 0, blocks / scale, 0.0)).flatten(-2)
    scale = poison(scale, amax)
    return e2m1.pack_e2m1(codes), scale.squeeze(-1).to(torch.float8_e4m3fn)


def unpack_operand(op: PackedOperand) -> torch.Tensor:
    """Decode a packed operand to FP32 values times block scales (the tensor scale left out)."""
    fmt = block_format(op.format)
    values = e2m1.decode_e2m1(e2m1.unpack_e2m1(op.packed))
    if fmt.name == "mxfp4":
        s = op.scales.view(torch.uint8).float()
        scale = torch.where(s == 255, torch.nan, torch.exp2(s - 127))
    else:
        scale = op.scales.float()
    return values * scale.repeat_interleave(fmt.block_size, dim=-1)


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


def split_vector(values: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The vector format's GEMM operand (``gemm_operand(x, "vector")``: E2M1 values [..., K] in float8_e4m3fn,
    or any float dtype, and FP32 row scales [..., 1]; a 0-d scale is used for every row) in the kernel's
    layout: (packed codes uint8 [R, ceil(K/2)], FP32 row scales [R]), R the product of the leading dims.
    An odd K gets one zero code appended, which adds nothing. A row holding a NaN (or inf) gets a NaN scale,
    so that it stays poisoned as in the emulation (the quantizer already gives such rows a NaN scale).
    Finite values off the E2M1 grid give a wrong result, unchecked: the check would cost a host sync."""
    v = values.reshape(-1, values.shape[-1]).float()
    s = scale.float().broadcast_to((*values.shape[:-1], 1)).reshape(-1)
    if v.shape[-1]:
        s = poison(s, v.abs().amax(-1))
    codes = e2m1.encode_e2m1(torch.where(v.isfinite(), v, 0.0))
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return e2m1.pack_e2m1(codes), s


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


# ---------------------------------------------------------------------------------------------------------
# The Triton quantize kernel: x [R, K] -> packed codes [R, K/2] and block scales [R, K/block], bit-exact
# with the reference quantizer for finite inputs (round to nearest, ties to even)
# ---------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _quantize_kernel(
        x_ptr, q_ptr, s_ptr, ts_ptr,
        R, K,
        stride_xr, stride_qr, stride_sr,
        VEC: tl.constexpr,  # 32: MXFP4 (E8M0 scales), 16: NVFP4 (E4M3 scales, FP32 tensor scale at ts_ptr)
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_r = offs_r[:, None] < R
        x = tl.load(x_ptr + offs_r[:, None] * stride_xr + offs_k[None, :], mask=mask_r & (offs_k[None, :] < K),
                    other=0.0).to(tl.float32)
        xb = tl.reshape(x, (BLOCK_R, BLOCK_K // VEC, VEC))
        amax = tl.max(tl.abs(xb), axis=2)
        # A NaN or inf in a block poisons its scale (the reference's convention); tl.max may drop NaNs.
        finite = tl.min((tl.abs(xb) < float("inf")).to(tl.int32), axis=2) != 0
        if VEC == 32:
            # E8M0: shared exponent floor(log2(amax)) - 2, clamped at -127, from amax's exponent bits;
            # a zero or subnormal amax gives -127. The scaled values are x * 2^-shared (exact).
            biased = tl.maximum((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF, 2)  # shared + 129
            stored = tl.where(finite, biased - 2, 255)
            inv = ((256 - biased) << 23).to(tl.float32, bitcast=True)  # 2^(127 - shared - 127)
            v = xb * inv[:, :, None]
            s_bytes = stored.to(tl.uint8)
        else:
            # E4M3 block scale = amax * fl32(1/6) / tensor scale (IEEE division, as the reference), at most 448.
            ts = tl.load(ts_ptr)
            safe_ts = tl.where(ts == 0.0, 1.0, ts)
            bs = tl.math.div_rn(amax * (1.0 / 6.0), safe_ts)
            bs = tl.where(bs > 448.0, 448.0, bs)  # keeps a NaN, as torch's clamp does
            bs_q, byte = e4m3_rne(bs)
            scale = tl.where(finite, bs_q * ts, float("nan"))
            scale = tl.where(scale == 0.0, float("inf"), scale)  # all-zero blocks round to 0, not NaN
            v = tl.math.div_rn(xb, scale[:, :, None])
            s_bytes = byte.to(tl.uint8)
        # Round to E2M1 with ties to even by thresholds (the grid's midpoints), saturating at 6.
        mag = tl.abs(v)
        code = ((mag > 0.25).to(tl.int32) + (mag >= 0.75).to(tl.int32) + (mag > 1.25).to(tl.int32)
                + (mag >= 1.75).to(tl.int32) + (mag > 2.5).to(tl.int32) + (mag >= 3.5).to(tl.int32)
                + (mag > 5.0).to(tl.int32))
        code = code | (((v.to(tl.int32, bitcast=True) >> 31) & 1) << 3)  # the sign, -0 included
        lo, hi = tl.split(tl.reshape(code, (BLOCK_R, BLOCK_K // 2, 2)))
        packed = (lo | (hi << 4)).to(tl.uint8)
        offs_kb = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        tl.store(q_ptr + offs_r[:, None] * stride_qr + offs_kb[None, :], packed,
                 mask=mask_r & (offs_kb[None, :] < K // 2))
        offs_ks = pid_k * (BLOCK_K // VEC) + tl.arange(0, BLOCK_K // VEC)
        tl.store(s_ptr + offs_r[:, None] * stride_sr + offs_ks[None, :], s_bytes,
                 mask=mask_r & (offs_ks[None, :] < K // VEC))

else:
    _quantize_kernel = None


def tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """NVFP4's FP32 tensor scale of ``x`` by the reference's formula."""
    amax = x.float().abs().amax() if x.numel() else x.new_zeros((), dtype=torch.float32)
    return nvfp4_tensor_scale(amax)


def quantize_triton(x: torch.Tensor, format: str, kernel=None, BLOCK_R: int = 32, BLOCK_K: int = 128) -> PackedOperand:
    """:func:`pack_operand` by the Triton quantize kernel (round to nearest): the same bytes as the reference
    for finite inputs (tests/test_blackwell_aot.py checks this in Triton's interpreter); for a block with a
    NaN or inf, the same scale (E8M0 255 / a NaN tensor scale) and unspecified codes. ``kernel`` overrides the
    launched function; x [R, K] must be contiguous along K."""
    fmt = block_format(format)
    if x.dim() != 2:
        raise ValueError(f"quantize_triton takes a 2-d [rows, K] operand, got shape {tuple(x.shape)}")
    _check_k(x.shape[-1], fmt)
    if BLOCK_K % fmt.block_size or BLOCK_K % 2:
        raise ValueError(f"BLOCK_K must be a multiple of {fmt.block_size}, got {BLOCK_K}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, k = x.shape
    packed = torch.empty((rows, k // 2), dtype=torch.uint8, device=x.device)
    scales = torch.empty((rows, k // fmt.block_size), dtype=torch.uint8, device=x.device)
    ts = tensor_scale(x) if fmt.name == "nvfp4" else None
    if packed.numel():
        grid = (triton.cdiv(rows, BLOCK_R), triton.cdiv(k, BLOCK_K))
        (kernel or _quantize_kernel)[grid](
            x, packed, scales, ts, rows, k, x.stride(0), packed.stride(0), scales.stride(0),
            VEC=fmt.block_size, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K,
        )
    return PackedOperand(packed, scales.view(fmt.scale_dtype), ts, fmt.name)


# ---------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation
# ---------------------------------------------------------------------------------------------------------

# The native block-scaled FP4 MMAs: tcgen05.mma on sm_100/sm_103 (datacenter Blackwell), mma.sync on sm_120.
# Their scale-vector suffix says how many K-elements share a scale: Triton 3.6 prints "scale_vec::2X" (32,
# in a K = 64 MMA) / "scale_vec::4X" (16); later versions ".block32" / ".block16". sm_100 uses kind::mxf4
# for MXFP4 and kind::mxf4nvf4 for NVFP4; sm_120 uses kind::mxf4nvf4 for both (MXFP4 with ue8m0 scales).
_NATIVE_MMA = re.compile(
    r"^[ \t]*(?:@!?%p\d+[ \t]+)?((?:tcgen05\.mma|mma\.sync)\S*kind::(mxf4nvf4|mxf4)\.block_scale\S*)", re.M
)


def mma_block_size(instruction: str) -> int | None:
    """K-elements per scale of a block-scaled FP4 MMA opcode (32 or 16), None if it does not say."""
    if ".block16" in instruction or "scale_vec::4X" in instruction:
        return 16
    if ".block32" in instruction or "scale_vec::2X" in instruction:
        return 32
    return 32 if "kind::mxf4.block_scale" in instruction else None  # kind::mxf4's default: 2X


@dataclasses.dataclass(frozen=True)
class AOTResult:
    """What :func:`compile_for` found: the PTX, its native FP4 MMA instructions and the cubin size."""

    kernel: str  # "gemm" or "quantize"
    format: str
    target: str
    ptx: str
    mma_instructions: tuple[str, ...]  # distinct block-scaled FP4 MMA opcodes in the PTX
    mma_lines: tuple[str, ...]  # every PTX line holding one
    cubin_size: int
    block_size: int  # the format's K-elements per scale

    @property
    def native(self) -> bool:
        """True when the PTX multiplies E2M1 natively, with this format's scale block size."""
        return any(mma_block_size(op) == self.block_size for op in self.mma_instructions)


def parse_target(target: str | int) -> int:
    """"sm_100", "sm_100a", "100" or 100 -> 100, for a target the installed Triton can compile for.

    Triton passes any number on to LLVM, which aborts the process on an architecture it does not know
    ("sm_1000"), and Triton's tensor-core lowering starts at sm_80 (compiling dot_scaled for sm_75 did
    not finish in 5 minutes), so a target is checked here against the ptxas Triton uses for it."""
    m = re.fullmatch(r"(?:sm_?)?(\d+)a?", str(target).strip().lower())
    if not m:
        raise ValueError(f"target must look like 'sm_100' (a CUDA compute capability), got {target!r}")
    cc = int(m.group(1))
    known = compilable_targets()
    if known and cc not in known:
        raise ValueError(f"triton {triton.__version__} cannot compile for sm_{cc}; it can for "
                         + ", ".join(f"sm_{c}" for c in known))
    return cc


@functools.cache
def compilable_targets() -> tuple[int, ...]:
    """Capabilities from sm_80 on that the ptxas Triton picks for each (its ``--help`` lists them);
    () without triton, or when ptxas cannot be run (then every target is tried)."""
    if not HAS_TRITON:
        return ()
    from triton.backends.nvidia.compiler import get_ptxas

    known = set()
    for low, high, probe in ((80, 90, 80), (90, 10**9, 100)):  # Triton's ptxas below sm_90, and from sm_90
        try:
            text = subprocess.run([get_ptxas(probe).path, "--help"], capture_output=True, text=True,
                                  timeout=60).stdout
        except (OSError, subprocess.SubprocessError, RuntimeError):
            return ()
        known |= {int(cc) for cc in re.findall(r"'sm_(\d+)'", text) if low <= int(cc) < high}
    return tuple(sorted(known))


# The formats each kernel takes: the quantize kernel writes block formats; the vector format's codes come
# from split_vector.
KERNEL_FORMATS = {"gemm": ("mxfp4", "nvfp4", "vector"), "quantize": ("mxfp4", "nvfp4")}
KERNELS = tuple(KERNEL_FORMATS)


def _gemm_source(fmt: BlockFormat, cfg: dict):
    fn = _block_scaled_gemm_kernel
    if cfg["BLOCK_K"] % fmt.block_size or cfg["BLOCK_K"] % 64:
        raise ValueError(f"BLOCK_K must be a multiple of 64 and of the block size {fmt.block_size}, "
                         f"got {cfg['BLOCK_K']}")
    scale = "*fp32" if fmt.name == "vector" else "*u8"  # FP32 row scales, or block scale bytes
    signature = {
        "a_ptr": "*u8", "a_scale_ptr": scale, "b_ptr": "*u8", "b_scale_ptr": scale,
        "c_ptr": "*fp32", "a_ts_ptr": "*fp32", "b_ts_ptr": "*fp32",
        "M": "i32", "N": "i32", "K": "i32",
        "stride_am": "i32", "stride_asm": "i32", "stride_bn": "i32", "stride_bsn": "i32", "stride_cm": "i32",
    }
    constexprs = {"VEC": fmt.block_size, "HAS_TENSOR_SCALE": fmt.name == "nvfp4", "ROW_SCALES": fmt.name == "vector",
                  **{k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}}
    if fmt.name != "nvfp4":  # launched with None tensor scales, which Triton specializes as constants
        constexprs.update(a_ts_ptr=None, b_ts_ptr=None)
    # What the JIT infers for 16-byte aligned pointers and strides/K divisible by 16 (the common case).
    aligned = ("a_ptr", "a_scale_ptr", "b_ptr", "b_scale_ptr", "c_ptr", "K", "stride_am", "stride_asm", "stride_bn",
               "stride_bsn", "stride_cm")
    if fmt.name == "vector":  # the row scales' strides are 1
        aligned = tuple(name for name in aligned if name not in ("stride_asm", "stride_bsn"))
    return fn, signature, constexprs, aligned


def _quantize_source(fmt: BlockFormat, cfg: dict):
    fn = _quantize_kernel
    block_r, block_k = cfg.get("BLOCK_R", 32), cfg.get("BLOCK_K", 128)
    if block_k % fmt.block_size:
        raise ValueError(f"BLOCK_K must be a multiple of the block size {fmt.block_size}, got {block_k}")
    signature = {"x_ptr": "*" + cfg.get("in_dtype", "bf16"), "q_ptr": "*u8", "s_ptr": "*u8", "ts_ptr": "*fp32",
                 "R": "i32", "K": "i32", "stride_xr": "i32", "stride_qr": "i32", "stride_sr": "i32"}
    constexprs = {"VEC": fmt.block_size, "BLOCK_R": block_r, "BLOCK_K": block_k}
    if fmt.name == "mxfp4":
        constexprs["ts_ptr"] = None
    aligned = ("x_ptr", "q_ptr", "s_ptr", "K", "stride_xr", "stride_qr")
    return fn, signature, constexprs, aligned


def compile_for(target: str | int = "sm_100", format: str = "mxfp4", kernel: str = "gemm", **config) -> AOTResult:
    """Compile a kernel ("gemm" or "quantize", see KERNEL_FORMATS) for ``target`` ahead of time (no GPU
    needed) and inspect its PTX. ``config`` overrides the tile sizes (DEFAULT_CONFIG for the GEMM; BLOCK_R,
    BLOCK_K and the input dtype ``in_dtype`` ("bf16", "fp32") for the quantizer).

    Uses ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32))``.
    """
    if not HAS_TRITON:
        raise RuntimeError("ahead-of-time compilation needs triton: pip install triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cc = parse_target(target)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    get_format(format)  # unknown names: the same error as everywhere else
    if format not in KERNEL_FORMATS[kernel]:
        raise ValueError(f"the {kernel} kernel takes the formats {KERNEL_FORMATS[kernel]}, got {format!r}")
    fmt = gemm_format(format)
    cfg = {**DEFAULT_CONFIG, **config} if kernel == "gemm" else dict(config)
    fn, signature, constexprs, aligned = (_gemm_source if kernel == "gemm" else _quantize_source)(fmt, cfg)
    signature.update({k: "constexpr" for k in constexprs})
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 3)})
    ptx = compiled.asm["ptx"]
    lines = tuple(line.strip() for line in ptx.splitlines() if _NATIVE_MMA.match(line))
    ops = tuple(dict.fromkeys(m.group(1) for m in _NATIVE_MMA.finditer(ptx)))
    return AOTResult(kernel, fmt.name, f"sm_{cc}", ptx, ops, lines, len(compiled.asm["cubin"]), fmt.block_size)
