"""Every graph the pass rewrites: Dynamo's graph and, recursively, each subgraph a higher-order op (HOP)
holds as a ``get_attr`` GraphModule: activation checkpointing (``tag_activation_checkpoint``),
``torch.compiler.nested_compile_region`` (``invoke_subgraph``), ``torch.cond``, ``while_loop``,
flex_attention's score and mask mods, a traced ``autograd.Function``'s bodies.

A parameter enters a subgraph as a plain placeholder: it is recognised by following the placeholder to
the HOP's argument bound to it, a weight of the outer graph (classify.weights).
"""

from dataclasses import dataclass, field
from operator import attrgetter

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from fp4compile.passes.classify import weight_inputs, weights
from fp4compile.passes.find_sites import op_of

# HOPs whose subgraphs are rewritten: each subgraph takes the op's arguments after it (flattened) as its
# placeholders, and AOTAutograd traces the FP4 autograd function in it like any other (tests/test_subgraphs.py).
REWRITTEN = {"tag_activation_checkpoint", "invoke_subgraph"}
# Why the matmuls under any other HOP keep their op.
WHY_NOT = {
    "cond": "inside torch.cond, whose backward needs both branches' gradients in one memory layout, which "
    "the FP4 backward does not keep",
    "autograd_function_apply": "inside a custom autograd.Function, whose backward is its own",
    "flex_attention": "inside flex_attention's score or mask mod",
}


@dataclass
class Subgraph:
    path: str | None  # the subgraph is root.get_submodule(path); None for the root graph itself
    gm: fx.GraphModule
    params: dict[fx.Node, str]  # nodes holding a parameter, with its FQN
    skip: str | None = None  # why its matmuls keep their op, or None
    calls: list = field(default_factory=list)  # (HOP node, bound outer arguments or None) of each call
    # Where the HOP makes the placeholders itself (a skipped subgraph): the weight matrices its calls take,
    # which the subgraph's matmuls may multiply (fp4compile.coverage counts them "skipped").
    passed: list[str] = field(default_factory=list)


def _is_hop(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator)


def _bound(node: fx.Node, after: list, child: fx.GraphModule) -> list | None:
    """The outer arguments bound to ``child``'s placeholders (the last of the HOP's arguments ``after`` the
    subgraph), or None when the HOP makes them itself."""
    n = sum(p.op == "placeholder" for p in child.graph.nodes)
    if node.target.name() not in REWRITTEN or n > len(after):
        return None
    return after[len(after) - n :]


def _children(parent: Subgraph) -> list[Subgraph]:
    """The subgraphs called from ``parent``'s graph, each once with all its calls (nested_compile_region
    calls one subgraph for every repeat of a layer)."""
    found: dict[int, Subgraph] = {}
    for node in parent.gm.graph.nodes:
        if not _is_hop(node):
            continue
        leaves = tree_leaves(node.args)
        for pos, arg in enumerate(leaves):
            if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
                continue
            child = attrgetter(arg.target)(parent.gm)
            if not isinstance(child, fx.GraphModule):
                continue
            path = f"{parent.path}.{arg.target}" if parent.path else arg.target
            sub = found.setdefault(id(child), Subgraph(path, child, {}))
            sub.calls.append((node, _bound(node, leaves[pos + 1 :], child)))
    for sub in found.values():
        _bind(sub, parent)
    return list(found.values())


def _bind(sub: Subgraph, parent: Subgraph) -> None:
    """Set ``sub``'s parameters (named after its first call's) and why its matmuls keep their op, if they do."""
    held = weights(parent.gm.graph, parent.params)
    if any(args is None for _, args in sub.calls):
        hop = sub.calls[0][0].target.name()
        sub.skip = parent.skip or WHY_NOT.get(hop, f"inside torch.ops.higher_order.{hop}, which fp4compile does not rewrite")
        taken = [name for node, _ in sub.calls for name in weight_inputs(node.all_input_nodes, held)]
        sub.passed = list(dict.fromkeys(parent.passed + taken))
        return
    names = [[held.get(a) if isinstance(a, fx.Node) else None for a in args] for _, args in sub.calls]
    placeholders = [p for p in sub.gm.graph.nodes if p.op == "placeholder"]
    sub.params = {p: name for p, name in zip(placeholders, names[0]) if name is not None}
    sub.skip = parent.skip
    # One rewrite serves every call, so every call must pass a weight in the same places.
    if len({tuple(name is not None for name in call) for call in names}) > 1:
        calls = ", ".join(node.name for node, _ in sub.calls)
        sub.skip = sub.skip or f"subgraph called with a parameter and an activation in the same place ({calls})"


def subgraphs(gm: fx.GraphModule, params: dict[fx.Node, str]) -> list[Subgraph]:
    """The root graph (with ``params``) and every subgraph under it, parents before children."""
    found = [Subgraph(None, gm, params)]
    for sub in found:
        found += _children(sub)
    return found


def matmul_nodes(gm: fx.GraphModule, path: str | None = None, seen=None) -> set[tuple[str | None, str]]:
    """(subgraph path, node name) of every matmul-like node, by find_sites.op_of, in ``gm`` and every
    GraphModule a ``get_attr`` of it names, recursively: found without the walk above (whatever op uses
    the subgraph), so a subgraph the walk misses shows. Dynamo may leave a subgraph it inlined registered
    but unused: only referenced ones count."""
    seen = seen if seen is not None else set()
    seen.add(id(gm))
    found = set()
    for node in gm.graph.nodes:
        if op_of(node) is not None:
            found.add((path, node.name))
        elif node.op == "get_attr":
            child = attrgetter(node.target)(gm)
            if isinstance(child, fx.GraphModule) and id(child) not in seen:
                found |= matmul_nodes(child, f"{path}.{node.target}" if path else node.target, seen)
    return found


def check_complete(expected: set, report: dict) -> None:
    """Raise if a matmul-like node of the graph is not in the report (a bug of fp4compile's)."""
    missing = expected - {(s["subgraph"], s["node"]) for s in report["sites"]}
    if missing:
        raise RuntimeError(
            "fp4compile internal error: these matmuls are in the graph but not in the report (neither "
            f"rewritten nor skipped with a reason): {sorted(missing, key=str)}; please report it with the "
            "graph dump (FP4COMPILE_DUMP_DIR)"
        )
