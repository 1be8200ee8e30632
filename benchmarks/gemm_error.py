"""The forward GEMM's error per recipe: ||Y - X W^T|| / ||X W^T|| for Y = fp4_matmul_nt(X, W) in BF16
against the float64 product, on activations with and without outliers, the largest over three seeds.
What each recipe's deviation from the exact compensation (`paper`, with exact quantiles) costs, as a
number. Numerics only: every path multiplies the same quantized values exactly (the CPU's emulation
gives the GPU's numbers), so it runs anywhere.

    PYTHONPATH=. python benchmarks/gemm_error.py --out results/gemm_error.json
"""

import torch

from common import environment, parser, print_table, write_json
from fp4compile import FP4Config
from fp4compile.runtime.matmul import MatmulSpec, fp4_matmul_nt

RECIPES = {
    "direct_cast": FP4Config.from_recipe_name("direct_cast"),
    "paper (exact quantiles)": FP4Config.from_recipe_name("paper", occ_sample=None),
    "paper": FP4Config.from_recipe_name("paper"),
    "rotated": FP4Config.from_recipe_name("rotated"),
    "rotated, rotation=32": FP4Config.from_recipe_name("rotated", rotation=32),
}


def activation(kind: str, m: int, k: int, g: torch.Generator) -> torch.Tensor:
    """[m, k] activations: "gaussian"; "channels": 8 channels 20x the others (as in trained LLMs);
    "massive": 4 channels 100x and 16 tokens 30x; "heavy": Student-t with 3 degrees of freedom."""
    if kind == "heavy":
        return torch.randn(m, k, generator=g) / (torch.randn(m, k, 3, generator=g).square().mean(-1)).sqrt()
    x = torch.randn(m, k, generator=g)
    if kind == "channels":
        x[:, torch.randperm(k, generator=g)[:8]] *= 20
    if kind == "massive":
        x[:, torch.randperm(k, generator=g)[:4]] *= 100
        x[torch.randperm(m, generator=g)[:16]] *= 30
    return x


def relative_error(x: torch.Tensor, w: torch.Tensor, config: FP4Config) -> float:
    exact = x.double() @ w.double().mT
    y = fp4_matmul_nt(x.bfloat16(), w.bfloat16(), None, MatmulSpec(config))
    return float((y.double() - exact).norm() / exact.norm())


def main():
    p = parser(__doc__, "results/gemm_error.json")
    p.add_argument("--shape", type=int, nargs=3, default=(2048, 4096, 1024), metavar=("M", "K", "N"))
    args = p.parse_args()
    m, k, n = args.shape
    rows = []
    for kind in ("gaussian", "channels", "massive", "heavy"):
        errors = {name: 0.0 for name in ("bf16", *RECIPES)}
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            x, w = activation(kind, m, k, g), torch.randn(n, k, generator=g) * 0.02
            exact = x.double() @ w.double().mT
            bf16 = float(((x.bfloat16() @ w.bfloat16().mT).double() - exact).norm() / exact.norm())
            errors["bf16"] = max(errors["bf16"], bf16)
            for name, config in RECIPES.items():
                errors[name] = max(errors[name], relative_error(x, w, config))
        rows.append({"activation": kind, **errors})
    print_table(rows, ["activation", "bf16", *RECIPES], f"forward GEMM relative error, {m}x{k}x{n}, max of 3 seeds")
    write_json(args.out, {"env": environment(), "shape": [m, k, n], "results": rows})


if __name__ == "__main__":
    main()
