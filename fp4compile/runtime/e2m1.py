"""FP4 E2M1: the value grid, rounding to it, 4-bit codes and their storage forms.

All functions work on values already divided by their scale (the "scaled domain", |x| <= 6 after
saturation). They are plain elementwise torch ops, so Inductor fuses them into the code around them.
"""

import torch

E2M1_MAX = 6.0
# Magnitudes indexed by the 3-bit code (exponent bits, mantissa bit); bit 3 is the sign.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_SIGN_BIT = 8


def grid_step(mag: torch.Tensor) -> torch.Tensor:
    """Spacing of the E2M1 grid at magnitude ``mag`` (0.5 below 2, 1 below 4, 2 up to 6)."""
    return torch.where(mag < 2.0, 0.5, torch.where(mag < 4.0, 1.0, 2.0))


def inverse_grid_step(mag: torch.Tensor) -> torch.Tensor:
    """1 / grid_step(mag), exactly (powers of two): multiplying by it equals dividing by the step, and
    costs a multiply where a GPU's IEEE division costs several instructions."""
    return torch.where(mag < 2.0, 2.0, torch.where(mag < 4.0, 1.0, 0.5))


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round scaled values to the nearest E2M1 value, ties to even (OCP MX), saturating at +-6.

    Within each binade the grid is uniform, so ``round(|x| / step) * step`` with torch's
    round-half-to-even gives the tie to the even code: e.g. 0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4.
    NaN propagates. Computed in float32; the result is exactly representable in any float dtype.
    """
    x = x.float()
    mag = x.abs().clamp(max=E2M1_MAX)
    return torch.copysign(torch.round(mag * inverse_grid_step(mag)) * grid_step(mag), x)


def stochastic_round_to_e2m1(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round scaled values to one of their two neighbouring E2M1 values, up with probability equal to
    the distance from the lower one over the gap, so that E[result] = x for |x| <= 6 (unbiased).

    Values beyond +-6 saturate (and are then biased); absmax scaling never produces them.
    """
    x = x.float()
    mag = x.abs().clamp(max=E2M1_MAX)
    step, inv_step = grid_step(mag), inverse_grid_step(mag)
    lower = torch.floor(mag * inv_step) * step
    rand = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    up = rand < (mag - lower) * inv_step
    return torch.copysign(torch.where(up, lower + step, lower), x)


def encode_e2m1(values: torch.Tensor) -> torch.Tensor:
    """E2M1 grid values -> 4-bit codes (sign in bit 3), one code per uint8."""
    mag = values.abs()
    index = torch.where(mag < 2.0, mag * 2.0, torch.where(mag < 4.0, mag + 2.0, mag * 0.5 + 4.0))
    sign = torch.signbit(values).to(torch.uint8) * _SIGN_BIT
    return index.to(torch.uint8) | sign


def decode_e2m1(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """4-bit codes (one per uint8) -> their E2M1 values."""
    table = torch.tensor(E2M1_MAGNITUDES, dtype=dtype, device=codes.device)
    mag = table[(codes & 7).long()]
    return torch.where((codes & _SIGN_BIT) != 0, -mag, mag)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte along the last dim: element 2i in the low nibble, 2i+1 in the high nibble
    (the layout of ``torch.float4_e2m1fn_x2`` and of the FP4 GEMMs)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_e2m1 needs an even last dim, got {codes.shape[-1]}; pad it by one element")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_e2m1`."""
    packed = packed.view(torch.uint8)
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def as_float4_x2(packed: torch.Tensor) -> torch.Tensor:
    """View packed bytes as ``torch.float4_e2m1fn_x2``; needs a torch build that has that dtype."""
    if not hasattr(torch, "float4_e2m1fn_x2"):
        raise RuntimeError("this torch build has no torch.float4_e2m1fn_x2; use the uint8 packed form")
    return packed.view(torch.float4_e2m1fn_x2)


def to_fp8_container(values: torch.Tensor) -> torch.Tensor:
    """E2M1 values stored in ``float8_e4m3fn``; exact, since every E2M1 value is an E4M3 value."""
    return values.to(torch.float8_e4m3fn)
