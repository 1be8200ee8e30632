"""The FP4 scaling formats and the checks every quantizer entry point applies to its input."""

from dataclasses import dataclass

import torch

E4M3_MAX = 448.0


@dataclass(frozen=True)
class Format:
    """How a tensor is cut into scaling groups along its reduction dim.

    ``block_size`` None means one group spans the whole dim ("vector") or the whole tensor ("tensor").
    """

    name: str
    block_size: int | None
    scale_dtype: torch.dtype
    doc: str


FORMATS = {
    f.name: f
    for f in (
        Format("tensor", None, torch.float32, "one FP32 scale amax/6 for the whole tensor"),
        Format("vector", None, torch.float32, "one FP32 scale amax/6 per vector along dim (the paper's)"),
        Format("mxfp4", 32, torch.uint8, "blocks of 32 along dim, E8M0 power-of-two scales (OCP MX v1.0)"),
        Format("nvfp4", 16, torch.float8_e4m3fn, "blocks of 16 along dim, E4M3 scales and one FP32 tensor scale"),
    )
}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown FP4 format {name!r}; choose one of {sorted(FORMATS)}") from None


def check_input(x: torch.Tensor, fmt: Format, dim: int) -> int:
    """Validate ``x`` for quantization in ``fmt`` along ``dim``; return ``dim`` made non-negative."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.element_size() < 2:
        raise TypeError(
            f"FP4 quantization needs a float32, bfloat16, float16 or float64 tensor, got {x.dtype}; "
            "convert it first, e.g. x.float()"
        )
    ndim = max(x.dim(), 1)
    if not -ndim <= dim < ndim:
        raise IndexError(f"dim {dim} is out of range for a tensor of {x.dim()} dims; use -{ndim}..{ndim - 1}")
    dim %= ndim
    if fmt.block_size is not None:
        if x.dim() == 0:
            raise ValueError(f"format {fmt.name!r} needs at least one dim to block along, got a 0-d tensor")
        n = x.shape[dim]
        if n % fmt.block_size != 0:
            raise ValueError(
                f"format {fmt.name!r} quantizes blocks of {fmt.block_size} along dim {dim}, whose size {n} is "
                f"not a multiple of {fmt.block_size}; pad dim {dim} to a multiple of {fmt.block_size} "
                "or use format='vector'"
            )
    return dim
