"""GEMM throughput: fp4compile's scaled_gemm on FP8 tensor cores (E2M1 values in E4M3, FP32 accumulation,
BF16 output as in a BF16 model) against BF16 torch.mm, for the GEMMs of Llama-3-8B and a ~1B Llama at
16384 tokens.

Columns: the forward GEMM (e4m3 x e4m3); the backward layout (e5m2 gradient x the saved operand as a
transposed view, which scaled_gemm copies to column-major); and two other _scaled_mm settings, to show
what they cost or would buy: FP32 output, and fast (reduced-precision) accumulation, which scaled_gemm
does not use.
Accuracy: the largest |error| / (FP32-accumulation bound) against a float64 product, per setting.

    PYTHONPATH=. python benchmarks/bench_gemm.py --out results/gemm.json
"""

import torch

from common import environment, parser, print_table, time_ms, write_json
from fp4compile.runtime import gemm, hopper
from fp4compile.runtime.fp8 import quantize_fp8_rows
from fp4compile.runtime.quantize import gemm_operand

SHAPES = [  # (name, M tokens, N out, K in)
    ("8B attn q/o", 16384, 4096, 4096),
    ("8B mlp gate/up", 16384, 14336, 4096),
    ("8B mlp down", 16384, 4096, 14336),
    ("1B attn q/o", 16384, 2048, 2048),
    ("1B mlp gate/up", 16384, 5632, 2048),
    ("1B mlp down", 16384, 2048, 5632),
]


def scaled_mm(a, sa, b, sb, out_dtype, fast):
    return torch._scaled_mm(a, b.t(), sa, sb.t(), out_dtype=out_dtype, use_fast_accum=fast)


def error_ratio(out, a, sa, b, sb, rows=256):
    """max |out - float64 product| / (K + 3) 2^-24 sum|a||b||scales|, over the first ``rows`` rows."""
    a, sa, out = a[:rows].double(), sa[:rows].double(), out[:rows].double()
    b, sb = b.double(), gemm.row_scale_as_columns(sb.double())
    ref = (a @ b.mT) * sa * sb
    bound = (a.shape[-1] + 3) * 2.0**-24 * (a.abs() @ b.abs().mT) * (sa * sb).abs()
    return float(((out - ref).abs() / bound.clamp_min(1e-300)).max())


def main():
    args = parser(__doc__, "results/gemm.json").parse_args()
    torch.manual_seed(0)
    rows = []
    for name, m, n, k in SHAPES:
        flop = 2 * m * n * k
        x, w = torch.randn(m, k, device="cuda"), torch.randn(n, k, device="cuda")
        xb, wb = x.bfloat16(), w.bfloat16()
        va, sa = gemm_operand(x, "vector")
        vb, sb = gemm_operand(w, "vector")
        # Backward dX = dY @ W: a [M, N'] gradient in e5m2 against the saved [N', K'] values as a view.
        grad, sg = quantize_fp8_rows(torch.randn(m, n, device="cuda"), torch.float8_e5m2)
        saved, _ = gemm_operand(torch.randn(n, k, device="cuda"), "vector")
        one = torch.ones((), device="cuda")
        assert hopper.eligible(va, vb) == (True, None) and hopper.eligible(grad, saved.mT) == (True, None)
        sa_row, sb_row = sa.contiguous(), sb.contiguous()

        runs = {
            "bf16 mm": lambda: xb @ wb.t(),
            "fp4 fwd": lambda: gemm.scaled_gemm(va, sa, vb, sb, torch.bfloat16),
            "fp8 bwd": lambda: gemm.scaled_gemm(grad, sg, saved.mT, one, torch.bfloat16),
            "fwd fp32-out": lambda: scaled_mm(va, sa_row, vb, sb_row, torch.float32, False),
            "fwd fast-accum": lambda: scaled_mm(va, sa_row, vb, sb_row, torch.bfloat16, True),
        }
        row = {"shape": name, "M": m, "N": n, "K": k}
        for key, fn in runs.items():
            ms = time_ms(fn, warmup=5, iters=30)["median_ms"]
            row[f"{key} TFLOP/s"] = flop / ms / 1e9
        for key in list(runs)[1:]:
            row[f"{key} x"] = row[f"{key} TFLOP/s"] / row["bf16 mm TFLOP/s"]
        row["err fwd"] = error_ratio(gemm.scaled_gemm(va, sa, vb, sb), va, sa, vb, sb)
        row["err fwd fast-accum"] = error_ratio(scaled_mm(va, sa_row, vb, sb_row, torch.float32, True), va, sa, vb, sb)
        row["err bwd"] = error_ratio(gemm.scaled_gemm(grad, sg, saved.mT, one), grad, sg, saved.mT, one)
        row["err bwd fast-accum"] = error_ratio(
            scaled_mm(grad, sg, saved.mT.contiguous(), one.expand(k, 1).contiguous(), torch.float32, True),
            grad, sg, saved.mT, one,
        )
        rows.append(row)
    cols = ["shape", "bf16 mm TFLOP/s", "fp4 fwd TFLOP/s", "fp4 fwd x", "fp8 bwd TFLOP/s", "fp8 bwd x",
            "fwd fp32-out x", "fwd fast-accum x"]
    print_table(rows, cols, "GEMM TFLOP/s (2MNK / median time); x = speed-up over BF16 torch.mm")
    print_table(rows, ["shape", "err fwd", "err fwd fast-accum", "err bwd", "err bwd fast-accum"],
                "max |error| / FP32-accumulation bound vs float64 (<= 1: within FP32 accumulation)")
    write_json(args.out, {"env": environment(), "results": rows})


if __name__ == "__main__":
    main()
