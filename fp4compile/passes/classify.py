"""Classify each site's operands (weight or activation) and decide whether it is quantized, and why not.

A weight is a value computed from the traced model's parameters (and buffers and constants) only: a
parameter itself through views and casts, or a weight the model makes from parameters (weight_norm, a
slice of a fused weight, a LoRA merge). Dynamo passes parameters as placeholders (or get_attr nodes when
modules are not inlined).
"""

import operator

import torch
import torch.fx as fx

from fp4compile.config import FP4Config
from fp4compile.passes import names
from fp4compile.passes.find_sites import WEIGHT_NK, Site, clean_fqn, example, hint
from fp4compile.runtime import unbiased
from fp4compile.runtime.formats import get_format
from fp4compile.runtime.hadamard import GROUP_SIZES, group_for

# Ops between a router's matmul and the torch.topk that picks experts from its output (DeepSeek-V3 adds a
# bias to its scores and masks expert groups before it picks).
_ROUTER_FUNCTIONS = {torch.softmax, torch.nn.functional.softmax, torch.sigmoid, torch.nn.functional.sigmoid,
                     torch.Tensor.to, torch.Tensor.float, operator.add, operator.sub, operator.mul, torch.add,
                     torch.sub, torch.mul, torch.masked_fill}
_ROUTER_METHODS = {"softmax", "sigmoid", "float", "to", "type", "view", "reshape", "add", "sub", "mul", "masked_fill"}


def parameter_nodes(gm: fx.GraphModule, example_inputs) -> dict[fx.Node, tuple[str, torch.Tensor]]:
    """Graph nodes that hold a parameter of the model: (the parameter's FQN in its root model (names.py),
    or where it belongs to no module, the name the compiled frame gives it; the parameter)."""
    found = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        grapharg = node.meta.get("grapharg")
        source = grapharg.source.name if grapharg is not None and grapharg.source is not None else ""
        if isinstance(value, torch.nn.Parameter) or "_parameters[" in source:
            found[node] = (names.parameter_name(value) or (clean_fqn(source) if source else node.name), value)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and isinstance(value := _attr(gm, node.target), torch.nn.Parameter):
            found[node] = (names.parameter_name(value) or node.target, value)
    return found


def _attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _is_expert_gather(node: fx.Node) -> bool:
    """w[ids] or w.index_select(0, ids) with integer ids: whole matrices of a [E, N, K] parameter picked
    along dim 0 (MoE experts), each quantized along its own rows, so quantizing after the gather gives
    the gathered rows of the quantized parameter. Rows picked from a 2-D parameter (an embedding
    table) stay activations."""
    if node.op not in ("call_function", "call_method") or len(node.args) < 2:
        return False
    source = example(node.args[0])
    if source is None or source.dim() < 3:
        return False
    if node.target in (torch.index_select, torch.Tensor.index_select, "index_select"):
        dim, index = node.args[1], node.args[2] if len(node.args) > 2 else None
        return dim == 0 and isinstance(index, fx.Node)
    if node.target is not operator.getitem:
        return False
    index = node.args[1]
    if isinstance(index, (int, torch.SymInt)):
        return True
    value = example(index)
    return value is not None and not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool


def weights(graph: fx.Graph, params: dict[fx.Node, str]) -> dict[fx.Node, str]:
    """The nodes of ``graph`` that hold a weight, with its name: a value computed from parameters, buffers
    and constants only (a parameter through views and casts, a slice of a fused weight, weight_norm, a
    LoRA merge; MoE experts picked from a parameter by activation-made ids), named by the parameters it
    is computed from, joined by '+'. Anything reached from an activation (a graph input other than a
    parameter or buffer) is an activation."""
    sources: dict[fx.Node, tuple | None] = {}  # node -> its parameters' names, or None for an activation
    for node in graph.nodes:
        if node in params:
            sources[node] = (params[node],)
        elif node.op == "placeholder":
            sources[node] = () if _is_buffer(node) or _is_metadata(node) else None
        elif _is_metadata(node):  # w.shape[0], w.size(1): not the weight's values
            sources[node] = ()
        elif node.op in ("call_function", "call_method", "call_module"):
            inputs = [sources[n] for n in ([node.args[0]] if _is_expert_gather(node) else node.all_input_nodes)]
            sources[node] = None if None in inputs else tuple(dict.fromkeys(name for s in inputs for name in s))
        elif node.op == "get_attr":
            sources[node] = ()
    return {node: "+".join(s) for node, s in sources.items() if s}


def weight_inputs(inputs: list[fx.Node], held: dict[fx.Node, str]) -> list[str]:
    """The names of the weight matrices (``held``'s values of 2 or more dims) among ``inputs``."""
    return [held[a] for a in inputs if a in held and getattr(example(a), "ndim", 0) >= 2]


def _is_buffer(node: fx.Node) -> bool:
    grapharg = node.meta.get("grapharg")
    return grapharg is not None and grapharg.source is not None and "_buffers[" in grapharg.source.name


def _is_metadata(node: fx.Node) -> bool:
    """A size, shape, dtype or device (symbolic or not): no tensor's values."""
    return isinstance(node.meta.get("example_value"), (int, float, bool, torch.SymInt, torch.SymFloat,
                                                         torch.SymBool, torch.Size, torch.dtype, torch.device))


