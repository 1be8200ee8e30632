"""The graph pass, in order: find sites -> classify operands -> rewrite -> report."""

import torch.fx as fx

from fp4compile.config import FP4Config
from fp4compile.passes.classify import classify, parameters
from fp4compile.passes.find_sites import find_sites
from fp4compile.passes.report import build_report, emit, graph_name
from fp4compile.passes.rewrite import rewrite


def fp4_pass(gm: fx.GraphModule, example_inputs, config: FP4Config) -> dict:
    """Rewrite every selected matmul of ``gm`` in place; return the report (report.json's content)."""
    before = gm.print_readable(print_output=False)
    sites = find_sites(gm.graph)
    classify(sites, parameters(gm, example_inputs), config)
    rewrite(gm, sites, config)
    report = build_report(graph_name(), sites, config)
    emit(report, before, gm, config)
    return report
