"""scaled_gemm on FP8 tensor cores (sm_89+, built for Hopper's sm_90) through ``torch._scaled_mm``.

E2M1 values (and MXFP4 values with their block scales folded in, see quantize.gemm_operand) are exact in
float8_e4m3fn and the gradient is already FP8 (e5m2 or e4m3), so an FP8 GEMM multiplies the very operands
the emulation multiplies. Rowwise scaling (scale_a [M, 1], scale_b [1, N]) applies the per-row scales
after the product, as ``gemm.emulated`` does; the output is rounded once to the caller's dtype (BF16 for
a BF16 model) and ``use_fast_accum=False`` keeps the FP32 accumulation ``scaled_gemm`` promises. On Hopper
(tests/test_hopper.py): the forward (E2M1 x E2M1: terms are multiples of 1/4 below 36) equals the
emulation up to the two scale multiplies; the backward (e5m2 x E2M1) differs by up to ~2^-16 of
sum |a||b|, as Hopper's FP8 MMA adds products in reduced precision before each FP32 promotion.

Fallbacks (each reason is what ``eligible`` returns): non-CUDA or pre-sm_89 devices, operands that are
not FP8 (NVFP4 carries its E4M3 block scales inside K as float32), two e5m2 operands (cuBLASLt
needs an e4m3 one), a batched b (``_scaled_mm`` takes 2-D matrices; a 2-D b is handled by flattening a's
leading dims, a batched b falls back rather than unrolling a per-batch loop into the graph), K or N not
a multiple of 16, and operands whose storage offset is not 16-byte aligned.
"""

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
MIN_CAPABILITY = (8, 9)
ALIGN = 16  # _scaled_mm: K and N multiples of 16; cuBLASLt: 16-byte aligned operand pointers


def device_reason(device_type: str, capability: tuple[int, int] | None) -> str | None:
    """Why a device cannot take the FP8 path, or None if it can."""
    if device_type != "cuda":
        return f"device {device_type!r} has no FP8 tensor cores (CUDA sm_89+ needed)"
    if capability is None or tuple(capability) < MIN_CAPABILITY:
        return f"CUDA capability {capability} < sm_89: no FP8 tensor cores"
    return None


def format_reason(format: str) -> str | None:
    """Why an FP4 format cannot take the FP8 path: NVFP4's E4M3 block scales times E2M1 values need more
    bits than FP8 has (MXFP4's power-of-two block scales fold into the FP8 values)."""
    if format in ("vector", "tensor", "mxfp4"):
        return None
    return f"format {format!r}: E2M1 values times E4M3 block scales are not FP8 numbers"


def shape_reason(m, n, k) -> str | None:
    """Why an [M, K] x [N, K] GEMM breaks _scaled_mm's size rules (M is free), or None."""
    if k % ALIGN:
        return f"K={k} is not a multiple of {ALIGN} (torch._scaled_mm needs it)"
    if n % ALIGN:
        return f"N={n} is not a multiple of {ALIGN} (torch._scaled_mm needs it)"
    return None


def operands_reason(a_dtype: torch.dtype, b_dtype: torch.dtype, a_shape, b_shape) -> str | None:
    """Why operands a [..., M, K], b [N, K] of these dtypes and shapes cannot go to _scaled_mm, or None."""
    if a_dtype not in FP8_DTYPES or b_dtype not in FP8_DTYPES:
        return f"{a_dtype} x {b_dtype} operands are not both FP8 (NVFP4 arrives as float32)"
    if a_dtype == b_dtype == torch.float8_e5m2:
        return "two float8_e5m2 operands (cuBLASLt needs at least one float8_e4m3fn)"
    if len(a_shape) < 2 or len(b_shape) != 2:
        return (f"operand ranks {len(a_shape)} and {len(b_shape)}: _scaled_mm needs a 2-D b "
                "(a batched b falls back)")
    return shape_reason(a_shape[-2], b_shape[-2], a_shape[-1])


