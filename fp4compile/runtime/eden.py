"""MS-EDEN (Quartet II, method.md "Unbiased NVFP4 training"): an unbiased NVFP4 quantizer for the backward
GEMMs of rotated operands, with round-to-nearest's low error on the values.

Along the last dim of x (already rotated by a randomized Hadamard transform in groups of ``group``):
1. NVFP4 scales with headroom, as the authors' code sets them: a 16-block's amax maps to
   6 / ((17/16) * 0.93) (slightly above 6: the largest value saturates to 6), and the FP32 tensor scale
   maps the tensor's amax to a block scale of 255.99 instead of 448, leaving E4M3 room for step 3.
   Constant divisors are multiplies by their FP32 reciprocal (as in quantize.py), so CPU, CUDA and the
   Triton kernel (kernels/rotate_quantize.py) compute the same scales.
2. Values rounded to nearest E2M1 in the scaled domain.
3. Per rotation group, the EDEN correction c = <x, x> / <x, Q(x)> (both in the scaled domain) multiplies
   the group's block scales, and each corrected scale is rounded stochastically to one of its two
   neighbouring E4M3 values (probabilities linear in the distance), so the expectation keeps c exactly.

``ms_eden_quantized`` returns the values, block scales and tensor scale; ``ms_eden_operand`` what an
NVFP4 GEMM multiplies (values times block scales, and the tensor scale); ``ms_eden`` their product in FP32.
"""

import torch

from fp4compile.runtime.e2m1 import round_to_e2m1
from fp4compile.runtime.formats import E4M3_MAX
from fp4compile.runtime.quantize import QuantizedTensor, abs_max, exact_div, nvfp4_operand

BLOCK = 16
SCALE_OVERRIDE = (17 / 16) * 0.93
BLOCK_SCALE_TOP = 255.99  # the tensor's largest block scale, below E4M3's 448


def _e4m3_neighbours(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up): the E4M3 values with down <= s <= up, adjacent in E4M3 (s > 0, finite, < 448)."""
    nearest = s.to(torch.float8_e4m3fn)
    bits = nearest.view(torch.uint8)
    below = nearest.float() > s
    step = lambda b: b.view(torch.float8_e4m3fn).float()  # noqa: E731
    down = torch.where(below, step(bits - 1), nearest.float())
    up = torch.where(below, nearest.float(), step(bits + 1))
    return down, up


def stochastic_e4m3(s: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """s (positive FP32, below 448) rounded to a neighbouring E4M3 value, up with probability
    (s - down) / (up - down): E[result] = s."""
    down, up = _e4m3_neighbours(s)
    p_up = torch.where(up > down, exact_div(s - down, up - down), 0.0)
    rand = torch.rand(s.shape, generator=generator, device=s.device)
    return torch.where(rand < p_up, up, down)


def tensor_scale(amax: torch.Tensor) -> torch.Tensor:
    """MS-EDEN's FP32 tensor scale: maps the tensor's amax to a block scale of BLOCK_SCALE_TOP, defined as
    a multiply by fl32(1 / (BLOCK_SCALE_TOP * 6 / SCALE_OVERRIDE)) so every device computes the same bits."""
    return torch.where(amax > 0, amax * (SCALE_OVERRIDE / (BLOCK_SCALE_TOP * 6.0)), 1.0)


def ms_eden_quantized(x: torch.Tensor, group: int = 128, generator: torch.Generator | None = None) -> QuantizedTensor:
    """MS-EDEN quantization of x along its last dim (size a multiple of ``group``, a multiple of 16): E2M1
    values, their corrected E4M3 block scales and the FP32 tensor scale."""
    if group % BLOCK or x.shape[-1] % group:
        raise ValueError(f"ms_eden needs the last dim ({x.shape[-1]}) to be a multiple of the rotation group "
                         f"({group}), itself a multiple of {BLOCK}")
    xb = x.float().unflatten(-1, (-1, BLOCK))  # [..., blocks, 16]
    ts = tensor_scale(abs_max(x.float()))
    block = exact_div(xb.abs().amax(-1, keepdim=True) * (SCALE_OVERRIDE / 6.0), ts).to(torch.float8_e4m3fn).float()
    block = torch.where(block == 0, 1.0, block)  # an all-zero block: any scale, values are 0
    scaled = exact_div(xb, block * ts)
    values = round_to_e2m1(scaled)
    per_group = group // BLOCK
    grouped = lambda t: t.unflatten(-2, (-1, per_group))  # noqa: E731  [..., groups, blocks per group, 16]
    num = grouped(scaled * scaled).sum((-2, -1), keepdim=True)
    den = grouped(scaled * values).sum((-2, -1), keepdim=True)
    correction = torch.where(den == 0, 1.0, exact_div(num, den))
    corrected = (grouped(block) * correction).clamp(max=E4M3_MAX).flatten(-3, -2)
    scales = stochastic_e4m3(corrected, generator)
    return QuantizedTensor(values.flatten(-2).to(torch.float8_e4m3fn), scales.squeeze(-1).to(torch.float8_e4m3fn),
                           "nvfp4", x.dim() - 1, x.dtype, ts)


def ms_eden_operand(x: torch.Tensor, group: int = 128, generator: torch.Generator | None = None):
    """:func:`ms_eden_quantized` as a GEMM operand: (E2M1 values times their corrected E4M3 block scales,
    exact in BF16; FP32 tensor scale)."""
    return nvfp4_operand(ms_eden_quantized(x, group, generator))


def ms_eden(x: torch.Tensor, group: int = 128, generator: torch.Generator | None = None) -> torch.Tensor:
    """MS-EDEN fake quantization of x along its last dim: the dequantized values, in FP32."""
    values, ts = ms_eden_operand(x, group, generator)
    return values.float() * ts
