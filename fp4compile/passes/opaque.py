"""Custom operators that take a weight: a ``torch.library`` op of another library (a fused layer of the
kernels package, a hand-written extension) is one node in Dynamo's graph, and what it computes inside is
out of the pass's sight, so a matmul in it runs in the op's own precision. Each such call is listed in
the report (``opaque``) and warned about once per operator; ``fp4compile.coverage`` counts its weights
as "skipped"."""

import logging
import warnings

import torch
import torch.fx as fx

from fp4compile.passes.classify import weight_inputs
from fp4compile.passes.find_sites import OPERATOR_OPS

log = logging.getLogger("fp4compile")
# aten and prims ops are torch's own (their matmuls are sites, find_sites.OPERATOR_OPS); fp4compile's are ours.
_KNOWN_NAMESPACES = {"aten", "prims", "fp4compile"}
_warned: set = set()


def _custom_op(node: fx.Node) -> str | None:
    """The qualified name ("ns::op") of the custom operator ``node`` calls, None for any other node."""
    if node.op != "call_function" or not isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return None
    name = getattr(node.target, "overloadpacket", node.target)._qualified_op_name
    if name.partition("::")[0] in _KNOWN_NAMESPACES or name in OPERATOR_OPS:
        return None
    return name


def opaque_calls(graph: fx.Graph, held: dict[fx.Node, str], subgraph: str | None) -> list[dict]:
    """The calls of custom operators in ``graph`` that take a weight matrix (classify.weight_inputs):
    subgraph path, node, operator and the weights' names."""
    found = []
    for node in graph.nodes:
        op = _custom_op(node)
        names = weight_inputs(node.all_input_nodes, held) if op else []
        if names:
            found.append({"subgraph": subgraph, "node": node.name, "op": op, "weights": names})
    return found


def warn(calls: list[dict]) -> None:
    for call in calls:
        if call["op"] in _warned:
            continue
        _warned.add(call["op"])
        message = (
            f"fp4compile: the custom operator {call['op']} takes the weight {', '.join(call['weights'])}; the "
            "pass cannot see inside it, so any matmul it runs stays in its own precision, not FP4. Written in "
            "torch ops (for a kernels-package layer: without its kernel mapping) it would be quantized."
        )
        warnings.warn(message, stacklevel=2)
        log.warning("%s", message)
