"""A mixture-of-experts layer, forward + backward in BF16, side by side: BF16 eager, BF16 torch.compile
(inductor) and fp4compile's paper recipe with OCC off and on (``--variants``; benchmarks/common.py lists
them). The layer is transformers' ``grouped_mm`` experts written out: a router (kept in BF16 by the fp4
backend), tokens sorted by expert, and two grouped GEMMs (``torch._grouped_mm``) over 3-D expert
weights with a SwiGLU between them. Shapes (``--shape``): Qwen3-30B-A3B's layer (hidden 2048, 128
experts of intermediate 768, top-8) or Mixtral-8x7B's (hidden 4096, 8 experts of 14336, top-2). Ratios
are against BF16 inductor; the top GPU kernels of each compiled variant come from torch.profiler.

The fp4 forward GEMMs run on FP8 tensor cores (torch._scaled_grouped_mm, sm_90 / sm_100); its backward
GEMMs too only for dX with ``--grad-dtype float8_e4m3fn`` (the kernel takes E4M3 only); the rest is the
FP32 per-expert emulation (runtime/grouped.py), which the numbers show.

    PYTHONPATH=. python benchmarks/bench_moe.py --out results/moe.json
"""

import functools

import torch
import torch.nn.functional as F

import fp4compile
from common import VARIANTS, fresh_start, model_parser, prepare, report_layer, time_layer
from fp4compile import FP4Config

SHAPES = {  # hidden, experts, intermediate, top-k
    "qwen3": (2048, 128, 768, 8),
    "mixtral": (4096, 8, 14336, 2),
}


class MoE(torch.nn.Module):
    def __init__(self, hidden, experts, intermediate, top_k):
        super().__init__()
        self.gate = torch.nn.Linear(hidden, experts, bias=False)
        self.gate_up_proj = torch.nn.Parameter(torch.randn(experts, 2 * intermediate, hidden) / hidden**0.5)
        self.down_proj = torch.nn.Parameter(torch.randn(experts, hidden, intermediate) / intermediate**0.5)
        self.top_k = top_k

    def forward(self, x):
        weights, ids = torch.topk(torch.softmax(self.gate(x), -1, dtype=torch.float32), self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        ids, perm = torch.sort(ids.reshape(-1))
        experts = self.gate_up_proj.shape[0]
        counts = torch.histc(ids.float(), bins=experts, min=0, max=experts - 1)
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        h = torch._grouped_mm(x[perm // self.top_k], self.gate_up_proj.transpose(-2, -1), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(-2, -1), offs=offs)
        y = y * weights.reshape(-1)[perm, None].to(y.dtype)
        out = torch.empty_like(y)
        out[perm] = y
        return out.view(x.shape[0], self.top_k, -1).sum(1)


def _backend(model, variant, args):
    """common.prepare's backend, with --grad-dtype in the fp4 variants' config."""
    config = VARIANTS.get(variant)
    if not (args.grad_dtype and isinstance(config, FP4Config)):
        return prepare(model, variant, args.fp4_options)
    fp4 = fp4compile.backend(config.replace(grad_dtype=args.grad_dtype))
    return functools.partial(fp4, options=args.fp4_options) if args.fp4_options else fp4


def main():
    p = model_parser(__doc__, "results/moe.json")
    p.set_defaults(variants="bf16_eager,bf16_inductor,fp4_occ_off,fp4_occ_on")
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--grad-dtype", default=None,
                   help="the fp4 variants' grad_dtype (default: the recipe's float8_e5m2)")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    hidden, experts, intermediate, top_k = SHAPES[args.shape]
    x = torch.randn(args.tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(args.tokens, hidden, device="cuda", dtype=torch.bfloat16)
    flop = 3 * 2 * args.tokens * top_k * hidden * 3 * intermediate  # 2 grouped GEMMs (3I wide) fwd, twice that bwd

    rows, profiles = [], {}
    for variant in args.variants.split(","):
        model = fn = None  # the previous variant's, collected by fresh_start
        fresh_start()
        torch.manual_seed(0)
        model = MoE(hidden, experts, intermediate, top_k).cuda().bfloat16()
        backend = _backend(model, variant, args)
        fn = torch.compile(model, backend=backend) if backend else model

        row, profile = time_layer(variant, fn, model, x, dy, flop, args.iters)
        rows.append(row)
        if profile:
            profiles[variant] = profile
    report_layer(args, rows, profiles, f"MoE layer ({args.shape}: hidden {hidden}, {experts} experts of "
                 f"{intermediate}, top-{top_k}) fwd+bwd, {args.tokens} tokens")

if __name__ == "__main__":
    main()
