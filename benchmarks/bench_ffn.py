"""A Llama-3-8B SwiGLU FFN block (d=4096, hidden=14336, 16384 tokens, BF16), forward + backward, side by
side: BF16 eager, BF16 torch.compile (inductor), fp4compile's paper recipe (DGE, E5M2 gradients) with
OCC off and on, the paper recipe in NVFP4, the unbiased NVFP4 recipes (nvidia_nvfp4, quartet2) and
torchao float8 where importable (``--variants`` picks; benchmarks/common.py lists them). The forward is
also timed alone, so the backward's cost is the difference. Ratios are against BF16 inductor; the top GPU
kernels of each compiled variant come from torch.profiler, so a missed target can be read off where the
time goes.

    PYTHONPATH=. python benchmarks/bench_ffn.py --out results/ffn.json
"""


import torch
import torch.nn.functional as F

from common import fresh_start, model_parser, peak_trace, prepare, report_layer, time_layer


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
        model = fn = None  # the previous variant's, collected by fresh_start
        fresh_start()
        torch.manual_seed(0)
        model = SwiGLU(args.dim, args.hidden).cuda().bfloat16()
        backend = prepare(model, variant, args.fp4_options)
        fn = torch.compile(model, backend=backend) if backend else model
        slow = variant in ("fp4_occ_on", "nvidia_nvfp4", "quartet2")
        row, profile = time_layer(variant, fn, model, x, dy, flop, args.iters, slow)
        rows.append(row)
        if profile:
            profiles[variant] = profile
        if variant in args.peak_trace.split(",") and "error" not in row:
            profiles[f"{variant} memory"] = peak_trace(lambda: fn(x).backward(dy))
    report_layer(args, rows, profiles, f"SwiGLU FFN fwd+bwd, {args.tokens} tokens, d={args.dim}, hidden={args.hidden}")


if __name__ == "__main__":
    main()
