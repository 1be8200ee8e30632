"""The graph pass, in order: find sites -> classify operands -> keep output heads -> find custom operators
that take a weight (opaque.py) -> specialize the graph to its blocks' selection (names.py) -> rewrite ->
report, on Dynamo's graph and on every subgraph a higher-order op holds (passes/subgraphs.py)."""

import torch.fx as fx

from fp4compile.config import FP4Config
from fp4compile.passes import coverage
from fp4compile.passes.classify import classify, parameter_nodes, weight_inputs, weights
from fp4compile.passes.find_sites import find_sites, multiplied
from fp4compile.passes.heads import keep_heads
from fp4compile.passes.names import specialize
from fp4compile.passes.opaque import opaque_calls, warn
from fp4compile.passes.report import build_report, emit, graph_name
from fp4compile.passes.rewrite import rewrite
from fp4compile.passes.subgraphs import check_complete, matmul_nodes, subgraphs


def fp4_pass(gm: fx.GraphModule, example_inputs, config: FP4Config) -> dict:
    """Rewrite every selected matmul of ``gm`` and its subgraphs in place; return the report (report.json's
    content)."""
    before = gm.print_readable(print_output=False)
    expected = matmul_nodes(gm)
    graphs, opaque, taken = [], [], []
    params = parameter_nodes(gm, example_inputs)
    for sub in subgraphs(gm, {node: name for node, (name, _) in params.items()}):
        found = find_sites(sub.gm.graph, sub.path)
        for site in found if sub.skip else ():
            site.skip(sub.skip)
        held = weights(sub.gm.graph, sub.params)
        classify(found, held, config)
        keep_heads(found, sub.params, config)
        opaque += opaque_calls(sub.gm.graph, held, sub.path)
        taken += [(site, weight_inputs(multiplied(site), held) or sub.passed) for site in found]
        graphs.append((sub.gm, found))
    sites = [site for _, found in graphs for site in found]
    serves = specialize(sites, config)
    coverage.record([(name, site.status) for site, names in taken for name in names]
                    + [(name, "skipped") for call in opaque for name in call["weights"]], dict(params.values()))
    for sub_gm, found in graphs:
        rewrite(sub_gm, found, config)
    report = build_report(graph_name(), sites, config, serves, opaque)
    check_complete(expected, report)
    report["summary"]["matmuls"] = len(expected)  # counted apart from the sites: tests check they agree
    warn(opaque)
    emit(report, before, gm, config)
    return report
