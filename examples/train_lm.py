"""Train a small LLaMA-style causal LM from scratch with FP4 matmuls, on real text found on this machine.

    python examples/train_lm.py --preset smoke --recipe paper          # ~10 minutes on a 2-core CPU
    python examples/train_lm.py --preset base --recipe bf16 --tokens 100e6   # on a GPU
    torchrun --nproc_per_node 2 examples/train_lm.py --preset base --recipe paper [--fsdp] [--fp8-comm]

Model: RMSNorm, rotary position embeddings, SwiGLU, untied input embedding and output head (the head
runs eagerly, outside the compiled blocks, so it stays in high precision, as in the paper's setup). Byte-level tokens.
Data: the Python source files of this interpreter's standard library and installed packages (or --data
PATH), split by file into train/validation deterministically. Precision by --recipe: "bf16" is plain
torch.compile; every other name is an FP4Config recipe run through fp4compile's backend. Each run writes
a JSON-lines log (one record per logged step and a final one) to RESULTS/<run name>.jsonl.
"""

import argparse
import json
import math
import os
import sysconfig
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import fp4compile

PRESETS = {
    # d_model, layers, heads, ffn hidden, context, batch, default tokens
    "smoke": dict(dim=64, layers=2, heads=4, hidden=192, seq=64, batch=8, tokens=40_000),
    "small": dict(dim=512, layers=8, heads=8, hidden=1792, seq=512, batch=32, tokens=20e6),
    "base": dict(dim=768, layers=12, heads=12, hidden=3072, seq=1024, batch=32, tokens=100e6),
}
VOCAB = 256  # bytes
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")


# ---- data -------------------------------------------------------------------------------------------

