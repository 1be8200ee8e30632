"""The FP4 grouped GEMM of mixture-of-experts layers: one autograd function for ``torch._grouped_mm(x,
w.mT, offs=offs)``, Y[s] = X[s] @ W[e]^T for the rows s of expert e (rows offs[e-1]:offs[e], sorted by
expert), with x [S, K] an activation and w [E, N, K] the experts' weights.

It is FP4MatmulNT's recipe per expert: x quantized per token along K (OCC first, the clamped residual
multiplied in high precision), w per (expert, output row) along K, DGE on w's gradient, STE on x's, and
the backward GEMMs on dY in FP8 with the other operand's per-row scale folded in (method.md): for
dX = dY @ W_e, W's scale of row n of expert e(s) multiplies dY[s, n]; for dW_e = dY_e^T @ X_e, x's
per-token scale multiplies dY[s, :], and dY^T is then quantized per feature over all tokens, a scale
that factors out of every expert's product.

The grouped GEMMs, by device (``hopper.grouped_device_reason`` says which, also for the report):
- sm_90, sm_100: ``torch._scaled_grouped_mm`` on FP8 tensor cores (float8_e4m3fn operands only, row-wise
  FP32 scales, BF16 output): the forward (E2M1 values are exact in E4M3), and dX when dY is quantized
  to float8_e4m3fn. Its BF16 output is the rounding the op's BF16 result takes anyway.
- elsewhere, and for dY in float8_e5m2, dW (groups cut the reduction dim) and float32 outputs:
  ``grouped_mm_fp32``, a custom op (one node in the graph, so the data-dependent offsets cause no graph
  break) of per-group GEMMs with FP32 accumulation and output, on BF16 tensor cores where both operands
  are exact in BF16 (E2M1 and FP8 values are), else in FP32. On CUDA it is one Triton launch that reads
  offs on the device (kernels/grouped_triton.py); elsewhere a loop over the groups. The products are
  exact either way, so it differs from a per-expert FP32 reference only by summation order.
Rows past offs[-1] belong to no expert: the emulation gives them zeros (torch._grouped_mm leaves them
unwritten).
"""

import torch

from fp4compile.config import FP4Config
from fp4compile.runtime import gemm, hopper
from fp4compile.runtime.fp8 import get_fp8_dtype, grad_operands
from fp4compile.runtime.matmul import MatmulSpec, backward_operands, dge_factor, forward_operands, unrotate_grad


def _group_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with FP32 accumulation and output, exact products: on the BF16 tensor cores where both
    operands are exact in BF16 (FP8 values, E2M1 values, BF16: gemm.bf16_rule), else in FP32."""
    if gemm.bf16_rule(*gemm.device_of(a), a.dtype, b.dtype, a.shape, b.mT.shape) is None:
        return torch.mm(a.bfloat16(), b.bfloat16(), out_dtype=torch.float32)
    return a.float() @ b.float()


@torch.library.custom_op("fp4compile::grouped_mm_fp32", mutates_args=())
def grouped_mm_fp32(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per-group GEMMs with FP32 output: a [S, K] x b [E, N, K] -> [S, N] with row groups (NT form), or
    a [N, S] x b [S, K] -> [E, N, K] with the groups along S (a weight gradient)."""
    ends = offs.tolist()
    starts = [0, *ends[:-1]]
    if b.dim() == 3:
        out = a.new_zeros(a.shape[0], b.shape[1], dtype=torch.float32)
        for e, (s, t) in enumerate(zip(starts, ends)):
            out[s:t] = _group_mm(a[s:t], b[e].T)
        return out
    if not ends:
        return a.new_zeros(0, a.shape[0], b.shape[1], dtype=torch.float32)
    return torch.stack([_group_mm(a[:, s:t], b[s:t]) for s, t in zip(starts, ends)])


@grouped_mm_fp32.register_kernel("cuda")
def _(a, b, offs):
    # One launch, no device-to-host copy of offs: the loop above cost 40 of an MoE layer's 48 ms (H100).
    from fp4compile.runtime.kernels.grouped_triton import grouped_mm

    return grouped_mm(a, b, offs)


@grouped_mm_fp32.register_fake
def _(a, b, offs):
    if b.dim() == 3:
        return a.new_empty(a.shape[0], b.shape[1], dtype=torch.float32)
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[1], dtype=torch.float32)


def segment_ids(offs: torch.Tensor, rows) -> torch.Tensor:
    """The expert of each of ``rows`` rows (rows past offs[-1] get the last one: they belong to none)."""
    ids = torch.searchsorted(offs, torch.arange(rows, device=offs.device, dtype=offs.dtype), right=True)
    return ids.clamp(max=offs.shape[0] - 1)


