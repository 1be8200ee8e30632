"""The unbiased NVFP4 recipes (method.md, "Unbiased NVFP4 training"): all three GEMMs of a matmul in NVFP4,
Y = A @ B^T (+ bias) with A [..., M, K] and B [..., N, K]. Every operand is held as E2M1 values times
E4M3 block scales in BF16 (exact) with an FP32 tensor scale apart, so ``gemm.nvfp4_gemm`` multiplies
it exactly: on sm_100+ as a native block-scaled FP4 GEMM, on other CUDA GPUs as a BF16 tensor-core GEMM
with FP32 output, elsewhere by the FP32 emulation.
On CUDA each gradient operand is (rotated and) quantized in one Triton pass (kernels/rotate_quantize.py).

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

from fp4compile.runtime.gemm import nvfp4_gemm, scaled_gemm
from fp4compile.runtime.hadamard import group_for, random_signs
from fp4compile.runtime.kernels import rotate_quantize as rq
from fp4compile.runtime.quantize import gemm_operand, tiles_operand


def forward_operand(x: torch.Tensor, is_weight: bool):
    """The forward's NVFP4 operand as (values x block scales in BF16, tensor scale): 16x16 tiles for a 2-D
    weight, else 1x16 blocks along K."""
    if is_weight and x.dim() == 2:
        return tiles_operand(x)
    return gemm_operand(x.float(), "nvfp4")


def dim_problems(config, name: str | None, m, n, k, *, tiled: bool, need_dx: bool = True, need_dw: bool = True,
                 tokens_vary: bool = False) -> list[str]:
    """What the unbiased ``config.backward`` cannot multiply in Y = X [M, K] @ W [N, K]^T of module
    ``name``: one message per GEMM and dim (its size, the multiple it needs, the fix), empty if none.
    Each GEMM quantizes along its reduction dim: the forward along K (NVFP4 blocks of 16), dX along N, the
    output features (blocks of 16 for "nvidia", Hadamard groups for "quartet2"), dW along the tokens M
    (Hadamard groups). ``tiled``: W is a 2-D weight quantized in 16x16 tiles, so N needs 16 too.
    ``tokens_vary``: M is a dynamic size, checked at this trace's value, so every step's M must divide."""
    recipe, group = config.backward, config.hadamard_group
    dx_multiple = 16 if recipe == "nvidia" else group
    checks = ((True, k, 16), (tiled, n, 16), (need_dx, n, dx_multiple), (need_dw, m, group))
    if not any(needed and size % multiple for needed, size, multiple in checks):  # the only guards it adds
        return []
    rotated = f"Hadamard groups of {group}"

    def smaller(size):
        fit = group_for(size, group // 2)
        return f", or set hadamard_group={fit}" if fit else ""

    features = "pad the output features to a multiple of {}"
    dx = ("NVFP4 blocks of 16 (dY rounded stochastically)", features.format(16)) if recipe == "nvidia" else (
        rotated, features.format(group) + smaller(n))
    tokens = f"pad the batch so that its tokens (batch x sequence) are a multiple of {group}{smaller(m)}"
    if tokens_vary:
        tokens += f"; the token count is dynamic and must stay a multiple of {group} at every step"
    needs = [
        (True, "the forward Y = X @ W^T", f"K = {k} (the input features)", k, 16, "NVFP4 blocks of 16",
         "pad the input features to a multiple of 16"),
        (tiled, "the forward's weight tiles", f"N = {n} (the output features)", n, 16, "16x16 tiles",
         features.format(16)),
        (need_dx, "dX = dY @ W", f"N = {n} (the output features)", n, dx_multiple, *dx),
        (need_dw, "dW = dY^T @ X", f"M = {m} (the tokens)", m, group, rotated, tokens),
    ]
    where = f"module {name!r}" if name else "a matmul outside any named module"
    return [f"{where}: backward={recipe!r} quantizes {gemm} along {dim} in {unit}, so {dim.split()[0]} must be a "
            f"multiple of {multiple}. Fix: {fix}; or exclude the module (config.exclude keeps it in high "
            "precision), or use backward='fp8'."
            for needed, gemm, dim, size, multiple, unit, fix in needs if needed and size % multiple]


def rotate_quantize(x: torch.Tensor, signs: torch.Tensor | None, rounding: str, x_scale=None):
    """x (times the scalar ``x_scale``) rotated along its last dim (``signs`` None: not rotated) and
    quantized to NVFP4 (``rounding``: "nearest", "stochastic" or "eden"), as (values x block scales in BF16,
    tensor scale): one fused Triton pass on CUDA, the reference elsewhere. Leading dims share the tensor
    scale, so they are flattened. An empty x (no tokens) takes the reference: no launch of an empty grid."""
    if x.is_cuda and rq.HAS_TRITON and x.numel():
        values, tensor_scale = rq.rotate_quantize(x.reshape(-1, x.shape[-1]), signs, rounding, x_scale=x_scale)
        return values.reshape(x.shape), tensor_scale
    return rq.reference(x, signs, rounding, x_scale=x_scale)


@torch.library.custom_op("fp4compile::unbiased_grad_gemm", mutates_args=())
def grad_gemm(p: torch.Tensor, q: torch.Tensor, q_scale: torch.Tensor, recipe: str, group: int,
              over_tokens: bool, q_tiled: bool) -> torch.Tensor:
    """p [..., P, R] @ (q * q_scale) [..., Q, R]^T estimated as ``recipe`` does, R the reduction dim, in FP32:
    ``p`` the gradient side, ``q * q_scale`` the saved operand (the forward's B_q for dA; A_q, or A for
    "nvidia", for dB, whose reduction dim is the tokens). ``q_tiled``: q was quantized in 16x16 tiles, so
    it is NVFP4 along R too."""
    if recipe == "quartet2":
        signs = random_signs(group, device=p.device)
        pv, ps = rotate_quantize(p, signs, "eden")
        qv, qs = rotate_quantize(q, signs, "eden", q_scale)
        return nvfp4_gemm(pv, ps, qv, qs)
    if not over_tokens:  # nvidia's dA: the saved B_q as it is, the gradient rounded stochastically
        pv, ps = rotate_quantize(p, None, "stochastic")
        # Only a tiled B_q is NVFP4 along N (blocks of 16 sharing a scale) for a native FP4 GEMM.
        return (nvfp4_gemm if q_tiled else scaled_gemm)(pv, ps, q, q_scale)
    signs = random_signs(group, device=p.device)
    pv, ps = rotate_quantize(p, signs, "stochastic")
    qv, qs = rotate_quantize(q, signs, "nearest", q_scale)
    return nvfp4_gemm(pv, ps, qv, qs)


@grad_gemm.register_fake
def _(p, q, q_scale, recipe, group, over_tokens, q_tiled):
    return p.new_empty((*p.shape[:-1], q.shape[-2]), dtype=torch.float32)


class UnbiasedMatmulNT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, bias, spec):
        cfg = spec.config
        # Under torch.compile a dynamic size here guards its divisibility: a step that breaks it recompiles,
        # and the compile-time check (passes/classify.py) names the fix.
        problems = dim_problems(cfg, spec.name, a.shape[-2] if a.dim() > 1 else 1, b.shape[-2], a.shape[-1],
                                tiled=spec.b_is_weight and b.dim() == 2, need_dx=ctx.needs_input_grad[0],
                                need_dw=ctx.needs_input_grad[1], tokens_vary=isinstance(a.shape[-2], torch.SymInt))
        if problems:
            raise ValueError("\n".join(problems))
        with torch.autocast(a.device.type, enabled=False):
            (va, sa), (vb, sb) = forward_operand(a, spec.a_is_weight), forward_operand(b, spec.b_is_weight)
            y = nvfp4_gemm(va, sa, vb, sb)
            if bias is not None:
                y = y + bias.float()
        # nvidia's dB re-quantizes the unquantized A after its rotation; quartet2 rotates A_q.
        if cfg.backward == "nvidia":
            va, sa = a, sa.new_ones(())
        ctx.save_for_backward(va, sa, vb, sb)
        ctx.spec = spec
        ctx.meta = (a.shape, a.dtype, b.shape, b.dtype, None if bias is None else (bias.shape, bias.dtype))
        return y.to(spec.out_dtype or a.dtype)

    @staticmethod
    def backward(ctx, dy):
        va, sa, vb, sb = ctx.saved_tensors
        cfg = ctx.spec.config
        a_shape, a_dtype, b_shape, b_dtype, bias_meta = ctx.meta
        need_a, need_b, need_bias, _ = ctx.needs_input_grad
        g = dy  # the quantizers read it in FP32; an FP32 copy of dY would be one more pass over it
        da = db = dbias = None
        with torch.autocast(dy.device.type, enabled=False):
            if need_a:  # dA [M, K] = dY [M, N] @ B_q [N, K]: reduce over N
                tiled = ctx.spec.b_is_weight and len(b_shape) == 2  # as forward_operand quantized it
                da = grad_gemm(g, vb.mT.contiguous(), sb, cfg.backward, cfg.hadamard_group, False, tiled)
                da = da.sum_to_size(a_shape).to(a_dtype)
            if need_b:  # dB [N, K] = dY^T [N, M] @ A [M, K]: reduce over the tokens M
                db = grad_gemm(g.mT.contiguous(), va.mT.contiguous(), sa, cfg.backward, cfg.hadamard_group, True,
                               False)
                db = db.sum_to_size(b_shape).to(b_dtype)
            if need_bias:
                dbias = g.float().sum_to_size(bias_meta[0]).to(bias_meta[1])
        return da, db, dbias, None
