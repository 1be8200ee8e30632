"""Find every matmul of a Dynamo FX graph (torch-level ops, before AOTAutograd).

A site is one matmul node with its two multiplied operands (A, B) named in the order of the twin in
``runtime/ops.py``, the module it was called from, and the size of its reduction dim.
"""

import math
import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from fp4compile.passes import names
from fp4compile.runtime.ops import explicit_einsum, parse_einsum

FUNCTION_OPS = {
    torch._C._nn.linear: "linear",
    torch.nn.functional.linear: "linear",
    torch.matmul: "matmul",
    torch.linalg.matmul: "matmul",
    operator.matmul: "matmul",
    torch.Tensor.matmul: "matmul",
    torch.mm: "mm",
    torch.Tensor.mm: "mm",
    torch.addmm: "addmm",
    torch.Tensor.addmm: "addmm",
    torch.bmm: "bmm",
    torch.Tensor.bmm: "bmm",
    torch.baddbmm: "baddbmm",
    torch.Tensor.baddbmm: "baddbmm",
    torch.einsum: "einsum",
    torch.functional.einsum: "einsum",
    torch._grouped_mm: "grouped_mm",
    torch.nn.functional.grouped_mm: "grouped_mm",
    # nn.MultiheadAttention's forward, one op in Dynamo's graph (an in-graph function): its projections
    # are rewritten inside it (runtime/ops.py)
    torch.nn.functional.multi_head_attention_forward: "multi_head_attention",
    # found to be reported, not rewritten (NOT_REWRITTEN)
    torch.mv: "mv",
    torch.addmv: "addmv",
    torch.dot: "dot",
    torch.vdot: "dot",
    torch.linalg.vecdot: "dot",
    torch.inner: "inner",
    torch.outer: "outer",
    torch.ger: "outer",
    torch.addr: "addr",
    torch.tensordot: "tensordot",
    torch.functional.tensordot: "tensordot",
    torch.linalg.multi_dot: "multi_dot",
    torch.chain_matmul: "multi_dot",
    torch.functional.chain_matmul: "multi_dot",
    torch.bilinear: "bilinear",
    torch.nn.functional.bilinear: "bilinear",
    torch.addbmm: "addbmm",
    torch.nn.functional.scaled_dot_product_attention: "scaled_dot_product_attention",
    torch.ops.higher_order.flex_attention: "flex_attention",
    torch.cdist: "cdist",
    torch._native_multi_head_attention: "native_multi_head_attention",
    **{f: "recurrent" for f in (torch.lstm_cell, torch.gru_cell, torch.rnn_tanh_cell, torch.rnn_relu_cell,
                                torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu)},
}
# Operators (OpOverload or OpOverloadPacket targets) by qualified name: transformers' MoE experts call its
# own grouped GEMM (same arguments as torch._grouped_mm) for weights that are not BF16 under torch.compile.
# aten's own ops, called directly, as their torch functions.
OPERATOR_OPS = {"aten::_grouped_mm": "grouped_mm", "transformers::grouped_mm_fallback": "grouped_mm",
                **{f"aten::{name}": name for name in ("linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum",
                                                     "mv", "addmv", "dot", "addbmm", "cdist")},
                "aten::scaled_dot_product_attention": "scaled_dot_product_attention"}
_IN_PLACE = ("addmm_", "baddbmm_", "addbmm_", "addmv_", "addr_")
METHOD_OPS = {"matmul": "matmul", "__matmul__": "matmul", "__rmatmul__": "matmul", "mm": "mm", "bmm": "bmm",
              "addmm": "addmm", "baddbmm": "baddbmm", "mv": "mv", "addmv": "addmv", "dot": "dot", "vdot": "dot",
              "inner": "inner", "outer": "outer",
              "ger": "outer", "addr": "addr", "addbmm": "addbmm", **{name: name for name in _IN_PLACE}}
