"""The unbiased NVFP4 recipes (method.md, "Unbiased NVFP4 training"): all three GEMMs of a matmul in NVFP4,
Y = A @ B^T (+ bias) with A [..., M, K] and B [..., N, K]. Where ``gemm.plan`` gives the native block-scaled
FP4 kernel (sm_10x, a 2-D B), every operand is quantized into the codes and E4M3 scales the kernel reads
(a PackedOperand); elsewhere it is held as E2M1 values times E4M3 block scales in BF16 (exact) with an
FP32 tensor scale apart, multiplied exactly by a BF16 tensor-core GEMM with FP32 output on other CUDA
GPUs and by the FP32 emulation elsewhere (``gemm.scaled_gemm``).
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

from fp4compile.runtime.gemm import native_block, native_block_gemm, scaled_gemm
from fp4compile.runtime.hadamard import group_for, random_signs
from fp4compile.runtime.kernels import blackwell_quantize as bq
from fp4compile.runtime.kernels import rotate_quantize as rq
from fp4compile.runtime.quantize import gemm_operand, tiles_operand, tiles_quantized


def forward_operand(x: torch.Tensor, is_weight: bool, packed: bool, values: bool = True):
    """The forward's NVFP4 operand, 16x16 tiles for a 2-D weight, else 1x16 blocks along K, as (values x
    block scales in BF16, tensor scale, PackedOperand or None). ``packed`` (the native kernel runs the
    forward): quantized once, into the kernel's codes and scales, and the values decoded from them where
    the backward reads them (``values``; else None)."""
    tiled = is_weight and x.dim() == 2
    if not packed:
        return (*(tiles_operand(x) if tiled else gemm_operand(x.float(), "nvfp4")), None)
    if tiled:
        rows = bq.from_quantized(tiles_quantized(x))
    else:
        rows = bq.pack_operand(x.reshape(-1, x.shape[-1]), "nvfp4", quantizer="triton" if x.is_cuda else "reference")
    if not values:
        return None, rows.tensor_scale, rows
    decoded, tensor_scale = bq.gemm_values(rows)
    return decoded.reshape(x.shape), tensor_scale, rows


def nvfp4_gemm(a, b, out_rows) -> torch.Tensor:
    """A GEMM of two NVFP4 operands in FP32, both PackedOperands (the native kernel; A's rows [R, K] are
    reshaped to ``out_rows`` [..., M]) or both (values, tensor scale) pairs (``scaled_gemm``)."""
    if isinstance(a, bq.PackedOperand):
        return native_block_gemm(a, b, torch.float32).reshape(*out_rows, -1)
    return scaled_gemm(*a, *b)


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


def rotate_quantize(x: torch.Tensor, signs: torch.Tensor | None, rounding: str, x_scale=None, packed: bool = False):
    """x (times the scalar ``x_scale``) rotated along its last dim (``signs`` None: not rotated) and
    quantized to NVFP4 (``rounding``: "nearest", "stochastic" or "eden"), as (values x block scales in BF16,
    tensor scale), or ``packed``: a PackedOperand of x's rows (leading dims flattened; they share the
    tensor scale). One fused Triton pass on CUDA, the reference elsewhere. An empty x (no tokens) takes
    the reference: no launch of an empty grid."""
    rows = x.flatten(0, -2)
    quantizer = rq.rotate_quantize if x.is_cuda and rq.HAS_TRITON and x.numel() else rq.reference
    out = quantizer(rows, signs, rounding, x_scale=x_scale, packed=packed)
    return out if packed else (out[0].reshape(x.shape), out[1])


@torch.library.custom_op("fp4compile::unbiased_grad_gemm", mutates_args=())
def grad_gemm(p: torch.Tensor, q: torch.Tensor, q_scale: torch.Tensor, recipe: str, group: int,
              over_tokens: bool, q_block_scales: torch.Tensor | None = None) -> torch.Tensor:
    """p [..., P, R] @ (q * q_scale) [..., Q, R]^T estimated as ``recipe`` does, R the reduction dim, in FP32:
    ``p`` the gradient side, ``q * q_scale`` the saved operand (the forward's B_q for dA; A_q, or A for
    "nvidia", for dB, whose reduction dim is the tokens). Where ``gemm.plan`` gives the native kernel, the
    operands are quantized into its codes and scales. ``q_block_scales``: nvidia's dA with B_q in 16x16
    tiles on the native kernel: ``q`` holds B_q^T's packed codes [Q, R/2] and these its block scales
    (NVFP4 along R too, so the kernel multiplies it as it is)."""
    native = native_block(p, q, "nvfp4")
    if recipe == "quartet2":
        signs = random_signs(group, device=p.device)
        pq = rotate_quantize(p, signs, "eden", packed=native)
        return nvfp4_gemm(pq, rotate_quantize(q, signs, "eden", q_scale, packed=native), p.shape[:-1])
    if not over_tokens:  # nvidia's dA: the saved B_q as it is, the gradient rounded stochastically
        native = q_block_scales is not None  # an untiled B_q is NVFP4 along K, not along R: scaled_gemm
        qq = bq.PackedOperand(q, q_block_scales, q_scale, "nvfp4") if native else (q, q_scale)
        return nvfp4_gemm(rotate_quantize(p, None, "stochastic", packed=native), qq, p.shape[:-1])
    signs = random_signs(group, device=p.device)
    pq = rotate_quantize(p, signs, "stochastic", packed=native)
    return nvfp4_gemm(pq, rotate_quantize(q, signs, "nearest", q_scale, packed=native), p.shape[:-1])


@grad_gemm.register_fake
def _(p, q, q_scale, recipe, group, over_tokens, q_block_scales=None):
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
        native = native_block(a, b, "nvfp4")
        # nvidia's dB re-quantizes the unquantized A after its rotation (quartet2 rotates A_q), and its dA
        # multiplies B_q^T as it is: on the native kernel, a tiled B_q's codes and scales transposed.
        nvidia = cfg.backward == "nvidia"
        b_tiles = native and nvidia and spec.b_is_weight
        with torch.autocast(a.device.type, enabled=False):
            va, sa, pa = forward_operand(a, spec.a_is_weight, native, values=not nvidia)
            vb, sb, pb = forward_operand(b, spec.b_is_weight, native, values=not b_tiles)
            y = nvfp4_gemm(pa, pb, a.shape[:-1]) if native else scaled_gemm(va, sa, vb, sb)
            if bias is not None:
                y = y + bias.float()
        if nvidia:
            va, sa = a, sa.new_ones(())
        ctx.save_for_backward(va, sa, vb, sb, *((pb.packed, pb.scales) if b_tiles else (None, None)))
        ctx.spec = spec
        ctx.meta = (a.shape, a.dtype, b.shape, b.dtype, None if bias is None else (bias.shape, bias.dtype))
        return y.to(spec.out_dtype or a.dtype)

    @staticmethod
    def backward(ctx, dy):
        va, sa, vb, sb, b_codes, b_scales = ctx.saved_tensors
        cfg = ctx.spec.config
        a_shape, a_dtype, b_shape, b_dtype, bias_meta = ctx.meta
        need_a, need_b, need_bias, _ = ctx.needs_input_grad
        g = dy  # the quantizers read it in FP32; an FP32 copy of dY would be one more pass over it
        da = db = dbias = None
        with torch.autocast(dy.device.type, enabled=False):
            if need_a:  # dA [M, K] = dY [M, N] @ B_q [N, K]: reduce over N
                if b_codes is None:
                    da = grad_gemm(g, vb.mT, sb, cfg.backward, cfg.hadamard_group, False)
                else:
                    bt = bq.transposed_tiles(bq.PackedOperand(b_codes, b_scales, sb, "nvfp4"))
                    da = grad_gemm(g, bt.packed, sb, cfg.backward, cfg.hadamard_group, False, bt.scales)
                da = da.sum_to_size(a_shape).to(a_dtype)
            if need_b:  # dB [N, K] = dY^T [N, M] @ A [M, K]: reduce over the tokens M
                db = grad_gemm(g.mT.contiguous(), va.mT.contiguous(), sa, cfg.backward, cfg.hadamard_group, True)
                db = db.sum_to_size(b_shape).to(b_dtype)
            if need_bias:
                dbias = g.float().sum_to_size(bias_meta[0]).to(bias_meta[1])
        return da, db, dbias, None
