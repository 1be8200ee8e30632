"""Blackwell (sm_100) native FP4: the block formats, the GEMM's operands and the Triton quantize kernel.

- Formats: :data:`BLOCK_FORMATS` (MXFP4, NVFP4) and :data:`VECTOR`, the "vector" format as the GEMM kernel
  multiplies it.
- Operands in the layout of blackwell.py's GEMM (packed E2M1 codes and block scales along K, see its module
  doc): :func:`pack_operand` quantizes ``x`` [R, K] along K; :func:`transposed_tiles` turns a 16x16-tiled
  weight's operand into its transpose's; :func:`split_vector` recovers the codes from the values the
  vector quantizer writes; :func:`unpack_operand` decodes.
- The Triton quantize kernel (:func:`quantize_triton`): the reference quantizer's bytes for finite inputs.
"""

from __future__ import annotations

import dataclasses

import torch

from fp4compile.runtime import e2m1
from fp4compile.runtime.formats import get_format
from fp4compile.runtime.quantize import QuantizedTensor, _fold_mx_rows, nvfp4_tensor_scale, poison, quantize

try:
    import triton
    import triton.language as tl

    from fp4compile.runtime.kernels.triton_quantize import e2m1_code, e4m3_rne, pack_codes

    HAS_TRITON = True
except ImportError:  # the CPU emulation and the shape checks still work
    triton = tl = None
    HAS_TRITON = False


@dataclasses.dataclass(frozen=True)
class BlockFormat:
    name: str
    block_size: int  # elements of K per scale
    scale_dtype: torch.dtype  # the kernel reads the scale bytes as uint8 and bitcasts E4M3 ones itself


BLOCK_FORMATS = {
    "mxfp4": BlockFormat("mxfp4", 32, torch.uint8),
    "nvfp4": BlockFormat("nvfp4", 16, torch.float8_e4m3fn),
}
# "vector" in the GEMM kernel: MXFP4's MMA with unit block scales (made in the kernel, so block_size is the
# MMA's 32 and not a constraint on K), and FP32 per-row scales of A and B.
VECTOR = BlockFormat("vector", 32, torch.float32)


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


def transposed_tiles(op: PackedOperand) -> PackedOperand:
    """W^T's operand from W's, for a W [N, K] quantized in 16x16 tiles (``quantize.tiles_quantized``), whose
    tiles are W^T's transposed: the codes transposed, and each tile's scale (repeated on its 16 rows)
    taken once and repeated on the rows of W^T [K, N]. Data movement only: the same values, exactly."""
    codes = e2m1.unpack_e2m1(op.packed).mT.contiguous()
    scales = op.scales.view(torch.uint8)[::16].mT.repeat_interleave(16, 0)
    return PackedOperand(e2m1.pack_e2m1(codes), scales.view(op.scales.dtype), op.tensor_scale, op.format)


def unpack_operand(op: PackedOperand) -> torch.Tensor:
    """Decode a packed operand to FP32 values times block scales (the tensor scale left out)."""
    fmt = block_format(op.format)
    values = e2m1.decode_e2m1(e2m1.unpack_e2m1(op.packed))
    scale = _mx_scale(op.scales) if fmt.name == "mxfp4" else op.scales.float()
    return values * scale.repeat_interleave(fmt.block_size, dim=-1)


def _mx_scale(scales: torch.Tensor) -> torch.Tensor:
    """E8M0 scale bytes as FP32 powers of two (255: NaN)."""
    s = scales.view(torch.uint8).float()
    return torch.where(s == 255, torch.nan, torch.exp2(s - 127))


def gemm_values(op: PackedOperand) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize.gemm_operand``'s (values, outer) of the tensor ``op`` was packed from, decoded from the
    codes and scales (the same bits as quantizing it again): what the backward's GEMMs take, from the one
    quantize of a forward operand that the native kernel reads."""
    fmt = block_format(op.format)
    values = e2m1.decode_e2m1(e2m1.unpack_e2m1(op.packed)).unflatten(-1, (-1, fmt.block_size))
    if fmt.name == "mxfp4":
        folded, outer = _fold_mx_rows(values, _mx_scale(op.scales)[..., None])
        return folded.flatten(-2), outer.reshape(-1, 1)
    return (values * op.scales.float()[..., None]).flatten(-2).to(torch.bfloat16), op.tensor_scale


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
        packed = pack_codes(e2m1_code(tl.reshape(v, (BLOCK_R, BLOCK_K))), BLOCK_R, BLOCK_K)
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