# Matmul-like ops the pass finds but does not rewrite, and why: each is reported as skipped, so that none
# runs in high precision unseen.
NOT_REWRITTEN = {
    "mv": "matrix-vector product (torch.mv): not rewritten; write it as x[None] @ W.T to quantize it",
    "addmv": "matrix-vector product (torch.addmv): not rewritten; write it as b + x[None] @ W.T to quantize it",
    "dot": "vector dot product: not rewritten",
    "inner": "torch.inner: not rewritten; write it as a @ b.mT to quantize it",
    "outer": "outer product: no reduction dim, nothing to quantize",
    "addr": "outer product (torch.addr): no reduction dim, nothing to quantize",
    "tensordot": "torch.tensordot: not rewritten; write it as einsum or @ to quantize it",
    "multi_dot": "matmul chain (linalg.multi_dot, chain_matmul): not rewritten; write it as a chain of @ to quantize each product",
    "bilinear": "bilinear form (three operands): not rewritten",
    "addbmm": "torch.addbmm (batched products summed over the batch): not rewritten; write it as bmm(...).sum(0) to quantize it",
    "scaled_dot_product_attention": "fused attention (scaled_dot_product_attention): its matmuls stay in high precision",
    "flex_attention": "fused attention (flex_attention): its matmuls stay in high precision",
    "cdist": "pairwise distances (torch.cdist): its matmul stays in high precision",
    "native_multi_head_attention": "nn.MultiheadAttention's inference fast path (no autograd): not rewritten",
    "recurrent": "recurrent layer or cell (nn.LSTM, GRU, RNN and their cells: one op): its matmuls stay in high precision",
} | {name: f"in-place {name}: not rewritten; write it as torch.{name[:-1]} to quantize it" for name in _IN_PLACE}
# Ops whose B operand is a weight [N, K] (multi_head_attention: the output projection's; the input
# projections' K enter its reduction, _reduction).
WEIGHT_NK = ("linear", "multi_head_attention")
# The rewritten ops' arguments in order (torch's names; aten calls the first one "self"): operands
# passed by keyword are moved to their positions (_positional), where the pass and the twins read them.
POSITIONAL = {"linear": ("input", "weight", "bias"), "matmul": ("input", "other"), "mm": ("input", "mat2"),
              "bmm": ("input", "mat2"), "addmm": ("input", "mat1", "mat2"), "baddbmm": ("input", "batch1", "batch2")}
# Positions of (A, B) in each op's arguments.
OPERAND_POSITIONS = {"linear": (0, 1), "multi_head_attention": (0, 11), "addmm": (1, 2), "baddbmm": (1, 2),
                     "einsum": (1, 2), "addmv": (1, 2), "addr": (1, 2), "addbmm": (1, 2),
                     **{name: (1, 2) for name in _IN_PLACE}}


@dataclass
class Site:
    node: fx.Node
    op: str
    operands: tuple | None = None
    module: str | None = None
    module_resolved: bool = True
    root: object = None  # the root nn.Module holding ``module`` (names.py), when resolved
    subgraph: str | None = None  # the path of the node's GraphModule from Dynamo's graph (None: that graph)
    reduction: object = None
    weights: tuple = (None, None)
    rotation: int | None = None  # the rotation group of a quantized site (classify.rotation_of)
    status: str = "fp4"
    reason: str | None = None

    def skip(self, reason: str) -> None:
        if self.status == "fp4":
            self.status, self.reason = "skipped", reason


# The root is the module itself: L['self'], or L['args'][0] when a decorator wraps forward (transformers >= 5.2x).
_ROOT = re.compile(r"^[LG]\['[^']*'\](\[\d+\])*\.?")
_MODULES = re.compile(names.CONTAINER)


def clean_fqn(path: str) -> str:
    """Dynamo's source path ("L['self']._modules['fc']", "L['self'].fc", "L['args'][0].fc") -> the FQN ("fc")."""
    path = _MODULES.sub(lambda m: "." + m.group(1), path)
    return _ROOT.sub("", path).lstrip(".")


