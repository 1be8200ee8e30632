"""A full training step (forward, loss, backward, AdamW) of a ~1B HF LlamaForCausalLM built from config
(hidden 2048, 16 layers, intermediate 5632, 16 heads, vocab 32000, BF16 weights), seq 2048, batch 8:
tokens/s, host time and peak memory for BF16 eager, BF16 torch.compile (inductor), fp4compile's
recipes and torchao float8 (rowwise, tensorwise) where importable (``--variants``). Compiled variants
compile each decoder layer (regional compilation, as torchtitan does: one compile serves all 16
layers); embedding, final norm, lm_head and loss run eagerly in all of them. A variant that runs out
of memory at batch 8 is retried at batch 4, and its row says so. Per variant, one step can be
profiled by GPU kernel (``--profile``), by host operator (``--host-profile``) and by the blocks live at
its memory peak (``--peak-trace``).

    PYTHONPATH=. python benchmarks/bench_llama.py --out results/llama.json
"""

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from common import (fresh_start, model_parser, peak_trace, prepare, print_table, report, short_error, time_ms,
                    top_host_ops, top_kernels)


def build(variant, seq, fp4_options, mode=None):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=seq,
    )
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).bfloat16()
    backend = prepare(model, variant, fp4_options)
    if backend is not None:
        for layer in model.model.layers:
            layer.compile(backend=backend, mode=mode)
    return model


# The reports a variant can ask for (--profile, --host-profile, --peak-trace): their key in the run's
# profiles, and what makes them from one step.
REPORTS = {"profile": ("{}", top_kernels), "host": ("{} host", top_host_ops), "peak": ("{} memory", peak_trace)}


def run(variant, batch, seq, iters, reports, fp4_options, mode=None):
    model = build(variant, seq, fp4_options, mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")

    def step():
        torch.compiler.cudagraph_mark_step_begin()  # under CUDA graphs (--mode): last step's outputs are free
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - start
    slow = variant == "fp4_occ_on"
    torch.cuda.reset_peak_memory_stats()
    t = time_ms(step, warmup=1, iters=2 if slow else iters)
    row = {"variant": variant, "batch": batch, "step ms": t["median_ms"], "spread ms": t["max_ms"] - t["min_ms"],
           "host ms": t["host_ms"], "tokens/s": batch * seq / t["median_ms"] * 1e3,
           "peak GiB": torch.cuda.max_memory_allocated() / 2**30,
           "first step s": first_s,
           "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}
    return row, {REPORTS[r][0].format(variant): REPORTS[r][1](step) for r in reports}


def main():
    p = model_parser(__doc__, "results/llama.json")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--mode", default=None, help="torch.compile's mode for every compiled variant, e.g. "
                   "reduce-overhead (CUDA graphs)")
    p.add_argument("--profile", default="fp4_occ_off,bf16_inductor", help="variants to profile one step of")
    p.add_argument("--host-profile", default="", help="variants whose host time of one step to profile by op")
    args = p.parse_args()
    rows, profiles = [], {}
    asked = {"profile": args.profile, "host": args.host_profile, "peak": args.peak_trace}
    for variant in args.variants.split(","):
        reports = [r for r, variants in asked.items() if variant in variants.split(",")]
        batch = args.batch
        while True:
            fresh_start()
            torch._dynamo.utils.counters.clear()
            try:
                row, extra = run(variant, batch, args.seq, args.iters, reports, args.fp4_options, args.mode)
                break
            except torch.OutOfMemoryError:
                if batch == 1:
                    row, extra = {"variant": variant, "batch": "OOM"}, {}
                    break
                batch //= 2
                print(f"{variant}: out of memory, retrying at batch {batch}")
            except Exception as e:  # a variant that fails to compile or run is reported, not fatal
                row, extra = {"variant": variant, "note": short_error(e)}, {}
                break
        if batch != args.batch:
            row["note"] = f"batch {args.batch} ran out of memory"
        rows.append(row)
        profiles.update(extra)
    base = next((r for r in rows if r["variant"] == "bf16_inductor" and "tokens/s" in r), None)
    for r in rows:
        if base and "tokens/s" in r:
            r["vs bf16 inductor"] = r["tokens/s"] / base["tokens/s"]
            r["memory vs bf16 inductor"] = r["peak GiB"] / base["peak GiB"]
    title = f"~1B Llama training step, seq {args.seq}, batch {args.batch} (unless noted)"
    if args.mode:
        title += f", mode {args.mode!r}"
    cols = ["variant", "batch", "step ms", "spread ms", "host ms", "tokens/s", "vs bf16 inductor", "peak GiB",
            "memory vs bf16 inductor", "first step s", "graphs", "note"]
    print_table(rows, cols, title)
    report(args, rows, profiles)


if __name__ == "__main__":
    main()
