"""The FP4 matmul: one autograd function, Y = A @ B^T (+ bias) with A [..., M, K], B [..., N, K].

Forward: both operands quantized along K (OCC first on activation operands, with the clamped residual
multiplied in high precision). Each GEMM accumulates in FP32 and rounds once to the dtype its result is
returned in (the op's dtype: BF16 under autocast), as torch's own BF16 matmuls do; compensation, bias and
DGE are applied in that dtype. Backward: the straight-through estimator for activations, DGE on the
gradient of weight operands, and the two gradient GEMMs as ``FP4Config.grad_dtype`` and
``backward_operands`` say. With ``FP4Config.rotation``, both operands are first rotated along K
(``hadamard.rotate``; A's scale takes the rotation's power of two out) and both gradients rotated back.
Every op-specific entry point in ``ops.py`` reduces to this one.
"""

import contextlib
from dataclasses import dataclass

import torch

from fp4compile.config import FP4Config
from fp4compile.runtime.dge import dge_derivative
from fp4compile.runtime.fp8 import get_fp8_dtype, grad_operands, has_fp8_kernels
from fp4compile.passes.recompute import ANNOTATION as RECOMPUTE
from fp4compile.runtime.hadamard import rotate, rotation_matrix
from fp4compile.runtime.gemm import (block_gemm, native_block, native_block_gemm, native_gemm, row_scale_as_columns,
                                     scaled_gemm)
from fp4compile.runtime.occ import occ_clamp
from fp4compile.runtime.quantize import gemm_operand, operand_values, reciprocal, scaled_domain


@dataclass(frozen=True)
class MatmulSpec:
    """What one matmul site needs beyond its tensors: the config, which operands are weights, and the
    module it was called from (its FQN, for error messages; None outside any module or when unknown)."""

    config: FP4Config
    a_is_weight: bool = False
    b_is_weight: bool = True
    out_dtype: torch.dtype | None = None
    name: str | None = None


def fused_rows(x: torch.Tensor, format: str) -> bool:
    """Whether the Triton kernel of kernels/fp4_rows_triton.py quantizes ``x``'s rows here: CUDA sm_89+,
    the "vector" format, 0 < K <= its MAX_K."""
    if format != "vector" or not x.dim() or not x.is_cuda or not x.numel() or not has_fp8_kernels(x.device):
        return False
    from fp4compile.runtime.kernels.fp4_rows_triton import MAX_K

    return x.shape[-1] <= MAX_K


def _rows_operand(x: torch.Tensor, rotation: int | None = None):
    """gemm_operand(x, "vector"), or of hadamard.rotate(x, rotation), in the same bits from the kernel
    (``fused_rows``), which reads x once and rotates it on the way, and the scale's reciprocal."""
    from fp4compile.runtime.kernels.fp4_rows_triton import fp4_rows

    matrix = None if rotation is None else rotation_matrix(rotation, x.device, x.dtype)
    values, scale, inverse = fp4_rows(x.reshape(-1, x.shape[-1]), matrix)
    rows = (*x.shape[:-1], 1)
    return values.reshape(x.shape), scale.reshape(rows), inverse.reshape(rows)


def _quantize(x, is_weight: bool, config: FP4Config, dtype: torch.dtype, packed: bool = False,
              rotation: int | None = None, requantize: bool = False):
    """(values, outer, outer's reciprocal ("vector", "tensor"; else None), OCC residual in ``dtype`` or
    None, the operand packed for the native block-scaled kernel or None) of one operand. ``packed`` (a
    block format on sm_10x's native FP4 MMA): quantized once into the kernel's codes and scales, and
    values and outer decoded from those. ``rotation``: the activation rotated inside its quantize kernel
    (``_operand``). Activations and weights go through the kernel where it runs (``fused_rows``):
    Inductor's reference reads each row twice, and computes an activation's producer twice where it fuses
    the two (kernels/fp4_rows_triton.py). With config.recompute_activations (recompute_weights) an
    activation's (a weight's) quantize is recomputed in the backward as it ran here (``recomputed``),
    unless the caller's backward quantizes it again from its scales (``requantize``: ``requantized``)."""
    residual = None
    if config.occ and not is_weight:
        x, residual = occ_clamp(x, config.occ_quantile, config.occ_sample)
        residual = residual.to(dtype)
    with recomputed(recompute_asked(is_weight, config) and not requantize):
        values, outer, inverse, operand = _quantized(x, is_weight, config, packed, rotation)
    return values, outer, inverse, residual, operand