def module_of(node: fx.Node) -> tuple[str | None, bool, object]:
    """FQN of the module the node was called from (None outside any module) in its root model, True, and the
    root; or where the module cannot be resolved (names.py), its name relative to the compiled frame, False."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None, True, None
    path = list(stack.values())[-1][0]
    found = names.resolve_module(path)
    if found is not None:
        return found[0] or None, True, found[1]
    return clean_fqn(path) or None, False, None


def op_of(node: fx.Node) -> str | None:
    """The matmul op a node calls ("linear", "grouped_mm", ...), None for any other node."""
    if node.op == "call_function":
        packet = getattr(node.target, "overloadpacket", node.target)
        return FUNCTION_OPS.get(node.target) or OPERATOR_OPS.get(getattr(packet, "_qualified_op_name", None))
    if node.op == "call_method":
        return METHOD_OPS.get(node.target)
    return None


def _positional(node: fx.Node, op: str) -> None:
    """Rewrite ``node`` into the same call with its operands positional: ``b.__rmatmul__(a)`` as ``a @ b``,
    keyword operands (``F.linear(x, weight=w)``) moved to their positions."""
    if node.op == "call_method" and node.target == "__rmatmul__" and len(node.args) == 2 and not node.kwargs:
        node.op, node.target, node.args = "call_function", operator.matmul, node.args[::-1]
    names, kwargs = POSITIONAL.get(op), dict(node.kwargs)
    if names is None or not kwargs:
        return
    if "self" in kwargs:
        kwargs["input"] = kwargs.pop("self")
    args = list(node.args)
    for name in names[len(args):]:
        if name not in kwargs:
            break
        args.append(kwargs.pop(name))
    if "input" not in kwargs:
        node.args, node.kwargs = tuple(args), kwargs


def _explicit_einsum(node: fx.Node) -> None:
    """Spell out an einsum's '...' for its operands' ranks (ops.explicit_einsum), in the node itself."""
    operands = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    shapes = [example(o).shape for o in operands if example(o) is not None]
    if len(operands) == len(shapes) == 2:
        node.args = (explicit_einsum(node.args[0], *([hint(n) for n in s] for s in shapes)), *node.args[1:])


def _operands(node: fx.Node, op: str):
    args = node.args
    if op == "einsum" and len(args) == 2 and isinstance(args[1], (list, tuple)):
        args = (args[0], *args[1])
    i, j = OPERAND_POSITIONS.get(op, (0, 1))
    if len(args) <= j or not all(isinstance(args[k], fx.Node) for k in (i, j)):
        return None
    return args[i], args[j]


def hint(size) -> int:
    """A size's value in this trace, without adding a guard (a symbolic size's hint)."""
    return size.node.hint if isinstance(size, torch.SymInt) else int(size)


def example(node) -> torch.Tensor | None:
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _under_transform(t: torch.Tensor | None) -> bool:
    functorch = torch._C._functorch
    return t is not None and (functorch.is_batchedtensor(t) or functorch.is_gradtrackingtensor(t))


# nn.MultiheadAttention's projection weights besides its B operand (the output projection's): the packed
# input projection (position 5) and the separate q/k/v weights (keywords), all multiplied as FP4 linears.
_MHA_WEIGHTS = (5, "q_proj_weight", "k_proj_weight", "v_proj_weight")


def multiplied(site: Site) -> list[fx.Node]:
    """The graph tensors ``site`` multiplies: its two operands, and nn.MultiheadAttention's input
    projection weights; not what its op only adds (addmm's and baddbmm's ``input``, a bias). All inputs
    of a site whose operands were not found."""
    node = site.node
    if site.operands is None:
        return node.all_input_nodes
    extra = []
    if site.op == "multi_head_attention":
        extra = [node.args[k] if isinstance(k, int) and len(node.args) > k else node.kwargs.get(k) for k in _MHA_WEIGHTS]
    return [n for n in (*site.operands, *extra) if isinstance(n, fx.Node)]


def _reduction(site: Site):
    a, b = (example(n) for n in site.operands)
    if a is None or b is None:
        return None
    if site.op == "einsum":
        equation = site.node.args[0]
        contracted = parse_einsum(equation)[3]
        terms = equation.replace(" ", "").split("->")[0].split(",")[0]
        size = 1
        for c in contracted:
            size = size * a.shape[terms.index(c)]
        return size
    if site.op == "multi_head_attention":  # a rotation group or block must divide every projection's K
        kv = (example(site.node.kwargs.get(name)) for name in ("k_proj_weight", "v_proj_weight"))
        return math.gcd(hint(a.shape[-1]), *(hint(t.shape[-1]) for t in kv if t is not None))
    return a.shape[-1] if a.dim() else None


def find_sites(graph: fx.Graph, subgraph: str | None = None) -> list[Site]:
    sites = []
    for node in graph.nodes:
        op = op_of(node)
        if op is None:
            continue
        module, resolved, root = module_of(node)
        site = Site(node, op, module=module, module_resolved=resolved, root=root, subgraph=subgraph)
        sites.append(site)
        if op in NOT_REWRITTEN:
            site.skip(NOT_REWRITTEN[op])
        _positional(node, op)
        try:
            if op == "einsum":
                _explicit_einsum(node)
                parse_einsum(node.args[0])
            site.operands = _operands(node, op)
            if site.operands is None:
                site.skip(f"{op} called with operands that are not graph tensors")
            elif any(_under_transform(example(n)) for n in site.operands):
                site.skip("inside torch.func.vmap or grad (a functorch transform), which the FP4 twin's "
                          "autograd.Function does not support; written as a batched matmul it is quantized")
            else:
                site.reduction = _reduction(site)
        except ValueError as e:
            site.skip(str(e))
    return sites
