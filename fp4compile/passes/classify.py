"""Classify each site's operands (weight or activation) and decide whether it is quantized, and why not.

A weight is a parameter of the traced model, reached from the operand through views, transposes and
casts: Dynamo passes parameters as placeholders (or get_attr nodes when modules are not inlined).
"""

import torch
import torch.fx as fx

from fp4compile.config import FP4Config
from fp4compile.passes import names
from fp4compile.passes.find_sites import Site, clean_fqn, example
from fp4compile.runtime import unbiased
from fp4compile.runtime.formats import get_format

_VIEW_METHODS = {"t", "transpose", "permute", "view", "reshape", "contiguous", "to", "float", "half", "bfloat16", "type"}
_VIEW_FUNCTIONS = {torch.t, torch.transpose, torch.permute, torch.reshape, torch.Tensor.to, torch.Tensor.t}
_VIEW_ATTRS = {"T", "mT", "data"}


def parameters(gm: fx.GraphModule, example_inputs) -> dict[fx.Node, str]:
    """Graph nodes that hold a parameter of the model, with the parameter's FQN in its root model (names.py),
    or where it belongs to no module, the name the compiled frame gives it."""
    found = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        grapharg = node.meta.get("grapharg")
        source = grapharg.source.name if grapharg is not None and grapharg.source is not None else ""
        if isinstance(value, torch.nn.Parameter) or "_parameters[" in source:
            found[node] = names.parameter_name(value) or (clean_fqn(source) if source else node.name)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and isinstance(value := _attr(gm, node.target), torch.nn.Parameter):
            found[node] = names.parameter_name(value) or node.target
    return found


def _attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        if node.target is getattr:
            return node.args[1] in _VIEW_ATTRS
        return node.target in _VIEW_FUNCTIONS
    return False


def weight_of(node: fx.Node, params: dict[fx.Node, str]) -> str | None:
    """FQN of the parameter behind ``node``, or None for an activation."""
    while isinstance(node, fx.Node):
        if node in params:
            return params[node]
        if not _is_view(node) or not node.args:
            return None
        node = node.args[0]
    return None


def _skip_reason(site: Site, config: FP4Config) -> str | None:
    if site.op in ("addmm", "baddbmm"):
        beta, alpha = site.node.kwargs.get("beta", 1), site.node.kwargs.get("alpha", 1)
        if beta != 1 or alpha != 1:
            return f"{site.op} with beta={beta}, alpha={alpha} (only beta = alpha = 1 is rewritten)"
    a, b = (example(n) for n in site.operands)
    if a is None or b is None:
        return "operand shapes unknown (no example_value on the node)"
    for t in (a, b):
        if not t.is_floating_point() or t.element_size() < 2:
            return f"{t.dtype} operands (only float16, bfloat16, float32 and float64 are quantized)"
    if site.op != "linear" and (a.dim() < 2 or b.dim() < 2):
        return "a 1-D operand (matrix-vector product)"
    if site.weights == (None, None) and not config.quantize_activation_matmuls:
        return "activation x activation matmul (no weight operand); set quantize_activation_matmuls=True to quantize it"
    if not site.module_resolved:
        names.warn_unresolved(site.module, config)
    selected, reason = config.selects(site.module)
    if not selected:
        return reason
    block = get_format(config.format).block_size
    # On a symbolic size this guards, so a later shape that breaks divisibility recompiles.
    if block and site.reduction is not None and not bool(site.reduction % block == 0):
        return (
            f"reduction dim of size {site.reduction} is not a multiple of {config.format}'s block of {block}; "
            "use format='vector' or pad the dim"
        )
    return None


def _value(size) -> int:
    """A size's value in this trace, without a guard (a symbolic size's hint)."""
    return size.node.hint if isinstance(size, torch.SymInt) else int(size)


def check_unbiased_dims(sites: list[Site], config: FP4Config) -> None:
    """The unbiased recipes quantize each GEMM along its reduction dim (forward: K; dX: N; dW: the tokens
    M) in blocks or Hadamard groups: raise one error naming every module whose dims do not divide, at
    compile time, where the shapes are known (runtime/unbiased.py keeps the same check as a backstop)."""
    if config.backward == "fp8":
        return
    problems = []
    for site in sites:
        if site.status != "fp4" or site.op == "einsum":  # einsum's dims: the runtime check names them
            continue
        a, b = (example(n) for n in site.operands)
        n = b.shape[0] if site.op == "linear" else b.shape[-1]
        m = a.shape[-2] if b.dim() > 2 else a.numel() // max(_value(a.shape[-1]), 1)
        problems += unbiased.dim_problems(
            config, site.module, _value(m), _value(n), _value(a.shape[-1]), tiled=site.weights[1] is not None
            and b.dim() == 2, need_dx=a.requires_grad, need_dw=b.requires_grad, tokens_vary=isinstance(m, torch.SymInt))
    if problems:
        raise ValueError("fp4compile cannot apply this recipe to every selected matmul:\n" + "\n".join(problems))


def classify(sites: list[Site], params: dict[fx.Node, str], config: FP4Config) -> None:
    for site in sites:
        if site.status != "fp4":
            continue
        site.weights = tuple(weight_of(n, params) for n in site.operands)
        reason = _skip_reason(site, config)
        if reason:
            site.skip(reason)
    check_unbiased_dims(sites, config)
