"""SwiGLU's product quantized where it is computed: ``fp4_rows(silu(gate) * up)`` becomes
``fp4_rows_swiglu(gate, up)`` (kernels/fp4_rows_triton.py), a pass over AOTAutograd's joint graph.

Unfused, Inductor stores the product in BF16 for the quantize kernel to read back (a user Triton kernel
takes no producer into it): per element 2 bytes written and read again between two kernels. Fused, the
down projection's input costs one read of gate and up in the forward and, with a rotation and
``FP4Config.recompute_activations``, again in the backward (without a rotation the backward rounds the
product again from the forward's scales in Inductor's own kernel: matmul.requantized). The product must
have no other reader in the forward (SwiGLU's backward reads gate and up, not the product; a backward
that rounds it again computes it there from them), and silu must be what the kernel computes: as
Inductor decomposes it, ``x / (1 + exp(-x))`` in FP32 rounded to the inputs' dtype, or ``aten.silu``,
which CUDA computes so. Gate and up of another shape or dtype than the product, or not contiguous, keep
the unfused form.
"""

import torch
import torch.fx as fx

aten, prims = torch.ops.aten, torch.ops.prims
VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _to_float32_from(node):
    """x where ``node`` is x converted to FP32 (or x itself where it is FP32), else None."""
    if _is(node, prims.convert_element_type.default) and node.args[1] == torch.float32:
        return node.args[0]
    return node if _val(node) is not None and _val(node).dtype == torch.float32 else None


def silu_input(node):
    """g where ``node`` computes silu(g) in g's dtype as the kernel does, else None."""
    if _is(node, aten.silu.default):
        return node.args[0]
    out = _val(node)
    if out is None:
        return None
    if _is(node, prims.convert_element_type.default) and node.args[1] == out.dtype:
        node = node.args[0]
    if not _is(node, aten.div.Tensor):
        return None
    x, denominator = node.args
    if not (_is(denominator, aten.add.Tensor) and denominator.args[1] == 1):
        return None
    exp = denominator.args[0]
    if not (_is(exp, aten.exp.default) and _is(exp.args[0], aten.neg.default) and exp.args[0].args[0] is x):
        return None
    gate = _to_float32_from(x)
    return gate if _val(gate) is not None and _val(gate).dtype == out.dtype else None


def _operands(product):
    """(gate, up) where ``product`` is silu(gate) * up, of one shape and dtype, both contiguous."""
    if not _is(product, aten.mul.Tensor):
        return None
    for a, b in (product.args, product.args[::-1]):
        gate = silu_input(a)
        if gate is None or not isinstance(b, fx.Node):
            continue
        vals = [_val(n) for n in (gate, b, product)]
        if all(v is not None for v in vals) and all(
                v.shape == vals[2].shape and v.dtype == vals[2].dtype and v.is_contiguous() for v in vals[:2]):
            return gate, b
    return None


def in_backward(node: fx.Node) -> bool:
    """Whether AOTAutograd traced ``node`` for the joint graph's backward (its partitioner's tag; a node
    without it counts as the forward's)."""
    return node.meta.get("partitioner_tag") == "is_backward"


def fuse_swiglu_quantize(graph: fx.Graph) -> int:
    """Fuse every ``fp4_rows`` of a SwiGLU product (through views) that nothing else in the forward reads.
    Returns how many it fused."""
    fused = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or str(node.target) != "fp4compile.fp4_rows.default":
            continue
        x, *rest = node.args
        chain = [x]
        while _is(chain[-1], *VIEWS):
            chain.append(chain[-1].args[0])
        product = chain[-1]
        operands = _operands(product)
        readers = [u for n in chain for u in n.users if u is not node and u not in chain]
        if operands is None or not all(in_backward(u) for u in readers):
            continue
        with graph.inserting_before(node):
            inputs = [_view_like(graph, t, x, node) for t in operands]
            new = graph.call_function(torch.ops.fp4compile.fp4_rows_swiglu.default, (*inputs, *rest), node.kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        fused += 1
    if fused:
        graph.eliminate_dead_code()  # the product, its views, silu where nothing else reads it
    return fused


def _view_like(graph: fx.Graph, t: fx.Node, x: fx.Node, quantize: fx.Node) -> fx.Node:
    """``t`` viewed as x's shape (a view of the product, of t's shape): x's own view's size arguments."""
    if not _is(x, *VIEWS):
        return t
    view = graph.call_function(aten.view.default, (t, x.args[1]))
    view.meta = {**quantize.meta, "val": _val(t).view(_val(x).shape)}
    return view
