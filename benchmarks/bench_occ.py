"""OCC's compensation R @ W^T, where R = X - clamp(X) holds the ~2% of X beyond the 0.99 / 0.01 quantiles:
the dense BF16 GEMM fp4compile runs, against cuSPARSE's CSR SpMM of the same R (its conversion from
dense included and apart), and how many of R's columns hold an outlier (what a gathered-column product
would have to gather). Activations: Gaussian, as the FFN benchmark's, and Gaussian with a few channels
scaled up, as in trained LLMs. Each row checks the sparse product against the dense one.

    PYTHONPATH=. python benchmarks/bench_occ.py --out results/occ.json
"""

import torch

from common import environment, parser, print_table, time_ms, write_json
from fp4compile.runtime.occ import occ_clamp

SHAPES = {"Llama-8B FFN up": (16384, 4096, 14336), "Llama-8B FFN down": (16384, 14336, 4096),
          "1B FFN up": (16384, 2048, 5632)}


def activation(m, k, channels: bool, generator):
    x = torch.randn(m, k, device="cuda", generator=generator)
    if channels:  # 8 outlier channels, 20x the others' scale
        x[:, torch.randperm(k, device="cuda", generator=generator)[:8]] *= 20
    return x.bfloat16()


def main():
    args = parser(__doc__, "results/occ.json").parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, (m, k, n) in SHAPES.items():
        w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
        for channels in (False, True):
            x = activation(m, k, channels, g)
            r = occ_clamp(x, 0.99, 65536)[1].bfloat16()
            csr = r.to_sparse_csr()
            dense = time_ms(lambda: r @ w.mT, iters=10)["median_ms"]
            convert = time_ms(lambda: r.to_sparse_csr(), iters=10)["median_ms"]
            spmm = time_ms(lambda: torch.sparse.mm(csr, w.mT), iters=5)["median_ms"]
            ref, got = (r @ w.mT).float(), torch.sparse.mm(csr, w.mT).float()
            rows.append({
                "shape": f"{name} {m}x{k}x{n}", "activation": "8 outlier channels" if channels else "gaussian",
                "nonzero": csr.values().numel() / r.numel(),
                "columns with outliers": float((r != 0).any(0).float().mean()),
                "dense bf16 ms": dense, "csr spmm ms": spmm, "to csr ms": convert,
                "spmm / dense": (spmm + convert) / dense, "spmm rel err": float((got - ref).norm() / ref.norm()),
            })
    print_table(rows, ["shape", "activation", "nonzero", "columns with outliers", "dense bf16 ms", "csr spmm ms",
                       "to csr ms", "spmm / dense", "spmm rel err"], "OCC compensation R @ W^T: dense vs sparse")
    write_json(args.out, {"env": environment(), "results": rows})


if __name__ == "__main__":
    main()