def recompute_asked(is_weight: bool, config: FP4Config) -> bool:
    """config.recompute_weights for a weight, config.recompute_activations for an activation."""
    return config.recompute_weights if is_weight else config.recompute_activations


def requantized(is_weight: bool, config: FP4Config) -> bool:
    """Whether config.recompute_activations (recompute_weights) has the backward quantize this operand
    again from what the forward quantized, with the forward's scale (``backward_values``): an elementwise
    pass that Inductor fuses into whatever recomputes the operand (an RMSNorm, SwiGLU's product) and that
    stores the values transposed, as the backward's GEMM takes them, in place of the quantize kernel run
    again and a transpose kernel. For one scale per row or per tensor ("vector", "tensor"), the
    forward's values multiplied in the backward, and no rotation inside an activation's quantize kernel
    (where CUDA rotates it); other operands are recomputed as the forward computed them."""
    return (recompute_asked(is_weight, config) and config.format in ("vector", "tensor")
            and config.backward_operands == "quantized" and (is_weight or not config.rotation))


def backward_values(v: torch.Tensor, inverse: torch.Tensor | None, requantize: bool, config: FP4Config):
    """An operand's FP4 values transposed, as the backward's GEMMs multiply dY by them: the forward's
    values ``v`` (a view), or for an operand ``requantized``, ``v`` is what the forward quantized and its
    values are computed again with the reciprocal of its forward scale, ``inverse``: the same bits, stored
    transposed."""
    if not requantize:
        return v.mT
    return operand_values(v, config.format, inverse).mT.contiguous()


def _quantized(x, is_weight: bool, config: FP4Config, packed: bool, rotation: int | None):
    """``_quantize``'s (values, outer, outer's reciprocal or None, packed operand or None)."""
    if not packed and (rotation is not None or fused_rows(x, config.format)):
        return (*_rows_operand(x, rotation), None)
    rows = None
    if packed:
        from fp4compile.runtime.kernels.blackwell_quantize import gemm_values, pack_operand

        rows = pack_operand(x.reshape(-1, x.shape[-1]), config.format, quantizer="triton" if x.is_cuda else "reference")
        values, outer = gemm_values(rows)
        values, outer = values.reshape(x.shape), outer.reshape(*x.shape[:-1], 1) if outer.dim() else outer
    else:
        values, outer = gemm_operand(x, config.format)
    return values, outer, reciprocal(outer) if config.format in ("vector", "tensor") else None, rows


def recomputed(tagged: bool):
    """Where ``tagged``, a context in which the traced operations are tagged for Inductor to recompute in
    the backward rather than save their outputs for it (passes/recompute.py)."""
    return torch.fx.traceback.annotate(RECOMPUTE) if tagged else contextlib.nullcontext()


def rotated(x: torch.Tensor, is_weight: bool, config: FP4Config, dtype: torch.dtype) -> torch.Tensor:
    """Operand ``x`` rotated along K (hadamard.rotate, config.rotation) in ``dtype``. A weight's rotation
    is recomputed in the backward (for DGE), an activation's with config.recompute_activations."""
    with recomputed(is_weight or config.recompute_activations):
        return rotate(x.to(dtype), config.rotation)


def _operand(x, is_weight: bool, config: FP4Config, dtype: torch.dtype, packed: bool, requantize: bool):
    """(x as the GEMM multiplies it, ``_quantize``'s tuple) of one forward operand, rotated along K where
    config.rotation says. An activation that nothing but its quantize reads rotated (OCC off, quantized
    backward operands), where the quantize kernel runs, is rotated inside it and comes back unrotated.
    Weights are rotated by ``rotated``, whose tag has the backward recompute the rotation (and a cast to
    ``dtype``) for DGE: through the kernel, the partitioner saved the kernel's output and the weight's
    cast (3 bytes per parameter under autocast with FP32 weights)."""
    if not config.rotation:
        return x, _quantize(x, is_weight, config, dtype, packed, requantize=requantize)
    if (is_weight or config.occ or config.backward_operands == "original" or packed
            or not fused_rows(x, config.format)):
        x = rotated(x, is_weight, config, dtype)
        return x, _quantize(x, is_weight, config, dtype, packed, requantize=requantize)
    x = x.to(dtype)
    return x, _quantize(x, is_weight, config, dtype, packed, config.rotation, requantize)


