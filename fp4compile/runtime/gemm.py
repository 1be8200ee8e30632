"""GEMM dispatch: one scaled GEMM primitive for the forward and both backward GEMMs, per device.

    scaled_gemm(a, a_scale, b, b_scale, out_dtype) = (a @ b^T) * a_scale * b_scale^T,   FP32 accumulation

with a [..., M, K], b [..., N, K] and per-row scales ([..., M, 1], [..., N, 1]) or 0-d scales, rounded
once to ``out_dtype``. Operands stored in an FP8 dtype (E2M1 values, folded MXFP4 values, gradients in
float8_e5m2 or e4m3) are exact FP8 numbers, so an FP8 tensor-core GEMM multiplies them exactly. NVFP4
operands (E2M1 values times E4M3 block scales) arrive in BF16, which holds them exactly, as does it every
FP8 value: a BF16 tensor-core GEMM with FP32 output multiplies any mix of them exactly. Float32 operands
take the emulation. Every implementation must agree with ``emulated``.

The paths, by device (``plan`` answers for any device without running anything):

    device          vector / tensor / mxfp4       nvfp4
    sm_100+         forward: blackwell_fp4 (mxfp4, nvfp4: native block-scaled FP4 MMA); else hopper_fp8;
                    the unbiased recipes' NVFP4 backward GEMMs too (``nvfp4_gemm``)
    sm_89, sm_90    hopper_fp8                    bf16_exact
    sm_80           bf16_exact                    bf16_exact
    CPU, older GPU  emulated                      emulated
"""

import torch

from fp4compile.runtime import hopper

BLOCK_FORMATS = ("mxfp4", "nvfp4")
BLACKWELL = (10, 0)
BF16_MIN_CAPABILITY = (8, 0)  # BF16 tensor cores; torch.mm(..., out_dtype=torch.float32) on CUDA
BF16_EXACT = (torch.bfloat16, *hopper.FP8_DTYPES)  # dtypes whose every value BF16 holds


def row_scale_as_columns(scale: torch.Tensor) -> torch.Tensor:
    """A per-row scale [..., N, 1] turned to broadcast over the columns of an [..., M, N] product."""
    return scale.mT if scale.dim() >= 2 else scale


def emulated(a, a_scale, b, b_scale) -> torch.Tensor:
    """The exact emulation: an FP32 GEMM of the (upcast) operands, scales applied after. Runs anywhere."""
    return torch.matmul(a.float(), b.float().mT) * a_scale * row_scale_as_columns(b_scale)


def bf16_reason(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """Why a [..., M, K] x b [..., N, K] does not run as an exact BF16 GEMM with FP32 output, or None."""
    if a.device.type != "cuda" or torch.cuda.get_device_capability(a.device) < BF16_MIN_CAPABILITY:
        return f"device {a.device} has no BF16 GEMM with FP32 output (CUDA sm_80+)"
    if a.dtype not in BF16_EXACT or b.dtype not in BF16_EXACT:
        return f"{a.dtype} x {b.dtype} operands are not all exact in BF16"
    if not (b.dim() == 2 or a.dim() == b.dim() == 3 and a.shape[0] == b.shape[0]):
        return f"operand shapes {tuple(a.shape)} x {tuple(b.shape)}: neither a 2-D b nor one batch dim"
    return None


def bf16_gemm(a, a_scale, b, b_scale, out_dtype: torch.dtype) -> torch.Tensor:
    """The exact BF16 path (``bf16_reason`` said yes): FP8 operands upcast to BF16 exactly, FP32 output."""
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    if b.dim() == 2:
        y = torch.mm(a16.reshape(-1, a.shape[-1]), b16.mT, out_dtype=torch.float32).reshape(*a.shape[:-1], -1)
    else:
        y = torch.bmm(a16, b16.mT, out_dtype=torch.float32)
    return (y * a_scale * row_scale_as_columns(b_scale)).to(out_dtype)


def scaled_gemm(a, a_scale, b, b_scale, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., M, K] x [..., N, K] -> [..., M, N] in ``out_dtype``, on the fastest exact path for the device."""
    if a.device.type == "cuda":
        if hopper.eligible(a, b)[0]:
            return hopper.scaled_gemm(a, a_scale, b, b_scale, out_dtype)
        if bf16_reason(a, b) is None:
            return bf16_gemm(a, a_scale, b, b_scale, out_dtype)
    return emulated(a, a_scale, b, b_scale).to(out_dtype)


def _capability(device: torch.device):
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def native_block_reason(device_type: str, capability, format: str) -> str | None:
    """Why a forward GEMM of ``format`` does not run as a native block-scaled FP4 GEMM (None: it does)."""
    if format not in BLOCK_FORMATS:
        return f"format {format!r} has no block scales for a block-scaled MMA"
    if device_type != "cuda" or capability is None or tuple(capability) < BLACKWELL:
        return f"no native FP4 tensor cores on {device_type} {capability or ''}".rstrip()
    from fp4compile.runtime.kernels import blackwell

    if not blackwell.HAS_TRITON:
        return "triton is not installed"
    return None


def native_block_gemm(a: torch.Tensor, b: torch.Tensor, format: str, out_dtype: torch.dtype):
    """Q(a) @ Q(b)^T for a block format on sm_100+, or None where ``native_block_reason`` says no."""
    if native_block_reason(a.device.type, _capability(a.device), format) is not None:
        return None
    from fp4compile.runtime.kernels import blackwell

    return blackwell.block_scaled_matmul(a, b, format, out_dtype, quantizer="triton" if a.is_cuda else "reference")


def nvfp4_gemm(a, a_scale, b, b_scale, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scaled_gemm`` of NVFP4 operands (E2M1 values times E4M3 block scales in BF16, 0-d FP32 tensor
    scales) with a 2-D ``b``: on sm_100+ the native block-scaled FP4 MMA on their codes and scales
    (``blackwell.split_nvfp4`` recovers them exactly), elsewhere ``scaled_gemm``."""
    if b.dim() != 2 or native_block_reason(a.device.type, _capability(a.device), "nvfp4") is not None:
        return scaled_gemm(a, a_scale, b, b_scale, out_dtype)
    from fp4compile.runtime.kernels import blackwell

    (pa, sa), (pb, sb) = blackwell.split_nvfp4(a.reshape(-1, a.shape[-1])), blackwell.split_nvfp4(b)
    y = blackwell.block_scaled_mm(pa, sa, pb, sb, a_scale.float(), b_scale.float(), "nvfp4", out_dtype)
    return y.reshape(*a.shape[:-1], b.shape[0])


def plan(device_type: str, capability, format: str, m, n, k) -> tuple[str, str | None]:
    """(path, why not faster) of a forward GEMM [M, K] x [N, K] in ``format`` on a device of
    ``capability`` ((major, minor) or None): "blackwell_fp4", "hopper_fp8", "bf16_exact" (NVFP4's BF16
    operands, or FP8 ones whose shapes _scaled_mm refuses) or "emulated". Pure, so a compile-time report
    can call it for any device; the runtime decides the same from its tensors."""
    if native_block_reason(device_type, capability, format) is None:
        return "blackwell_fp4", None
    reason = hopper.device_reason(device_type, capability) or hopper.format_reason(format)
    reason = reason or hopper.shape_reason(m, n, k)
    if reason is None:
        return "hopper_fp8", None
    if device_type == "cuda" and capability is not None and tuple(capability) >= BF16_MIN_CAPABILITY:
        return "bf16_exact", reason
    return "emulated", reason
