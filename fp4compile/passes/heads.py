"""Output heads, found by structure rather than by name: the matmul that produces a model's logits.

A site is an output head when its weight (operand B) is
- tied to an input embedding: the same parameter as an ``nn.Embedding``'s weight in the model, or as the
  weight of an embedding lookup in the graph (GPT-2's lm_head, Whisper's proj_out);
- or its output reaches, through views, casts, scaling by a constant and soft-capping (tanh), a loss over
  the vocabulary (cross_entropy, nll_loss, log_softmax) in the graph (Granite divides its logits by a
  constant, Cohere multiplies them, Gemma 2 soft-caps them);
- or it has the shape of an input embedding's weight ([vocab, hidden]) and its output leaves the graph
  the same way (an untied head whose loss is computed outside the graph).
FP4 training recipes keep the head in high precision; ``FP4Config.quantize_output_heads`` quantizes it.
"""

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fp4compile.passes import names
from fp4compile.passes.classify import weights
from fp4compile.passes.find_sites import Site, example

_LOSSES = {
    F.cross_entropy: "cross_entropy", F.nll_loss: "nll_loss", F.log_softmax: "log_softmax",
    torch.log_softmax: "log_softmax", torch.Tensor.log_softmax: "log_softmax",
}


_PASS_METHODS = {"t", "transpose", "permute", "view", "reshape", "contiguous", "flatten", "to", "float", "half",
                  "bfloat16", "type"}
_PASS_FUNCTIONS = {operator.getitem, torch.flatten, torch.t, torch.transpose, torch.permute, torch.reshape,
                   torch.Tensor.to, torch.Tensor.t}
# Elementwise ops that keep the logits logits when every other operand is a constant: scaling, soft-capping.
_SCALE_METHODS = {"mul", "div", "tanh"}
_SCALE_FUNCTIONS = {operator.mul, operator.truediv, torch.mul, torch.div, torch.tanh}


def _passes_through(node: fx.Node, value: fx.Node) -> bool:
    """Whether ``node`` passes ``value`` on as the logits: views, casts, slicing and flattening (``value`` first),
    or scaling and soft-capping (``value`` the only tensor operand)."""
    if node.op not in ("call_method", "call_function"):
        return False
    if node.target in (_SCALE_METHODS if node.op == "call_method" else _SCALE_FUNCTIONS):
        others = [a for a in (*node.args, *node.kwargs.values()) if a is not value]
        return any(a is value for a in node.args) and not any(isinstance(a, fx.Node) for a in others)
    if not node.args or node.args[0] is not value:
        return False
    if node.op == "call_method":
        return node.target in _PASS_METHODS
    return node.target in _PASS_FUNCTIONS or node.target is getattr and node.args[1] in ("T", "mT", "data")


def _reaches(node: fx.Node) -> tuple[str | None, bool]:
    """The loss the node's value reaches as logits (_passes_through; None if none), and whether it leaves the graph."""
    loss, leaves, stack, seen = None, False, [node], set()
    while stack:
        n = stack.pop()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "output":
                leaves = True
            elif user.op == "call_method" and user.target == "log_softmax":
                loss = loss or "log_softmax"
            elif user.op == "call_function" and user.target in _LOSSES:
                loss = loss or _LOSSES[user.target]
            elif _passes_through(user, n):
                stack.append(user)
    return loss, leaves


def input_embeddings(sites: list[Site], params: dict[fx.Node, str]) -> dict[str, tuple]:
    """Name -> (shape, root model) of the input embeddings' weights: the nn.Embedding modules of every model
    and the weights of embedding lookups in the sites' graphs (root None)."""
    found = {}
    for module in names.modules_of_type(nn.Embedding):
        entry = names.lookup(module.weight)
        if entry is not None:
            found[entry[0]] = (tuple(module.weight.shape), entry[1])
    for graph in {s.node.graph for s in sites}:
        held = weights(graph, params)
        for node in graph.nodes:
            if node.op == "call_function" and node.target is F.embedding and len(node.args) > 1:
                name, value = held.get(node.args[1]), example(node.args[1])
                if name is not None and value is not None:
                    found[name] = (tuple(value.shape), None)
    return found


def keep_heads(sites: list[Site], params: dict[fx.Node, str], config) -> None:
    """Keep output heads in high precision unless config.quantize_output_heads."""
    if config.quantize_output_heads or not any(s.status == "fp4" and s.weights[1] for s in sites):
        return
    embeddings = input_embeddings(sites, params)
    for site in sites:
        reason = head_reason(site, embeddings) if site.status == "fp4" else None
        if reason:
            site.skip(reason)


def head_reason(site: Site, embeddings: dict[str, tuple]) -> str | None:
    """Why the site is an output head, None if it is not one."""
    weight = site.weights[1]
    if weight is None:
        return None
    # The site's own model's embeddings (and the graph's lookups), not those of another model in the process.
    embeddings = {n: shape for n, (shape, root) in embeddings.items() if root is None or root is site.root}
    if weight in embeddings:
        why = f"weight tied to the input embedding {weight}"
    else:
        loss, leaves = _reaches(site.node)
        b = example(site.operands[1])
        shape = tuple(b.shape) if b is not None else None
        like = [n for n, s in embeddings.items() if shape in (s, s[::-1])]
        if loss:
            why = f"its output feeds {loss}"
        elif like and leaves:
            why = f"weight shaped like the input embedding {like[0]} {list(embeddings[like[0]])}, output leaves the graph"
        else:
            return None
    return f"output head ({why}): kept in high precision; FP4Config(quantize_output_heads=True) quantizes it"
