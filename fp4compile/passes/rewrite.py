"""Replace each quantized site by its FP4 twin (runtime/ops.py), keeping the node's own arguments."""

import torch.fx as fx

from fp4compile.config import FP4Config
from fp4compile.passes.find_sites import Site, example
from fp4compile.runtime.matmul import MatmulSpec
from fp4compile.runtime.ops import FP4Site


def rewrite(gm: fx.GraphModule, sites: list[Site], config: FP4Config) -> None:
    for site in sites:
        if site.status != "fp4":
            continue
        out = example(site.node)
        spec = MatmulSpec(
            config if site.rotation == config.rotation else config.replace(rotation=site.rotation),
            a_is_weight=site.weights[0] is not None,
            b_is_weight=site.weights[1] is not None,
            out_dtype=out.dtype if out is not None else None,
            name=site.module,
        )
        site.node.op = "call_function"
        site.node.target = FP4Site(site.op, spec)
    gm.graph.lint()
    gm.recompile()
