"""The graph pass, in order: find sites -> classify operands -> rewrite -> report, on Dynamo's graph and
on every subgraph a higher-order op holds (passes/subgraphs.py)."""

import torch.fx as fx

from fp4compile.config import FP4Config
from fp4compile.passes.classify import classify, parameters
from fp4compile.passes.find_sites import find_sites
from fp4compile.passes.report import build_report, emit, graph_name
from fp4compile.passes.rewrite import rewrite
from fp4compile.passes.subgraphs import check_complete, matmul_nodes, subgraphs


def fp4_pass(gm: fx.GraphModule, example_inputs, config: FP4Config) -> dict:
    """Rewrite every selected matmul of ``gm`` and its subgraphs in place; return the report (report.json's
    content)."""
    before = gm.print_readable(print_output=False)
    expected = matmul_nodes(gm)
    sites = {}
    for sub in subgraphs(gm, parameters(gm, example_inputs)):
        found = find_sites(sub.gm.graph)
        for site in found if sub.skip else ():
            site.skip(sub.skip)
        classify(found, sub.params, config)
        rewrite(sub.gm, found, config)
        sites[sub.path] = found
    report = build_report(graph_name(), sites, config)
    check_complete(expected, report)
    report["summary"]["matmuls"] = len(expected)  # counted apart from the sites: tests check they agree
    emit(report, before, gm, config)
    return report