def alignment_reason(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """Why the operands' storage is not 16-byte aligned for cuBLASLt, or None."""
    for name, t in (("a", a), ("b", b)):
        if t.storage_offset() * t.element_size() % ALIGN:
            return f"operand {name} starts {t.storage_offset()} elements into its storage: not {ALIGN}-byte aligned"
    return None


def operand_reason(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """Why operands a [..., M, K], b [N, K] cannot go to _scaled_mm (dtype, rank, size, alignment)."""
    return operands_reason(a.dtype, b.dtype, a.shape, b.shape) or alignment_reason(a, b)


def eligible(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, str | None]:
    """(True, None) if ``scaled_gemm`` runs a [..., M, K] x b [N, K] here on FP8 tensor cores, else (False,
    why not): ``gemm.plan``'s answer for these tensors."""
    from fp4compile.runtime.gemm import tensor_plan

    path, reason = tensor_plan(a, b)
    return path == "hopper_fp8", reason


def _rowwise(scale: torch.Tensor, rows) -> torch.Tensor:
    """A per-row [..., rows, 1] or 0-d scale as the contiguous FP32 (rows, 1) that _scaled_mm takes."""
    return scale.float().reshape(-1, 1).expand(rows, 1).contiguous()


def row_major(t: torch.Tensor) -> torch.Tensor:
    """2-D ``t`` as a contiguous (row-major) tensor. The saved FP4 operand of each backward GEMM arrives
    transposed (a view), as does dW's FP8 gradient where fp8.grad_operands takes the reference path: on
    CUDA a tiled kernel writes the transpose, as Inductor would fuse a plain copy into the producer as
    uncoalesced stores (kernels/transpose_triton.py says how slow)."""
    if t.is_contiguous():
        return t
    if t.is_cuda and t.element_size() == 1 and t.mT.is_contiguous():
        from fp4compile.runtime.kernels.transpose_triton import transpose_bytes

        return transpose_bytes(t.mT)
    return t.contiguous()


def scaled_gemm(a, a_scale, b, b_scale, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(a @ b^T) * a_scale * b_scale^T in ``out_dtype`` on FP8 tensor cores; the caller checked ``eligible``."""
    k, n = a.shape[-1], b.shape[-2]
    a2 = row_major(a.reshape(-1, k))  # A row-major
    out = torch._scaled_mm(
        a2,
        row_major(b).t(),  # B column-major
        _rowwise(a_scale, a2.shape[0]),
        _rowwise(b_scale, n).t(),
        out_dtype=out_dtype,
        use_fast_accum=False,
    )
    return out.reshape(*a.shape[:-1], n)


# torch._scaled_grouped_mm's CUDA kernel runs on these capabilities only (torch 2.11's GroupedBlas.cpp).
GROUPED_CAPABILITIES = ((9, 0), (10, 0))


def grouped_device_reason(device_type: str, capability, out_dtype: torch.dtype, n, k) -> str | None:
    """Why an [S, K] x [E, N, K] grouped GEMM with ``out_dtype`` output cannot run through
    torch._scaled_grouped_mm on a device of ``capability``, or None (pure: the report calls it too)."""
    if device_type != "cuda" or capability is None or tuple(capability) not in GROUPED_CAPABILITIES:
        where = f"{device_type} {capability or ''}".rstrip()
        return f"torch._scaled_grouped_mm runs on CUDA sm_90 and sm_100 only, not {where}"
    if out_dtype != torch.bfloat16:
        return f"{out_dtype} output: torch._scaled_grouped_mm returns bfloat16 only"
    return shape_reason(None, n, k)


def grouped_reason(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> str | None:
    """Why a [S, K] x b [E, N, K] (row groups) cannot go to torch._scaled_grouped_mm, or None."""
    if a.dtype != torch.float8_e4m3fn or b.dtype != torch.float8_e4m3fn:
        return f"{a.dtype} x {b.dtype} operands: torch._scaled_grouped_mm takes float8_e4m3fn only"
    capability = torch.cuda.get_device_capability(a.device) if a.is_cuda else None
    return grouped_device_reason(a.device.type, capability, out_dtype, b.shape[-2], a.shape[-1])


def _scales_as(scale: torch.Tensor, shape) -> torch.Tensor:
    """A per-row scale (trailing dim 1) or 0-d scale as the contiguous FP32 ``shape`` the kernel takes."""
    return scale.float().reshape(shape if scale.dim() else ()).expand(shape).contiguous()


def scaled_grouped_gemm(a, a_scale, b, b_scale, offs) -> torch.Tensor:
    """(a[s] @ b[e(s)]^T) * a_scale[s] * b_scale[e(s)]^T in BF16 on FP8 tensor cores, for the rows s of
    group e; a [S, K] with an [S, 1] or 0-d scale, b [E, N, K] with an [E, N, 1] or 0-d scale. The
    caller checked ``grouped_reason``. A is row-major, B column-major, as the kernel takes them."""
    s, (e, n) = a.shape[0], b.shape[:2]
    return torch._scaled_grouped_mm(
        a.contiguous(),
        b.contiguous().mT,
        _scales_as(a_scale, (s,)),
        _scales_as(b_scale, (e, n)),
        offs=offs,
        out_dtype=torch.bfloat16,
        use_fast_accum=False,
    )
