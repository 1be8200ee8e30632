"""FP8 quantization of gradients for the backward GEMMs (the paper keeps dY in FP8, never FP4)."""

import torch

from fp4compile.runtime.quantize import floored, poison, reciprocal

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
    and zero data; a row holding NaN or inf gets a NaN scale.
    """
    amax = x.float().abs().amax(dim=-1, keepdim=True)
    scale = poison(floored(amax * (1.0 / torch.finfo(dtype).max)), amax)
    data = (x.float() * reciprocal(scale)).to(dtype)
    return data, scale