def is_router(node: fx.Node) -> bool:
    """Whether the matmul ``node``'s output picks experts: it reaches torch.topk through softmax, sigmoid,
    casts, views, elementwise add, sub, mul and masked_fill only (a mixture-of-experts router)."""
    todo, seen = [node], set()
    while todo:
        for user in todo.pop().users:
            if user in seen:
                continue
            seen.add(user)
            if user.target in (torch.topk, "topk"):
                return True
            if user.target in _ROUTER_FUNCTIONS or user.op == "call_method" and user.target in _ROUTER_METHODS:
                todo.append(user)
    return False


def _grouped_reason(site: Site, config: FP4Config) -> str | None:
    """Why a grouped GEMM (torch._grouped_mm) is not rewritten, or None."""
    a, b = (example(n) for n in site.operands)
    offs, bias = (site.node.kwargs.get(k, site.node.args[i] if len(site.node.args) > i else None)
                  for k, i in (("offs", 2), ("bias", 3)))
    if a.dim() != 2 or b.dim() != 3 or offs is None or bias is not None:
        return "grouped_mm other than a 2-D input times 3-D weights with offs and no bias"
    if site.weights[1] is None or site.weights[0] is not None:
        return "grouped_mm whose right operand is not a parameter (expert weights)"
    if config.format != "vector" or config.backward != "fp8":
        return (f"grouped_mm (MoE experts) with format={config.format!r}, backward={config.backward!r}: "
                "only format='vector' with backward='fp8' is implemented for experts")
    return None


def _skip_reason(site: Site, config: FP4Config) -> str | None:
    a, b = (example(n) for n in site.operands)
    if a is None or b is None:
        return "operand shapes unknown (no example_value on the node)"
    for t in (a, b):
        if not t.is_floating_point() or t.element_size() < 2:
            return f"{t.dtype} operands (only float16, bfloat16, float32 and float64 are quantized)"
    if site.op not in WEIGHT_NK and (a.dim() < 2 or b.dim() < 2):
        return "a 1-D operand (matrix-vector product)"
    if site.op == "grouped_mm":
        reason = _grouped_reason(site, config)
        if reason:
            return reason
    if not config.quantize_routers and is_router(site.node):
        return ("MoE router (its output picks experts through torch.topk): kept in high precision, as FP8/FP4 "
                "MoE recipes do; set quantize_routers=True to quantize it")
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


def rotation_of(site: Site, config: FP4Config) -> int | None:
    """The rotation group a quantized site takes: config.rotation, or where that does not divide the
    reduction dim, the largest smaller group that does (hadamard.group_for; None if none does)."""
    if not config.rotation or site.reduction is None:
        return config.rotation
    return group_for(site.reduction, config.rotation)


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
        n = b.shape[0] if site.op in WEIGHT_NK else b.shape[-1]
        m = a.shape[-2] if b.dim() > 2 else a.numel() // max(hint(a.shape[-1]), 1)
        problems += unbiased.dim_problems(
            config, site.module, hint(m), hint(n), hint(a.shape[-1]), tiled=site.weights[1] is not None
            and b.dim() == 2, need_dx=a.requires_grad, need_dw=b.requires_grad, tokens_vary=isinstance(m, torch.SymInt))
    if problems:
        raise ValueError("fp4compile cannot apply this recipe to every selected matmul:\n" + "\n".join(problems))


def check_tensor_parallel(sites: list[Site], config: FP4Config) -> None:
    """The rotation multiplies operands by a plain [G, G] matrix, which DTensor refuses to mix with its
    tensors: raise one error naming the modules with tensor-parallel (DTensor) operands, at compile time."""
    if not config.rotation or not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor

    modules = [str(site.module) for site in sites if site.status == "fp4"
               and any(isinstance(example(n), DTensor) for n in site.operands)]
    if modules:
        raise ValueError(
            f"fp4compile: the rotated recipe (FP4Config.rotation) does not support tensor-parallel (DTensor) "
            f"operands, which these modules have: {', '.join(modules)}. Use the dge recipe "
            "(FP4Config.from_recipe_name(\"dge\"), or rotation=None), or exclude them (docs/distributed.md).")


def classify(sites: list[Site], held: dict[fx.Node, str], config: FP4Config) -> None:
    """Set each site's weights (``held``: the graph's weights) and skip those not quantized, with the reason."""
    for site in sites:
        if site.status != "fp4":
            continue
        site.weights = tuple(held.get(n) for n in site.operands)
        if site.op == "multi_head_attention":
            # One spec serves every projection, whose A is query, key, value or the attention's output:
            # activations, a query computed from parameters (a learned probe) too; DGE on A would scale
            # the gradients of key and value.
            site.weights = (None, site.weights[1])
        reason = _skip_reason(site, config)
        if reason is None and config.rotation:
            site.rotation = rotation_of(site, config)
            if site.rotation is None:
                reason = (f"reduction dim of size {site.reduction} is not a multiple of {GROUP_SIZES[0]}, the "
                          "smallest rotation group; pad the dim, set rotation=None or exclude the module")
        if reason:
            site.skip(reason)
    check_unbiased_dims(sites, config)
    check_tensor_parallel(sites, config)
