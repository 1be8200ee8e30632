"""Quantize-kernel bandwidth: the FP4 and FP8 quantize passes of an FP4 Linear as Inductor generates them
from the reference ops (with Inductor's default settings, as the fp4 backend compiles), the Triton
kernel for activations' FP4 operands (also of a SwiGLU's product: after Inductor's silu-multiply, and
computing it, as fp4_rows_swiglu, against Inductor's fusion of the two), the Triton kernel pair that
quantizes dY for both gradient GEMMs, and the transpose kernel of the hopper path, in GB/s (bytes read +
written), next to a plain device copy of the same input bytes; and how many values and scales differ in
their bits from the CPU reference.

    PYTHONPATH=. python benchmarks/bench_quantize.py --out results/quantize.json
"""

import torch

from common import copy_bandwidth_gbs, environment, parser, print_table, time_ms, write_json
from fp4compile.runtime import hopper
from fp4compile.runtime.fp8 import grad_operands, quantize_fp8_rows
from fp4compile.runtime.kernels import fp4_rows_triton
from fp4compile.runtime.kernels.transpose_triton import transpose_bytes
from fp4compile.runtime.quantize import gemm_operand

E5M2 = torch.float8_e5m2


def fp4_rows(x):
    return gemm_operand(x, "vector")


def swiglu_rows(g, u):
    """The SwiGLU output's FP4 operand, as the fp4 backend quantizes the down projection's input."""
    return fp4_rows(torch.nn.functional.silu(g) * u)


def grad_rows(dy, col_scale):
    """dX's gradient operand: dY times the weight's per-channel scale, FP8 per row (matmul._grad_gemm)."""
    return quantize_fp8_rows(dy.float() * col_scale, E5M2)


def grad_cols(dy, row_scale):
    """dW's gradient operand: dY^T times the activation's per-token scale, FP8 per row of dY^T, made
    row-major for _scaled_mm's A as the hopper path does it (with the transpose kernel on CUDA)."""
    data, scale = quantize_fp8_rows(dy.mT.float() * row_scale, E5M2)
    return hopper.row_major(data), scale


def grad_both(dy, col_scale, row_scale):
    """Both gradient operands at once (fp8.grad_operands: the Triton kernel pair on CUDA), dW's row-major."""
    (dx, dx_scale), (dw, dw_scale) = grad_operands(dy, col_scale, row_scale, E5M2)
    return dx, dx_scale, hopper.row_major(dw), dw_scale


def compiled(fn):
    return torch.compile(fn, dynamic=False)


def transpose(values):
    return (transpose_bytes(values),)


def mismatches(got, want) -> str:
    """Per output, how many elements differ in their bits (NaN equals NaN), "values/scales"."""
    counts = []
    for g, w in zip(got, want):
        g = g.cpu()
        bits = (lambda t: t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int32))
        both_nan = g.float().isnan() & w.float().isnan()
        counts.append(str(int(((bits(g) != bits(w)) & ~both_nan).sum())))
    return "/".join(counts)


def main():
    args = parser(__doc__, "results/quantize.json").parse_args()
    torch.manual_seed(0)
    m, k, n = 16384, 4096, 14336
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16) * 1e-3
    g, u = (torch.randn(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    silu_mul = compiled(lambda a, b: torch.nn.functional.silu(a) * b)
    col_scale = torch.rand(1, n, device="cuda") + 0.5
    row_scale = torch.rand(1, m, device="cuda") + 0.5

    variants = [  # (name, GPU function, CPU reference, inputs)
        ("fp4 activation [16384x4096] eager", fp4_rows, fp4_rows, (x,)),
        ("fp4 activation [16384x4096] inductor", compiled(fp4_rows), fp4_rows, (x,)),
        ("fp4 activation [16384x4096] triton kernel", fp4_rows_triton.fp4_rows, fp4_rows, (x,)),
        ("fp4 weight [14336x4096] inductor", compiled(fp4_rows), fp4_rows, (w,)),
        ("fp4 SwiGLU output [16384x14336] inductor, fused", compiled(swiglu_rows), swiglu_rows, (g, u)),
        ("fp4 SwiGLU output [16384x14336] inductor silu*up, triton kernel",
         lambda a, b: fp4_rows_triton.fp4_rows(silu_mul(a, b)), swiglu_rows, (g, u)),
        ("fp4 SwiGLU output [16384x14336] triton kernel, fused", fp4_rows_triton.fp4_rows_swiglu, swiglu_rows, (g, u)),
        ("fp8 grad for dX [16384x14336] inductor", compiled(grad_rows), grad_rows, (dy, col_scale)),
        ("fp8 grad^T for dW [14336x16384] inductor", compiled(grad_cols), grad_cols, (dy, row_scale)),
        ("fp8 grads for dX and dW [16384x14336] triton kernels", grad_both, grad_both, (dy, col_scale, row_scale)),
    ]
    h_values = gemm_operand(dy, "vector")[0]
    variants.append(("e4m3 transpose [16384x14336] triton kernel", transpose, lambda v: (v.t().contiguous(),),
                     (h_values,)))
    rows = []
    for name, fn, ref_fn, inputs in variants:
        torch._dynamo.reset()  # each variant compiles afresh, with static shapes
        out = fn(*inputs)
        moved = sum(t.numel() * t.element_size() for t in (*inputs, *out))
        t = time_ms(lambda: fn(*inputs), warmup=3, iters=30)["median_ms"]
        in_bytes = inputs[0].numel() * inputs[0].element_size()
        copy = copy_bandwidth_gbs(in_bytes)
        ref = ref_fn(*(i.cpu() for i in inputs))
        rows.append({
            "kernel": name, "ms": t, "GB/s": moved / t / 1e6, "copy GB/s": copy,
            "of copy": moved / t / 1e6 / copy, "bits differ vs CPU": mismatches(out, ref),
            "elements": inputs[0].numel(),
        })
    print_table(rows, ["kernel", "ms", "GB/s", "copy GB/s", "of copy", "bits differ vs CPU"],
                "quantize bandwidth (bytes read + written) vs a device copy of the input bytes")
    write_json(args.out, {"env": environment(), "results": rows})


if __name__ == "__main__":
    main()
