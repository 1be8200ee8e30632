"""Plot the validation loss of several train_lm.py runs on one figure, and print the final table.

    python examples/plot_runs.py results/*.jsonl --out results/loss.png

The table (markdown) has: recipe (with an ablation run's overrides), seed, final train loss, final val
loss, gap to the val loss of the bf16 run with the same seed in %, tokens, tokens/s, device.
"""

import argparse
import json
from pathlib import Path


def read_run(path: Path) -> dict:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    header = next(r for r in records if r["kind"] == "header")
    steps = [r for r in records if r["kind"] == "step"]
    final = next((r for r in records if r["kind"] == "final"), None)
    return dict(header=header, steps=steps, final=final)


def label(header: dict) -> str:
    """The recipe, with any FP4Config overrides of an ablation run (e.g. "paper dge_k=3")."""
    return " ".join([header["recipe"], *(f"{k}={v}" for k, v in header.get("overrides", {}).items())])


def table(runs: list[dict]) -> str:
    """Final losses; each run's gap is to the bf16 run of the same seed (else the first bf16 run)."""
    bf16 = {r["header"]["seed"]: r["final"]["val_loss"] for r in runs if r["header"]["recipe"] == "bf16" and r["final"]}
    lines = ["| recipe | seed | train loss | val loss | gap to bf16 | tokens | tokens/s | device |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        h, f = r["header"], r["final"]
        if f is None:
            lines.append(f"| {label(h)} | {h['seed']} | (unfinished) | | | | | {h['device']} |")
            continue
        base = bf16.get(h["seed"], next(iter(bf16.values()), None))
        gap = f"{100 * (f['val_loss'] - base) / base:+.2f}%" if base else "n/a"
        lines.append(f"| {label(h)} | {h['seed']} | {f['train_loss']:.4f} | {f['val_loss']:.4f} | {gap} | "
                     f"{f['tokens']:,} | {f['tokens_per_s']:,.0f} | {h['device']} |")
    return "\n".join(lines)


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Left: the whole run on a log scale; right: validation loss over the second half, where recipes
    # differ by a few percent and the full range would flatten them into one line.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    several_seeds = len({r["header"]["seed"] for r in runs}) > 1
    for r in runs:
        steps, name = r["steps"], label(r["header"]) + (f" seed {r['header']['seed']}" if several_seeds else "")
        axes[0].plot([s["tokens"] for s in steps], [s["val_loss"] for s in steps], label=name)
        late = [s for s in steps if s["tokens"] >= steps[-1]["tokens"] / 2]
        axes[1].plot([s["tokens"] for s in late], [s["val_loss"] for s in late], marker="o", label=name)
    axes[0].set_yscale("log")
    for ax, title in zip(axes, ("validation loss (log scale)", "validation loss, second half")):
        ax.set_title(title)
        ax.set_xlabel("tokens")
        ax.set_ylabel("cross-entropy (nats/byte)")
        ax.grid(alpha=0.3)
    axes[1].legend()
    devices = sorted({r["header"]["device"] for r in runs})  # runs may come from several machines
    fig.suptitle(runs[0]["header"]["preset"] + " preset, " + " and ".join(devices))
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", type=Path, help="train_lm.py JSON-lines logs")
    p.add_argument("--out", type=Path, help="PNG path (default: loss.png next to the first log)")
    args = p.parse_args(argv)
    runs = [read_run(path) for path in args.logs]
    out = args.out or args.logs[0].with_name("loss.png")
    plot(runs, out)
    print(table(runs))
    print(f"figure: {out}")


if __name__ == "__main__":
    main()
