"""What a Llama training step saves for its backward, per variant: the bytes of every tensor autograd
keeps between forward and backward (parameters left out), split by dtype. This is the activation memory
that peak memory grows with; unlike peak memory it is exact and the same on any device, so it runs on a
CPU too. Defaults: bench_llama.py's ~1B model scaled down with its tokens-per-hidden-unit ratio kept
(hidden 256, intermediate 704, 2 layers, batch 4 x seq 512 = 8 tokens per hidden unit, as 16384 / 2048).
Each decoder layer is compiled (regional compilation, as in bench_llama.py).

    PYTHONPATH=. python benchmarks/bench_saved.py --out results/saved.json
"""

from collections import Counter

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from common import model_parser, prepare, print_table, report


def saved_bytes(model, ids) -> Counter:
    """Bytes of the distinct tensors saved for backward by one forward, by dtype, parameters left out."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes = Counter()
    for ptr, t in saved.items():
        if ptr not in params:
            sizes[str(t.dtype).removeprefix("torch.")] += t.untyped_storage().nbytes()
    return sizes


def main():
    p = model_parser(__doc__, "results/saved.json")
    p.set_defaults(variants="bf16_eager,bf16_inductor,fp4_occ_off,fp4_occ_on")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    config = LlamaConfig(vocab_size=512, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=args.seq)
    config._attn_implementation = "sdpa"
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=args.device)
    rows = []
    for variant in args.variants.split(","):
        torch._dynamo.reset()
        torch.manual_seed(0)
        with torch.device(args.device):
            model = LlamaForCausalLM(config).bfloat16()
        backend = prepare(model, variant, args.fp4_options)
        if backend is not None:
            for layer in model.model.layers:
                layer.compile(backend=backend)
        saved_bytes(model, ids)  # compile first: the count is of the second step
        sizes = saved_bytes(model, ids)
        rows.append({"variant": variant, "saved MiB": sum(sizes.values()) / 2**20,
                     **{f"{k} MiB": v / 2**20 for k, v in sorted(sizes.items())}})
    base = next((r for r in rows if r["variant"] == "bf16_inductor"), None)
    for r in rows:
        if base:
            r["vs bf16 inductor"] = r["saved MiB"] / base["saved MiB"]
    cols = ["variant", "saved MiB", "vs bf16 inductor", *sorted({k for r in rows for k in r if k.endswith(" MiB")
                                                             and k != "saved MiB"})]
    title = (f"saved for backward: Llama, hidden {args.hidden}, {args.layers} layers, batch {args.batch} x "
             f"seq {args.seq}, on {args.device}")
    print_table(rows, cols, title)
    report(args, rows, {})


if __name__ == "__main__":
    main()
