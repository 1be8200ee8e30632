"""The ~1B Llama of bench_llama.py under FSDP2 on every GPU of one host: BF16 vs fp4compile, tokens/s per
GPU, host time per step and peak memory per GPU, side by side in one run. Each decoder layer is compiled (regional
compilation), then sharded with fully_shard, then the root (torchtitan's order); parameters in BF16,
gradients reduce-scattered in FP32 (MixedPrecisionPolicy), fused AdamW.

    torchrun --nproc_per_node 2 benchmarks/bench_fsdp.py --out results/fsdp.json
    torchrun --nproc_per_node 2 benchmarks/bench_fsdp.py --tiny      # a few-second check on CPU (gloo)

Variants: bf16_inductor; fp4_occ_off (the `dge` recipe); fp4_rotated (the default recipe); fp4_fp8rs
(`dge`, with fp4compile.distributed.FP8ReduceScatter for the gradients); fp4_occ_on (the `paper` recipe,
not run unless asked). On CUDA each step is timed from an idle GPU (CUDA events), and "host ms" is the
median time until the step's call returns: near the step time, the host limits the step.
"""

import os
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import fp4compile
from common import environment, fresh_start, parser, print_table, time_ms, write_json
from fp4compile import FP4Config

VARIANTS = {
    "bf16_inductor": ("inductor", False),
    "fp4_occ_off": (FP4Config.from_recipe_name("dge"), False),
    "fp4_rotated": (FP4Config.from_recipe_name("rotated"), False),
    "fp4_fp8rs": (FP4Config.from_recipe_name("dge"), True),
    "fp4_occ_on": (FP4Config.from_recipe_name("paper"), False),
}


def build(variant: str, tiny: bool, seq: int, device) -> torch.nn.Module:
    torch.manual_seed(0)
    size = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4) if tiny else dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16)
    config = LlamaConfig(vocab_size=32000, num_key_value_heads=size["num_attention_heads"],
                         max_position_embeddings=seq, **size)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config)
    backend, fp8_rs = VARIANTS[variant]
    backend = backend if isinstance(backend, str) else fp4compile.backend(backend)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = model.model.layers
    for i, layer in enumerate(layers):
        layers[i] = torch.compile(layer, backend=backend)
        fully_shard(layers[i], mp_policy=mp)
        if fp8_rs:
            layers[i].set_custom_reduce_scatter(fp4compile.distributed.FP8ReduceScatter())
    return fully_shard(model, mp_policy=mp)


def run(variant, args, device) -> dict:
    model = build(variant, args.tiny, args.seq, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    ids = torch.randint(0, 32000, (args.batch, args.seq), device=device)

    def step():
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    cuda = device.type == "cuda"
    start = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    first = time.perf_counter() - start
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        t = time_ms(step, warmup=args.warmup, iters=args.iters)
        ms, host, peak = t["median_ms"], t["host_ms"], torch.cuda.max_memory_allocated() / 2**30
    else:  # gloo on CPU: every step is synchronous, so its wall time is its host time
        for _ in range(args.warmup):
            step()
        start = time.perf_counter()
        for _ in range(args.iters):
            step()
        ms = host = (time.perf_counter() - start) / args.iters * 1e3
        peak = float("nan")
    return {"variant": variant, "step ms": ms, "host ms": host, "tokens/s per GPU": args.batch * args.seq / ms * 1e3,
            "peak GiB per GPU": peak, "first step s": first}


def main():
    p = parser(__doc__, "results/fsdp.json")
    p.add_argument("--variants", default="bf16_inductor,fp4_occ_off,fp4_rotated,fp4_fp8rs",
                   help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--batch", type=int, default=8, help="sequences per GPU (bench_llama.py's batch on one GPU)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="a 2-layer model, for checking the script on CPU")
    args = p.parse_args()
    if args.tiny:
        args.seq, args.batch, args.warmup, args.iters = 64, 2, 1, 2
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    rows = []
    for variant in args.variants.split(","):
        fresh_start()
        rows.append(run(variant, args, device))
    base = next(r for r in rows if r["variant"] == "bf16_inductor")
    for r in rows:
        r["vs bf16"] = r["tokens/s per GPU"] / base["tokens/s per GPU"]
        r["memory vs bf16"] = r["peak GiB per GPU"] / base["peak GiB per GPU"]
    if rank == 0:
        world = dist.get_world_size()
        title = f"~1B Llama, FSDP2 on {world} {'GPUs' if cuda else 'CPU processes'}, seq {args.seq}, batch {args.batch} per GPU"
        print_table(rows, ["variant", "step ms", "host ms", "tokens/s per GPU", "vs bf16", "peak GiB per GPU",
                           "memory vs bf16", "first step s"], title)
        write_json(args.out, {"env": environment() if cuda else {"device": "cpu"}, "world": world,
                              "args": vars(args), "results": rows})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