def forward_operands(a, b, a_is_weight: bool, b_is_weight: bool, config: FP4Config, dtype: torch.dtype,
                     packed: bool = False, requantize: tuple[bool, bool] = (False, False)):
    """Both forward operands rotated along K (config.rotation) and quantized (``_operand``): (a, b as
    the GEMM multiplies them, (va, oa, ia, ra, pa), (vb, ob, ib, rb, pb)). With a rotation, (a D H')(b D
    H')^T = rotation * a b^T, so A's side (its scale and OCC residual) takes the power of two out, exactly;
    ia stays the reciprocal of the scale A was quantized with. ``requantize``: which operands the caller's
    backward quantizes again from their scales."""
    a, (va, oa, ia, ra, pa) = _operand(a, a_is_weight, config, dtype, packed, requantize[0])
    b, qb = _operand(b, b_is_weight, config, dtype, packed, requantize[1])
    if config.rotation:
        oa, ra = oa / config.rotation, None if ra is None else ra / config.rotation
    return a, b, (va, oa, ia, ra, pa), qb


def backward_operands(a, b, va, oa, vb, ob, config: FP4Config):
    """What the backward GEMMs multiply dY by, (va, oa, vb, ob): the forward's quantized operands, or
    for backward_operands="original" the (rotated) operands themselves with unit scales (A's taking the
    rotation's power of two out, as in the forward)."""
    if config.backward_operands != "original":
        return va, oa, vb, ob
    one = oa.new_ones(())
    return a.float(), one / config.rotation if config.rotation else one, b.float(), one


def dge_factor(w: torch.Tensor, config: FP4Config, dtype: torch.dtype, inverse: torch.Tensor | None = None):
    """DGE's f'(w / scale) of weight ``w``, in the domain its quantized values came from: rotated (in the
    forward's ``dtype``) where config.rotation is set. ``inverse``: the reciprocal of the forward's outer
    scale of w, which ``scaled_domain`` takes as w's scales where it is the only one."""
    if config.rotation:
        w = rotated(w, True, config, dtype)
    return dge_derivative(scaled_domain(w, config.format, inverse), config.dge_k, config.dge_clip)


def unrotate_grad(grad: torch.Tensor, config: FP4Config, a_side: bool) -> torch.Tensor:
    """A gradient with respect to a rotated operand as the gradient of the operand (the inverse rotation;
    A's side also takes the forward's 1 / rotation); unchanged without rotation."""
    if not config.rotation:
        return grad
    grad = rotate(grad, config.rotation, inverse=True)
    return grad * (1.0 / config.rotation) if a_side else grad


def _grad_operands(dy, ob, oa, grad_dtype, need_a: bool, need_b: bool):
    """dY's operands for dA = dY @ B and dB = dY^T @ A, each (data, scale) or None: the other operand's
    per-row scale (along this GEMM's reduction dim) is folded into dY before dY is quantized per row
    (method.md: folding the scales), so the saved FP4 values are reused as they are."""
    fold_a, fold_b = row_scale_as_columns(ob), row_scale_as_columns(oa)
    if grad_dtype is not None:
        return grad_operands(dy, fold_a, fold_b, get_fp8_dtype(grad_dtype), need_a, need_b)
    one = dy.new_ones((), dtype=torch.float32)
    return (dy.float() * fold_a, one) if need_a else None, (dy.mT.float() * fold_b, one) if need_b else None


def _forward_gemm(va, oa, pa, vb, ob, pb, format, dtype):
    """The forward GEMM on the path gemm.plan gives: the native FP4 GEMM of the packed operands (block
    formats) or of the vector format's values (gemm.native_gemm), else the scaled GEMM of the values."""
    if pa is not None:
        return native_block_gemm(pa, pb, dtype).reshape(*va.shape[:-1], vb.shape[0])
    return block_gemm(va, oa, vb, ob, format, lambda: native_gemm(va, oa, vb, ob, dtype), dtype)


