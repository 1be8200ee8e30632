"""Plot training and validation loss of several train_lm.py runs on one figure, and print the final table.

    python examples/plot_runs.py results/*.jsonl --out results/loss.png

The table (markdown) has: recipe, final train loss, final val loss, gap to the bf16 run's val loss in %,
tokens, tokens/s, device.
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


def table(runs: list[dict]) -> str:
    base = next((r["final"]["val_loss"] for r in runs if r["header"]["recipe"] == "bf16" and r["final"]), None)
    lines = ["| recipe | train loss | val loss | gap to bf16 | tokens | tokens/s | device |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        h, f = r["header"], r["final"]
        if f is None:
            lines.append(f"| {h['recipe']} | (unfinished) | | | | | {h['device']} |")
            continue
        gap = f"{100 * (f['val_loss'] - base) / base:+.2f}%" if base else "n/a"
        lines.append(f"| {h['recipe']} | {f['train_loss']:.4f} | {f['val_loss']:.4f} | {gap} | {f['tokens']:,} | "
                     f"{f['tokens_per_s']:,.0f} | {h['device']} |")
    return "\n".join(lines)


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in runs:
        tokens = [s["tokens"] for s in r["steps"]]
        axes[0].plot(tokens, [s["loss"] for s in r["steps"]], label=r["header"]["recipe"])
        axes[1].plot(tokens, [s["val_loss"] for s in r["steps"]], label=r["header"]["recipe"])
    for ax, title in zip(axes, ("training loss", "validation loss")):
        ax.set_title(title)
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy (nats/byte)")
    axes[1].legend()
    fig.suptitle(runs[0]["header"]["preset"] + " preset, " + runs[0]["header"]["device"])
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, help="PNG path (default: loss.png next to the first log)")
    args = p.parse_args(argv)
    runs = [read_run(path) for path in args.logs]
    out = args.out or args.logs[0].with_name("loss.png")
    plot(runs, out)
    print(table(runs))
    print(f"figure: {out}")


if __name__ == "__main__":
    main()