def _per_row(b_scale: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """A per-(expert, row) scale [E, N, 1] as each token's row of scales [S, N]; 0-d stays 0-d."""
    return b_scale.float().squeeze(-1)[seg] if b_scale.dim() else b_scale.float()


def grouped_gemm(a, a_scale, b, b_scale, offs, out_dtype) -> torch.Tensor:
    """(a[s] @ b[e(s)]^T) * a_scale[s] * b_scale[e(s)]^T: a [S, K] with a per-row [S, 1] or 0-d scale,
    b [E, N, K] with a per-row [E, N, 1] or 0-d scale -> [S, N] in ``out_dtype``, FP32 accumulation."""
    reason = hopper.grouped_reason(a, b, out_dtype)
    if reason is None:
        return hopper.scaled_grouped_gemm(a, a_scale, b, b_scale, offs)
    y = grouped_mm_fp32(a, b, offs) * a_scale.float() * _per_row(b_scale, segment_ids(offs, a.shape[0]))
    return y.to(out_dtype)


def grouped_weight_gemm(g, g_scale, x, offs, out_dtype) -> torch.Tensor:
    """dW_e = g_scale * (g[:, rows of e] @ x[rows of e]): g [N, S] with a per-row [N, 1] or 0-d scale,
    x [S, K] -> [E, N, K] in ``out_dtype``."""
    return (grouped_mm_fp32(g, x, offs) * g_scale.float()).to(out_dtype)


def high_precision_grouped(a, b, offs, dtype) -> torch.Tensor:
    """a [S, K] x b [E, N, K] -> [S, N] in ``dtype`` unquantized (OCC's residual): the original op in
    BF16 on CUDA, else the emulation rounded to ``dtype``."""
    if a.is_cuda and dtype == torch.bfloat16:
        return torch._grouped_mm(a.to(dtype), b.to(dtype).mT, offs=offs)
    return grouped_mm_fp32(a, b, offs).to(dtype)


def _grad_operand(dy, fold, grad_dtype: str | None, transposed: bool):
    """dY [S, N] (``transposed``: dY^T [N, S]) times ``fold``, quantized per row to FP8 by
    fp8.grad_operands, or unquantized with a unit scale for grad_dtype None: (data, scale)."""
    one = dy.new_ones((), dtype=torch.float32)
    if grad_dtype is None:
        return (dy.mT if transposed else dy).float() * fold, one
    fold_dx, fold_dw = (one, fold) if transposed else (fold, one)
    dx, dw = grad_operands(dy, fold_dx, fold_dw, get_fp8_dtype(grad_dtype), not transposed, transposed)
    return dw if transposed else dx


class FP4GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offs, spec: MatmulSpec):
        cfg = spec.config
        dtype = spec.out_dtype or x.dtype
        ctx.dtypes = (x.dtype, w.dtype, dtype)
        w_dge = w if cfg.dge else None
        with torch.autocast(x.device.type, enabled=False):
            x, w, (vx, ox, _, rx, _), (vw, ow, iw, _, _) = forward_operands(x, w, False, True, cfg, dtype)
            y = grouped_gemm(vx, ox, vw, ow, offs, dtype)
            if rx is not None:
                y = y + high_precision_grouped(rx, w, offs, dtype)
        w_inverse = None if w_dge is None else iw  # DGE multiplies by the forward's scales' reciprocals
        ctx.save_for_backward(*backward_operands(x, w, vx, ox, vw, ow, cfg), rx, w_dge, w_inverse, offs)
        ctx.spec = spec
        return y

    @staticmethod
    def backward(ctx, dy):
        vx, ox, vw, ow, rx, w_dge, w_inverse, offs = ctx.saved_tensors
        cfg = ctx.spec.config
        x_dtype, w_dtype, dtype = ctx.dtypes
        need_x, need_w = ctx.needs_input_grad[:2]
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            if need_x:
                seg = segment_ids(offs, dy.shape[0])
                g, r = _grad_operand(dy, _per_row(ow, seg), cfg.grad_dtype, transposed=False)
                dx = unrotate_grad(grouped_gemm(g, r, vw.mT, ow.new_ones(()), offs, x_dtype), cfg, a_side=True)
            if need_w:
                g, c = _grad_operand(dy, ox.mT if ox.dim() else ox, cfg.grad_dtype, transposed=True)
                dw = grouped_weight_gemm(g, c, vx, offs, w_dtype)
                if w_dge is not None:
                    dw = dw * dge_factor(w_dge, cfg, dtype, w_inverse).to(w_dtype)
                if rx is not None:
                    one = dy.new_ones((), dtype=torch.float32)
                    dw = dw + grouped_weight_gemm(dy.mT, one, rx.to(dy.dtype), offs, w_dtype)
                dw = unrotate_grad(dw, cfg, a_side=False)
        return dx, dw, None, None


def fp4_grouped_mm(x, w, offs, spec: MatmulSpec | None = None):
    """``torch._grouped_mm(x, w.mT, offs=offs)`` with FP4 operands: x [S, K] an activation, w [E, N, K]
    the experts' weights, offs [E] int32 group ends; ``spec`` defaults to FP4Config() (the rotated
    recipe)."""
    return FP4GroupedMM.apply(x, w, offs, spec or MatmulSpec(FP4Config()))