class FP4MatmulNT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, bias, spec: MatmulSpec):
        cfg = spec.config
        # The compensation GEMMs run in the dtype the original op computed in (bf16 under autocast).
        dtype = spec.out_dtype or a.dtype
        packed = native_block(a, b, cfg.format)
        requantize = (requantized(spec.a_is_weight, cfg), requantized(spec.b_is_weight, cfg))
        shapes = (a.shape, a.dtype, b.shape, b.dtype, None if bias is None else (bias.shape, bias.dtype))
        # DGE re-derives a weight's scaled values from the weight itself (rotated again where it was).
        a_dge = a if spec.a_is_weight and cfg.dge else None
        b_dge = b if spec.b_is_weight and cfg.dge else None
        with torch.autocast(a.device.type, enabled=False):
            a, b, (va, oa, ia, ra, pa), (vb, ob, ib, rb, pb) = forward_operands(
                a, b, spec.a_is_weight, spec.b_is_weight, cfg, dtype, packed, requantize)
            y = _forward_gemm(va, oa, pa, vb, ob, pb, cfg.format, dtype)
            # DGE and a requantized operand divide by the forward's scales, as their reciprocals.
            ia = None if a_dge is None and not requantize[0] else ia
            ib = None if b_dge is None and not requantize[1] else ib
            if ra is not None:
                y = y + ra @ b.to(dtype).mT
            if rb is not None:
                y = y + (va.float() * oa).to(dtype) @ rb.mT
            if bias is not None:
                y = y + bias.to(dtype)
        va, oa, vb, ob = backward_operands(a, b, va, oa, vb, ob, cfg)
        # A requantized operand keeps what was quantized, not its values (backward_values).
        va, vb = a if requantize[0] else va, b if requantize[1] else vb
        ctx.save_for_backward(va, oa, vb, ob, ra, rb, a_dge, b_dge, ia, ib)
        ctx.requantize = requantize
        ctx.spec = spec
        ctx.shapes = shapes
        ctx.dtype = dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        va, oa, vb, ob, ra, rb, a_dge, b_dge, ia, ib = ctx.saved_tensors
        cfg = ctx.spec.config
        a_shape, a_dtype, b_shape, b_dtype, bias_meta = ctx.shapes
        need_a, need_b, need_bias, _ = ctx.needs_input_grad
        da = db = dbias = None
        with torch.autocast(dy.device.type, enabled=False):
            grad_a, grad_b = _grad_operands(dy, ob, oa, cfg.grad_dtype, need_a, need_b)
            one = ob.new_ones(())
            if need_a:
                da = scaled_gemm(*grad_a, backward_values(vb, ib, ctx.requantize[1], cfg), one, a_dtype)
                if a_dge is not None:
                    da = da * dge_factor(a_dge, cfg, ctx.dtype, ia).to(a_dtype)
                if rb is not None:
                    da = da + (dy @ rb.to(dy.dtype)).to(a_dtype)
                da = unrotate_grad(da, cfg, a_side=True).sum_to_size(a_shape)
            if need_b:
                db = scaled_gemm(*grad_b, backward_values(va, ia, ctx.requantize[0], cfg), one, b_dtype)
                if b_dge is not None:
                    db = db * dge_factor(b_dge, cfg, ctx.dtype, ib).to(b_dtype)
                if ra is not None:
                    db = db + (dy.mT @ ra.to(dy.dtype)).to(b_dtype)
                db = unrotate_grad(db, cfg, a_side=False).sum_to_size(b_shape)
            if need_bias:
                dbias = dy.float().sum_to_size(bias_meta[0]).to(bias_meta[1])
        return da, db, dbias, None


def fp4_matmul_nt(a, b, bias=None, spec: MatmulSpec | None = None):
    """a @ b.mT (+ bias) with FP4 operands; ``spec`` defaults to FP4Config() (the rotated recipe) with b
    a weight. The unbiased NVFP4 recipes (config.backward "nvidia" / "quartet2") have their own autograd
    function."""
    spec = spec or MatmulSpec(FP4Config())
    if spec.config.backward != "fp8":
        from fp4compile.runtime.unbiased import UnbiasedMatmulNT

        return UnbiasedMatmulNT.apply(a, b, bias, spec)
    return FP4MatmulNT.apply(a, b, bias, spec)
