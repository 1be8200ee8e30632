"""The graph pass, in order: find sites -> classify operands -> keep output heads -> specialize the graph to
its blocks' selection (names.py) -> rewrite -> report."""

import torch.fx as fx

from fp4compile.config import FP4Config
from fp4compile.passes.classify import classify, parameters
from fp4compile.passes.find_sites import find_sites
from fp4compile.passes.heads import keep_heads
from fp4compile.passes.names import specialize
from fp4compile.passes.report import build_report, emit, graph_name
from fp4compile.passes.rewrite import rewrite


def fp4_pass(gm: fx.GraphModule, example_inputs, config: FP4Config) -> dict:
    """Rewrite every selected matmul of ``gm`` in place; return the report (report.json's content)."""
    before = gm.print_readable(print_output=False)
    sites = find_sites(gm.graph)
    params = parameters(gm, example_inputs)
    classify(sites, params, config)
    keep_heads(sites, params, config)
    serves = specialize(sites, config)
    rewrite(gm, sites, config)
    report = build_report(graph_name(), sites, config, serves)
    emit(report, before, gm, config)
    return report
