"""The reference FP4 quantizer: scales per format, rounding to E2M1, and the QuantizedTensor it returns.

This is the ground truth every kernel is tested against. It is written in plain torch ops, so it runs on
any device and Inductor fuses it into the code around a matmul.

Special values: a NaN or +-inf anywhere in a scaling group makes that group's scale NaN, so the whole
group dequantizes to NaN (the OCP MX convention: a NaN shared scale). An all-zero group gets scale 0 and
dequantizes to exact zeros (never NaN). Empty tensors give empty results.

Scaled values are x * fl32(1 / s) (one IEEE division per group, a multiply per element) for "vector",
"tensor" and "mxfp4", and x / s for "nvfp4", whose scale has no floor (see ``to_scaled_domain``). Every
division is ``exact_div``, so generated GPU code rounds it as eager PyTorch does.
"""

from dataclasses import dataclass

import torch

from fp4compile.runtime import e2m1
from fp4compile.runtime.formats import E4M3_MAX, Format, check_input, get_format

_E8M0_BIAS = 127
_E2M1_EMAX = 2  # exponent of E2M1's largest binade: 6 = 1.5 * 2**2


def _blocked(x: torch.Tensor, fmt: Format, dim: int) -> torch.Tensor:
    """x in float32 with ``dim`` moved last and cut into groups: [..., groups, group_size]."""
    x = x.float().movedim(dim, -1) if x.dim() else x.float().reshape(1)
    if fmt.name == "tensor":
        return x.reshape(1, -1)
    block = fmt.block_size or x.shape[-1]
    return x.unflatten(-1, (x.shape[-1] // block if block else 1, block))


def abs_max(x: torch.Tensor, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """max |x| over ``dims``, kept as size-1 dims (over all dims if None: 0-d). Every scale is computed
    from it. A reduction over no entries (an empty tensor: no tokens in a batch) gives 0, where torch's
    amax raises for want of an identity. Under torch.compile a zero size is static (Dynamo specializes
    sizes 0 and 1, so a symbolic size is at least 2): the branch is decided at trace time, free at run time."""
    if x.numel() == 0:
        if dims is None:
            return x.new_zeros(())
        return x.new_zeros([1 if d in dims or d - x.dim() in dims else s for d, s in enumerate(x.shape)])
    return x.abs().amax() if dims is None else x.abs().amax(dim=dims, keepdim=True)


def poison(scale: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """NaN scale for groups that hold a NaN or an inf, so those groups dequantize to NaN.

    The NaN is amax - amax (inf - inf, or NaN) and not a NaN constant: a traced NaN constant never
    equals itself, which defeats AOTAutograd's CSE, so sites sharing an input (q/k/v, gate/up) would
    each quantize it and save their own copy for the backward."""
    return torch.where(torch.isfinite(amax), scale, amax - amax)


# Smallest "vector"/"tensor" scale: float32's smallest normal, so that 1 / scale is finite. It changes
# only groups whose amax is below 6 * 2^-126 (about 7e-38).
MIN_SCALE = 2.0**-126


def floored(scale: torch.Tensor) -> torch.Tensor:
    """A positive ``scale`` raised to at least MIN_SCALE; 0 and NaN kept."""
    return torch.where(scale > 0, scale.clamp(min=MIN_SCALE), scale)


def exact_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b for float32 operands, IEEE-rounded in every backend without any compiler option: computed in
    float64 and rounded to float32. Triton's float32 ``/`` in Inductor's code is approximate
    (div.full.f32), its float64 one exact (div.rn.f64), and 53 >= 2 * 24 + 2 bits make the double
    rounding innocuous, so the result is the correctly rounded float32 quotient everywhere."""
    return (a.double() / b.double()).float()


def reciprocal(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale per group, for quantizers to multiply every element by: an exact division costs several
    instructions, this one per group. A zero scale (an all-zero group) gives 0, so its values round to
    +-0; a NaN scale gives NaN."""
    return exact_div(scale.new_ones(()), torch.where(scale == 0, torch.inf, scale))


def _over(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """x / divisor for a constant divisor, defined as x * fl32(1 / divisor): CUDA (eager and Inductor)
    divides by a constant that way, so the scales are bit-identical on every device."""
    return x * (1.0 / divisor)


def nvfp4_tensor_scale(tensor_amax: torch.Tensor) -> torch.Tensor:
    """NVFP4's FP32 tensor scale: maps the tensor's amax onto E4M3's range of block scales (NaN if not finite)."""
    return poison(_over(tensor_amax, e2m1.E2M1_MAX * E4M3_MAX), tensor_amax)


def _scales(xb: torch.Tensor, fmt: Format):
    """Per-group scales for blocked ``xb``: (effective FP32 scale, stored scale, FP32 tensor scale or None)."""
    amax = abs_max(xb, (-1,))
    if fmt.name in ("tensor", "vector"):
        scale = poison(floored(_over(amax, e2m1.E2M1_MAX)), amax)
        return scale, scale, None
    if fmt.name == "mxfp4":
        # OCP MX v1.0: shared exponent = floor(log2(amax)) - emax(E2M1), clamped to E8M0's range.
        _, exp = torch.frexp(amax)
        shared = (exp - 1 - _E2M1_EMAX).clamp(-_E8M0_BIAS, _E8M0_BIAS)
        shared = torch.where(amax > 0, shared, -_E8M0_BIAS)
        scale = poison(torch.exp2(shared.float()), amax)
        stored = torch.where(torch.isfinite(amax), shared + _E8M0_BIAS, 255).to(torch.uint8)
        return scale, stored, None
    tensor_amax = abs_max(xb)
    tensor_scale = nvfp4_tensor_scale(tensor_amax)
    safe_ts = torch.where(tensor_scale == 0, 1.0, tensor_scale)
    block_scale = exact_div(_over(amax, e2m1.E2M1_MAX), safe_ts).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    scale = poison(block_scale.float() * tensor_scale, amax)
    return scale, block_scale, tensor_scale


def _round(scaled: torch.Tensor, rounding: str, generator) -> torch.Tensor:
    if rounding == "nearest":
        return e2m1.round_to_e2m1(scaled)
    if rounding == "stochastic":
        return e2m1.stochastic_round_to_e2m1(scaled, generator)
    raise ValueError(f"unknown rounding {rounding!r}; use 'nearest' or 'stochastic'")


def quantize_blocked(xb: torch.Tensor, fmt: Format, rounding: str = "nearest", generator=None):
    """Quantize blocked ``xb`` ([..., groups, size], float32): (E2M1 values, effective scale, stored, tensor scale)."""
    scale, stored, tensor_scale = _scales(xb, fmt)
    values = _round(to_scaled_domain(xb, scale, fmt), rounding, generator)
    return values, scale, stored, tensor_scale


def to_scaled_domain(xb: torch.Tensor, scale: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Blocked ``xb`` in units of its groups' ``scale``, the values E2M1 rounding takes. NVFP4 divides:
    its scale (E4M3 block scale x FP32 tensor scale) can fall below 2^-126, where 1 / scale overflows, and
    its kernels divide likewise. A zero scale (an all-zero group, or an NVFP4 block below E4M3's range)
    gives 0."""
    if fmt.name == "nvfp4":
        return exact_div(xb, torch.where(scale == 0, torch.inf, scale))
    return xb * reciprocal(scale)


def _unblocked(xb: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    """Inverse of :func:`_blocked` for a tensor of the original ``shape``."""
    if len(shape) == 0:
        return xb.reshape(())
    moved = list(shape)
    moved.append(moved.pop(dim))
    return xb.reshape(moved).movedim(-1, dim)


@dataclass(frozen=True)
class QuantizedTensor:
    """An FP4 tensor: E2M1 values (held exactly in ``float8_e4m3fn``, one per byte) and their scales.

    ``scales`` has the shape of the original tensor with ``dim`` replaced by the number of groups along it
    (1 for "vector"; all ones for "tensor"), in the format's scale dtype: float32, E8M0 as uint8 (exponent
    + 127, 255 = NaN), or float8_e4m3fn for NVFP4, whose FP32 per-tensor scale is ``tensor_scale``.
    """

    data: torch.Tensor
    scales: torch.Tensor
    format: str
    dim: int
    dtype: torch.dtype
    tensor_scale: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def codes(self) -> torch.Tensor:
        """The 4-bit E2M1 codes, one per uint8 (sign in bit 3)."""
        return e2m1.encode_e2m1(self.data.float())

    def packed(self) -> torch.Tensor:
        """Codes packed two per byte along ``dim`` (low nibble first); its size along ``dim`` halves."""
        return e2m1.pack_e2m1(self.codes.movedim(self.dim, -1)).movedim(-1, self.dim)

    def scale_float(self) -> torch.Tensor:
        """The effective FP32 scale of each group, shaped like ``scales``."""
        if self.format == "mxfp4":
            exp = self.scales.float() - _E8M0_BIAS
            return torch.where(self.scales == 255, torch.nan, torch.exp2(exp))
        if self.format == "nvfp4":
            return self.scales.float() * self.tensor_scale
        return self.scales

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Values times scales, in ``dtype`` (default: the dtype the tensor was quantized from)."""
        scale = self.scale_float()
        groups = scale.shape[self.dim] if self.data.dim() else 1
        size = self.data.shape[self.dim] // groups if self.data.dim() and groups else 1
        out = self.data.float() * scale.repeat_interleave(size, dim=self.dim) if self.data.dim() else (
            self.data.float() * scale.reshape(())
        )
        return out.to(dtype or self.dtype)


def quantize(
    x: torch.Tensor,
    format: str = "vector",
    dim: int = -1,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> QuantizedTensor:
    """Quantize ``x`` to FP4 in ``format`` ("tensor", "vector", "mxfp4", "nvfp4") with scaling groups
    along ``dim`` (the GEMM's reduction dim). ``rounding`` is "nearest" (ties to even) or "stochastic"
    (unbiased; draws from ``generator``)."""
    fmt = get_format(format)
    dim = check_input(x, fmt, dim)
    values, _, stored, tensor_scale = quantize_blocked(_blocked(x, fmt, dim), fmt, rounding, generator)
    data = _unblocked(values, x.shape, dim).to(torch.float8_e4m3fn)
    if fmt.name == "tensor":
        scales = stored.reshape([1] * x.dim())
    else:
        scales = _unblocked(stored, x.shape[:dim] + (stored.shape[-2],) + x.shape[dim + 1 :], dim)
    return QuantizedTensor(data, scales, fmt.name, dim, x.dtype, tensor_scale)


def fake_quantize(
    x: torch.Tensor,
    format: str = "vector",
    dim: int = -1,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Quantize to FP4 and dequantize again: the values an FP4 GEMM sees, in ``x``'s dtype."""
    fmt = get_format(format)
    dim = check_input(x, fmt, dim)
    values, scale, _, _ = quantize_blocked(_blocked(x, fmt, dim), fmt, rounding, generator)
    return _unblocked(values * scale, x.shape, dim).to(x.dtype)


# E4M3 holds E2M1 values times 2^t exactly for t in [-8, 6]: 6 * 2^6 = 384 <= 448, 0.5 * 2^-8 = 2^-9 (its
# smallest subnormal). MXFP4 rows are folded so that the row's largest block scale maps to 2^6.
_MX_FOLD_TOP = 6


def _fold_mx_rows(values: torch.Tensor, scale: torch.Tensor):
    """MXFP4 values [..., G, 32] with power-of-two block scales [..., G, 1] -> (E4M3 values, per-row
    FP32 outer [..., 1, 1]). Exact for every block whose scale is at least 2^-14 of its row's largest;
    smaller blocks round onto E4M3's subnormal grid (an absolute error below 2^-10 * 2^-6 * row max scale)."""
    row_max = scale.amax(dim=-2, keepdim=True)  # never 0: E8M0's smallest scale is 2^-127
    folded = (values * (scale / row_max * 2.0**_MX_FOLD_TOP)).to(torch.float8_e4m3fn)  # powers of two: exact
    return folded, row_max * 2.0**-_MX_FOLD_TOP


def tiles_quantized(w: torch.Tensor, tile: int = 16) -> QuantizedTensor:
    """NVFP4 quantization of a 2-D weight in tile x tile blocks (one E4M3 scale per tile, one FP32 tensor
    scale), as NVIDIA's recipe quantizes weights: w and w.T quantize identically, so the forward's weight
    serves the backward's dX GEMM as it is. Scales along dim 1 in blocks of 16, a tile's scale repeated on
    each of its rows (the layout of an NVFP4 tensor quantized along its rows)."""
    if w.dim() != 2 or w.shape[0] % tile or w.shape[1] % tile:
        raise ValueError(f"16x16-tile quantization needs a 2-D weight with both sizes multiples of {tile}, "
                         f"got {tuple(w.shape)}; pad the layer or exclude it")
    n, k = w.shape
    tiles = w.float().reshape(n // tile, tile, k // tile, tile).transpose(1, 2).reshape(n // tile, k // tile, -1)
    values, _, stored, tensor_scale = quantize_blocked(tiles, get_format("nvfp4"))
    values = values.reshape(n // tile, k // tile, tile, tile).transpose(1, 2).reshape(n, k)
    scales = stored.reshape(n // tile, k // tile).repeat_interleave(tile, 0)
    return QuantizedTensor(values.to(torch.float8_e4m3fn), scales, "nvfp4", 1, w.dtype, tensor_scale)


def nvfp4_operand(q: QuantizedTensor):
    """``gemm_operand``'s NVFP4 form of ``q`` (NVFP4, quantized along its last dim): (E2M1 values times
    block scales in BF16, exact; tensor scale)."""
    blocks = q.data.float().unflatten(-1, (-1, get_format("nvfp4").block_size))
    return (blocks * q.scales.float()[..., None]).flatten(-2).to(torch.bfloat16), q.tensor_scale


def tiles_operand(w: torch.Tensor, tile: int = 16):
    """:func:`tiles_quantized` in ``gemm_operand``'s form: (values times tile scales in BF16; tensor scale)."""
    return nvfp4_operand(tiles_quantized(w, tile))


def gemm_operand(x: torch.Tensor, format: str, rounding: str = "nearest", generator=None):
    """Quantize ``x`` along its last dim (the GEMM's reduction dim) for an FP4 GEMM.

    Returns (values, outer): ``values`` shaped like ``x`` hold the E2M1 values times any scale that varies
    along the reduction dim, and ``outer`` is the FP32 scale left over, constant along it: [..., 1] per
    row for "vector" and "mxfp4", 0-d for "tensor" and "nvfp4" (its tensor scale). A GEMM with FP32
    accumulation multiplies the values exactly, so every device computes the same product.

    - "vector", "tensor": plain E2M1 values in float8_e4m3fn (one byte each, ready for FP8 tensor cores);
      fake_quantize(x) == values * outer.
    - "mxfp4": each row's power-of-two block scales are folded into the values relative to the row's
      largest, also in float8_e4m3fn, so MXFP4 runs on FP8 tensor cores too. Exact (fake_quantize(x) ==
      values * outer) unless a block's scale is below 2^-14 of the row's largest; see _fold_mx_rows.
    - "nvfp4": E2M1 values times E4M3 block scales, in bfloat16: these products need up to 6 significant
      bits, more than FP8 holds and fewer than BF16's 8, so they are exact there (and a BF16 GEMM with
      FP32 accumulation multiplies them exactly).
    """
    fmt = get_format(format)
    check_input(x, fmt, -1)
    xb = _blocked(x, fmt, max(x.dim() - 1, 0))
    values, scale, stored, tensor_scale = quantize_blocked(xb, fmt, rounding, generator)
    if fmt.name in ("vector", "tensor"):
        outer = scale.squeeze(-1) if fmt.name == "vector" else scale.reshape(())
        return values.reshape(x.shape).to(torch.float8_e4m3fn), outer
    if fmt.name == "mxfp4":
        folded, outer = _fold_mx_rows(values, scale)
        return folded.reshape(x.shape), outer.reshape(*x.shape[:-1], 1)
    return (values * stored.float()).reshape(x.shape).to(torch.bfloat16), tensor_scale


def operand_values(x: torch.Tensor, format: str, inverse: torch.Tensor) -> torch.Tensor:
    """``gemm_operand(x, format)``'s values ("vector", "tensor") from the reciprocal of the outer scale it
    returned (``reciprocal(outer)``): x times it, rounded to E2M1, in float8_e4m3fn; the same bits, with no
    reduction over x."""
    if format not in ("vector", "tensor"):
        raise ValueError(f"operand_values takes the 'vector' and 'tensor' formats (one scale per row or per "
                         f"tensor), got {format!r}")
    return e2m1.round_to_e2m1(scaled_domain(x, format, inverse)).to(torch.float8_e4m3fn)


def scaled_domain(x: torch.Tensor, format: str, inverse: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` divided by its scales along the last dim, before rounding: the [-6, 6] domain DGE works in.
    ``inverse``: ``reciprocal(outer)`` of ``gemm_operand(x, format)``'s outer scale, taken as x's scales
    where it is the only one ("vector", "tensor"; the same bits as computing them again), so no reduction
    over x runs again. The reciprocal comes in, not the scale: Inductor would inline its float64 division
    into every element of the kernel that multiplies by it."""
    fmt = get_format(format)
    if inverse is not None and fmt.name in ("vector", "tensor"):
        return x.float() * inverse
    xb = _blocked(x, fmt, max(x.dim() - 1, 0))
    scale, _, _ = _scales(xb, fmt)
    return to_scaled_domain(xb, scale, fmt).reshape(x.shape)
