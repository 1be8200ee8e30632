"""The unbiased NVFP4 recipes (method.md, "Unbiased NVFP4 training"): all three GEMMs of a matmul in NVFP4,
Y = A @ B^T (+ bias) with A [..., M, K] and B [..., N, K], in exact emulation (FP32 GEMMs of the
dequantized values, which every device multiplies exactly).

Forward, both recipes: activation operands in 1x16 blocks along K, weight operands in 16x16 tiles (so a
weight and its transpose quantize alike), round to nearest.
Backward, each gradient GEMM reduces over its own dim (dA: over N; dB: over M, the tokens):
- "nvidia": dA = SR(dY) @ B_q. dB = SR(H dY)^T @ Q(H A): H a random Hadamard transform along the tokens
  applied to both operands, dY rounded stochastically, A (unquantized) rounded to nearest.
- "quartet2": both operands of both gradient GEMMs, the forward-quantized A_q / B_q and dY, rotated along
  the GEMM's reduction dim by one random Hadamard transform and quantized by MS-EDEN.
Signs and stochastic draws come from torch's default generator, fresh at every backward. The gradient
GEMMs are one opaque custom op (``fp4compile::unbiased_grad_gemm``): traced open inside a compiled
backward, a random tensor used by two operands was not always the same tensor for both (AOTAutograd,
torch 2.13), which breaks the rotation's cancellation; inside the op the draws happen once, at run time.
"""

import torch

from fp4compile.runtime.eden import ms_eden
from fp4compile.runtime.hadamard import random_signs, rht
from fp4compile.runtime.quantize import fake_quantize, fake_quantize_tiles


def forward_operand(x: torch.Tensor, is_weight: bool) -> torch.Tensor:
    """The forward's NVFP4 operand (FP32): 16x16 tiles for a 2-D weight, else 1x16 blocks along K."""
    if is_weight and x.dim() == 2:
        return fake_quantize_tiles(x.float())
    return fake_quantize(x.float(), "nvfp4")


def _sr(x: torch.Tensor) -> torch.Tensor:
    return fake_quantize(x, "nvfp4", rounding="stochastic")


def _check(size: int, group: int, what: str) -> None:
    if size % group:
        raise ValueError(f"the unbiased NVFP4 backward rotates {what} in Hadamard groups of {group}, but its size "
                         f"is {size}; use a multiple of {group} (e.g. pad the batch) or a smaller hadamard_group")


@torch.library.custom_op("fp4compile::unbiased_grad_gemm", mutates_args=())
def grad_gemm(p: torch.Tensor, q: torch.Tensor, recipe: str, group: int, over_tokens: bool) -> torch.Tensor:
    """p [..., P, R] @ q [..., Q, R]^T estimated as ``recipe`` does, R the reduction dim: ``p`` the
    gradient side, ``q`` the saved operand (the forward's B_q for dA; A_q, or A for "nvidia", for dB,
    whose reduction dim is the tokens)."""
    if recipe == "quartet2":
        _check(p.shape[-1], group, "the reduction dim")
        signs = random_signs(group, device=p.device)
        return ms_eden(rht(p, signs), group) @ ms_eden(rht(q, signs), group).mT
    if not over_tokens:  # nvidia's dA: the saved B_q as it is, the gradient rounded stochastically
        return _sr(p) @ q.mT
    _check(p.shape[-1], group, "the tokens")
    signs = random_signs(group, device=p.device)
    return _sr(rht(p, signs)) @ fake_quantize(rht(q, signs), "nvfp4").mT


@grad_gemm.register_fake
def _(p, q, recipe, group, over_tokens):
    return p.new_empty((*p.shape[:-1], q.shape[-2]), dtype=torch.float32)


class UnbiasedMatmulNT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, bias, spec):
        cfg = spec.config
        aq, bq = forward_operand(a, spec.a_is_weight), forward_operand(b, spec.b_is_weight)
        y = aq @ bq.mT
        if bias is not None:
            y = y + bias.float()
        # nvidia's dB re-quantizes the unquantized A after its rotation; quartet2 rotates A_q.
        ctx.save_for_backward(a if cfg.backward == "nvidia" else aq, bq)
        ctx.spec = spec
        ctx.meta = (a.shape, a.dtype, b.shape, b.dtype, None if bias is None else (bias.shape, bias.dtype))
        return y.to(spec.out_dtype or a.dtype)

    @staticmethod
    def backward(ctx, dy):
        a_saved, bq = ctx.saved_tensors
        cfg = ctx.spec.config
        a_shape, a_dtype, b_shape, b_dtype, bias_meta = ctx.meta
        need_a, need_b, need_bias, _ = ctx.needs_input_grad
        g = dy.float()
        da = db = dbias = None
        with torch.autocast(dy.device.type, enabled=False):
            if need_a:  # dA [M, K] = dY [M, N] @ B_q [N, K]: reduce over N
                da = grad_gemm(g, bq.mT.contiguous(), cfg.backward, cfg.hadamard_group, False)
                da = da.sum_to_size(a_shape).to(a_dtype)
            if need_b:  # dB [N, K] = dY^T [N, M] @ A [M, K]: reduce over the tokens M
                db = grad_gemm(g.mT.contiguous(), a_saved.float().mT.contiguous(), cfg.backward, cfg.hadamard_group, True)
                db = db.sum_to_size(b_shape).to(b_dtype)
            if need_bias:
                dbias = g.sum_to_size(bias_meta[0]).to(bias_meta[1])
        return da, db, dbias, None
