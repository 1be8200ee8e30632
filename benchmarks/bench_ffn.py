"""A Llama-3-8B SwiGLU FFN block (d=4096, hidden=14336, 16384 tokens, BF16), forward + backward, side by
side: BF16 eager, BF16 torch.compile (inductor), fp4compile's paper recipe (DGE, E5M2 gradients) with
OCC off and on, the paper recipe in NVFP4, the unbiased NVFP4 recipes (nvidia_nvfp4, quartet2) and
torchao float8 where importable (``--variants`` picks; benchmarks/common.py lists them). The forward is
also timed alone, so the backward's cost is the difference. Ratios are against BF16 inductor; the top GPU
kernels of each compiled variant come from torch.profiler, so a missed target can be read off where the
time goes.

    PYTHONPATH=. python benchmarks/bench_ffn.py --out results/ffn.json
"""

import time

import torch
import torch.nn.functional as F

from common import model_parser, prepare, print_table, report, short_error, time_ms, top_kernels


class SwiGLU(torch.nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate = torch.nn.Linear(dim, hidden, bias=False)
        self.up = torch.nn.Linear(dim, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def main():
    p = model_parser(__doc__, "results/ffn.json")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=14336)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    x = torch.randn(args.tokens, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(args.tokens, args.dim, device="cuda", dtype=torch.bfloat16)
    flop = 3 * 2 * 3 * args.tokens * args.dim * args.hidden  # 3 GEMMs forward, 6 backward

    rows, profiles = [], {}
    for variant in args.variants.split(","):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = SwiGLU(args.dim, args.hidden).cuda().bfloat16()
        backend = prepare(model, variant, args.fp4_options)
        fn = torch.compile(model, backend=backend) if backend else model

        def step():
            x.grad = None
            model.zero_grad(set_to_none=True)
            fn(x).backward(dy)

        def forward():
            fn(x)

        try:
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
        except Exception as e:  # a variant that fails to compile or run is reported, not fatal
            rows.append({"variant": variant, "error": short_error(e)})
            continue
        first_s = time.perf_counter() - start
        slow = variant in ("fp4_occ_on", "nvidia_nvfp4", "quartet2")
        torch.cuda.reset_peak_memory_stats()
        t = time_ms(step, warmup=1 if slow else 3, iters=3 if slow else args.iters)
        fwd = time_ms(forward, warmup=1, iters=3 if slow else args.iters)["median_ms"]
        rows.append({"variant": variant, "ms": t["median_ms"], "fwd ms": fwd, "bwd ms": t["median_ms"] - fwd,
                     "spread ms": t["max_ms"] - t["min_ms"],
                     "TFLOP/s": flop / t["median_ms"] / 1e9, "peak GiB": torch.cuda.max_memory_allocated() / 2**30,
                     "first call s": first_s})
        if variant != "bf16_eager":
            profiles[variant] = top_kernels(step)
    base = next((r["ms"] for r in rows if r["variant"] == "bf16_inductor"), None)
    for r in rows:
        if base and "ms" in r:
            r["vs bf16 inductor"] = base / r["ms"]
    title = f"SwiGLU FFN fwd+bwd, {args.tokens} tokens, d={args.dim}, hidden={args.hidden}"
    columns = ["variant", "ms", "fwd ms", "bwd ms", "spread ms", "TFLOP/s", "vs bf16 inductor", "peak GiB",
               "first call s", "error"]
    print_table(rows, columns, title)
    report(args, rows, profiles)


if __name__ == "__main__":
    main()