def corpus_files(data: str | None) -> list[Path]:
    """Text files in a stable order: --data (a file or a directory), else the interpreter's stdlib and
    installed packages' .py files."""
    roots = [Path(data)] if data else sorted({Path(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib")})
    files = []
    for root in roots:
        if root.is_file():
            files.append(root)
        else:
            suffixes = TEXT_SUFFIXES if data else (".py",)
            files += sorted(p for p in root.rglob("*") if p.suffix in suffixes and p.is_file())
    if not files:
        raise SystemExit(f"no text files found under {roots}")
    return files


def load_corpus(data: str | None, val_percent: int = 2):
    """(train bytes, validation bytes) as uint8 tensors; a file goes to validation when the CRC32 of its
    file name falls in the last val_percent of 100 buckets, so the split is by file and repeatable."""
    train, val = bytearray(), bytearray()
    for path in corpus_files(data):
        try:
            text = path.read_bytes()
        except OSError:
            continue
        key = zlib.crc32(path.name.encode()) % 100
        (val if key >= 100 - val_percent else train).extend(text + b"\n")
    return torch.frombuffer(train, dtype=torch.uint8), torch.frombuffer(val, dtype=torch.uint8)


def batches(data: torch.Tensor, batch: int, seq: int, seed: int):
    """Endless random windows; the same seed gives the same order for every recipe."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
        window = torch.stack([data[s : s + seq + 1] for s in start.tolist()]).long()
        yield window[:, :-1], window[:, 1:]


# ---- model ------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    dim: int
    layers: int
    heads: int
    hidden: int
    seq: int
    vocab: int = VOCAB


def rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding of [batch, heads, seq, head_dim], rotating pairs (i, i + head_dim / 2)."""
    d = x.shape[-1]
    freqs = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)[:, None] * freqs
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.heads = c.heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(c.dim), nn.RMSNorm(c.dim)
        self.qkv = nn.Linear(c.dim, 3 * c.dim, bias=False)
        self.proj = nn.Linear(c.dim, c.dim, bias=False)
        self.gate_up = nn.Linear(c.dim, 2 * c.hidden, bias=False)
        self.down = nn.Linear(c.hidden, c.dim, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class LM(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(c.vocab, c.dim)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = nn.RMSNorm(c.dim)
        self.lm_head = nn.Linear(c.dim, c.vocab, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, tokens, targets):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


# ---- training ---------------------------------------------------------------------------------------

def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def compile_model(model: nn.Module, recipe: str, **overrides):
    """Compile each block (regional compilation, as torchtitan does: the blocks share one compiled graph,
    so compile time does not grow with depth); embedding, final norm, head and loss run eagerly.
    ``overrides`` replace fields of the recipe's FP4Config (e.g. dge_k=3)."""
    if recipe == "bf16":
        backend = "inductor"
    else:
        backend = fp4compile.backend(fp4compile.FP4Config.from_recipe_name(recipe, **overrides))
    for i, block in enumerate(model.blocks):
        model.blocks[i] = torch.compile(block, backend=backend)
    return model


def setup_distributed() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) in a plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo")
    return dist.get_rank(), world


def parallelize(model: nn.Module, fsdp: bool, fp8_comm: bool) -> nn.Module:
    """Under torchrun: FSDP2 (each compiled block sharded, then the root) or DDP; ``fp8_comm`` sends the
    gradients in FP8 (FSDP2's reduce-scatter / DDP's all-reduce). Blocks are compiled before sharding,
    as torchtitan orders it."""
    if fsdp:
        for block in model.blocks:
            fully_shard(block)
            if fp8_comm:
                block.set_custom_reduce_scatter(fp4compile.distributed.FP8ReduceScatter())
        return fully_shard(model)
    ddp = DDP(model)
    if fp8_comm:
        ddp.register_comm_hook(None, fp4compile.distributed.fp8_allreduce_hook)
    return ddp


@torch.no_grad()
def evaluate(model, val: torch.Tensor, c: ModelConfig, batch: int, iters: int, autocast) -> float:
    model.eval()
    losses = []
    for i, (x, y) in zip(range(iters), batches(val, batch, c.seq, seed=1234)):
        with autocast:
            losses.append(model(x.to(DEVICE), y.to(DEVICE)).item())
    model.train()
    return sum(losses) / len(losses)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="smoke")
    p.add_argument("--recipe", default="rotated", help="bf16, or an FP4Config recipe: " + ", ".join(fp4compile.RECIPES))
    p.add_argument("--tokens", type=float, help="training tokens (default: the preset's)")
    p.add_argument("--batch", type=int, help="sequences per step (default: the preset's)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up as a fraction of the steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="a text file or a directory of text files instead of the default corpus")
    p.add_argument("--eval-every", type=int, default=0, help="steps between validation evals (default: 10 per run)")
    p.add_argument("--eval-iters", type=int, default=20)
    p.add_argument("--results", default="results", help="folder for the JSON-lines logs")
    p.add_argument("--name", help="run name (default: PRESET-RECIPE-seedN)")
    p.add_argument("--optim", choices=("adamw", "fp8adamw"), default="adamw",
                   help="fp8adamw: fp4compile.optim.AdamW, moments in FP8/FP16")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 instead of DDP")
    p.add_argument("--fp8-comm", action="store_true", help="under torchrun: communicate gradients in FP8")
    p.add_argument("--dge-k", type=float, help="override the recipe's FP4Config.dge_k (ablation)")
    p.add_argument("--occ-quantile", type=float, help="override the recipe's FP4Config.occ_quantile (ablation)")
    args = p.parse_args(argv)
    if args.recipe != "bf16" and args.recipe not in fp4compile.RECIPES:
        p.error(f"unknown recipe {args.recipe!r}; choose bf16 or one of {sorted(fp4compile.RECIPES)}")
    overrides = {k: v for k, v in (("dge_k", args.dge_k), ("occ_quantile", args.occ_quantile)) if v is not None}
    if overrides and args.recipe == "bf16":
        p.error("--dge-k and --occ-quantile apply to FP4 recipes, not bf16")

    rank, world = setup_distributed()
    preset = PRESETS[args.preset]
    batch = args.batch or preset["batch"]  # per process: the global batch is batch * world
    tokens = int(args.tokens or preset["tokens"])
    c = ModelConfig(**{k: preset[k] for k in ("dim", "layers", "heads", "hidden", "seq")})
    step_tokens = batch * c.seq * world
    steps = max(1, tokens // step_tokens)
    eval_every = args.eval_every or max(1, steps // 10)

    torch.manual_seed(args.seed)
    train, val = load_corpus(args.data)
    model = LM(c).to(DEVICE)
    n_params = sum(p.numel() for p in model.parameters())
    compiled = compile_model(model, args.recipe, **overrides)
    if world > 1:
        compiled = parallelize(compiled, args.fsdp, args.fp8_comm)
    hyper = dict(lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    if args.optim == "fp8adamw":
        opt = fp4compile.optim.AdamW(model.parameters(), **hyper)
    else:
        opt = torch.optim.AdamW(model.parameters(), **hyper, fused=DEVICE == "cuda")
    autocast = torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda")
    name = args.name or f"{args.preset}-{args.recipe}-seed{args.seed}"
    out = Path(args.results) / f"{name}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = dict(run=name, recipe=args.recipe, preset=args.preset, model=asdict(c), params=n_params, batch=batch,
                  world=world, parallel="fsdp2" if args.fsdp and world > 1 else "ddp" if world > 1 else None,
                  optim=args.optim, overrides=overrides, steps=steps, tokens=steps * step_tokens, lr=args.lr,
                  seed=args.seed,
                  device=_device_name(), corpus_tokens=dict(train=train.numel(), val=val.numel()),
                  torch=torch.__version__)
    log = _Log(out if rank == 0 else None)
    log.write(dict(kind="header", **header))

    data = batches(train, batch, c.seq, args.seed + 1000 * rank)  # rank 0 draws what one process draws
    start = time.perf_counter()
    seen = 0
    train_time = 0.0  # step time after step 0 (which compiles), evaluation excluded
    for step in range(steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.lr, max(1, int(args.warmup * steps)))
        x, y = next(data)
        with autocast:
            loss = compiled(x.to(DEVICE), y.to(DEVICE))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += step_tokens
        last = step == steps - 1
        if step % eval_every == 0 or last:
            loss_value = loss.item()  # syncs, so the step time below is real
        if step > 0:
            train_time += time.perf_counter() - t0
        if step % eval_every == 0 or last:
            speed = (seen - step_tokens) / train_time if train_time else 0.0
            record = dict(kind="step", step=step, tokens=seen, loss=loss_value, grad_norm=grad_norm.item(),
                          lr=opt.param_groups[0]["lr"], tokens_per_s=speed)
            record["val_loss"] = evaluate(compiled, val, c, batch, args.eval_iters, autocast)
            log.write(record, f"step {step:6d}/{steps}  loss {record['loss']:.4f}  val {record['val_loss']:.4f}  "
                              f"{record['tokens_per_s']:,.0f} tok/s")
    log.write(dict(kind="final", train_loss=record["loss"], val_loss=record["val_loss"], tokens=seen,
                   tokens_per_s=record["tokens_per_s"], seconds=time.perf_counter() - start))
    if world > 1:
        dist.destroy_process_group()
    return record


class _Log:
    """The JSON-lines log and the console lines; a no-op on ranks other than 0."""

    def __init__(self, path: Path | None):
        self.file = path.open("w") if path else None

    def write(self, record: dict, line: str | None = None) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        print(line or json.dumps(record), flush=True)


def _device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"


if __name__ == "__main__":
    main()
