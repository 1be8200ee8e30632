"""FP8 quantization of gradients for the backward GEMMs (the paper keeps dY in FP8, never FP4)."""

import torch

from fp4compile.runtime import hopper
from fp4compile.runtime.quantize import abs_max, floored, poison, reciprocal

FP8_DTYPES = {"float8_e5m2": torch.float8_e5m2, "float8_e4m3fn": torch.float8_e4m3fn}


def get_fp8_dtype(name: str) -> torch.dtype:
    try:
        return FP8_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown FP8 gradient dtype {name!r}; choose one of {sorted(FP8_DTYPES)} or None") from None


def quantize_fp8_rows(x: torch.Tensor, dtype: torch.dtype):
    """Absmax-scale each row (last dim) of ``x`` onto ``dtype``'s range and cast (round to nearest even).

    The scale is amax * fl32(1 / max) rather than amax / max, as in quantize.py: identical on every device;
    at least 2^-126 (``quantize.MIN_SCALE``), and the data is x * fl32(1 / scale), as in quantize.py.
    Returns (FP8 data, FP32 scale of shape [..., 1]); data * scale approximates x. A zero row gets scale 0
    and zero data (so does every row of an empty dim: no tokens); a row holding NaN or inf gets a NaN scale.
    """
    amax = abs_max(x.float(), (-1,))
    scale = poison(floored(amax * (1.0 / torch.finfo(dtype).max)), amax)
    data = (x.float() * reciprocal(scale)).to(dtype)
    return data, scale


def has_fp8_kernels(device: torch.device) -> bool:
    """Whether ``device`` runs the Triton quantize kernels: FP8 tensor cores, and Triton casts to E4M3 (sm_89+)."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return hopper.device_reason(device.type, capability) is None


def _as_vector(fold: torch.Tensor, size) -> torch.Tensor:
    return fold.float().reshape(-1).expand(size).contiguous()


def grad_operands(dy, fold_dx, fold_dw, dtype: torch.dtype, need_dx: bool = True, need_dw: bool = True):
    """dY [..., M, N]'s FP8 operands for the gradient GEMMs of Y = A @ B^T, each (data, scale) or None
    where not needed: for dA = dY @ B, (dY * fold_dx) quantized per row, [..., M, N]; for dB = dY^T @ A,
    (dY^T * fold_dw) quantized per row, [..., N, M]. The folds are the other operand's per-row scales as
    columns ([..., 1, N] and [..., 1, M]) or 0-d. On CUDA sm_89+ (FP8 tensor cores; Triton casts to E4M3
    from sm_89 on), a 2-D dY needing both goes through one Triton kernel pair that computes the same bits
    and writes the dB operand row-major, as _scaled_mm takes it (kernels/fp8_grad_triton.py)."""
    if need_dx and need_dw and dy.dim() == 2 and dy.numel() and has_fp8_kernels(dy.device):
        from fp4compile.runtime.kernels.fp8_grad_triton import fp8_grad_operands

        m, n = dy.shape
        dx, dx_scale, dw, dw_scale = fp8_grad_operands(dy, _as_vector(fold_dx, n), _as_vector(fold_dw, m), dtype)
        return (dx, dx_scale), (dw, dw_scale)
    return (quantize_fp8_rows(dy.float() * fold_dx, dtype) if need_dx else None,
            quantize_fp8_rows(dy.mT.float() * fold_dw, dtype) if need_dw else None)
