"""Names of modules and parameters in the user's model, whatever frame Dynamo compiled.

Dynamo names what it traces after the compiled frame's locals: under regional compilation
(``block.compile()``), after a graph break, or under ``@train_step``, ``L['self'].mlp.down_proj`` starts at
the block or at the step's arguments, not at the model. But the backend receives parameters as the real
``nn.Parameter`` objects and the frame's locals are live while it runs, so names are resolved by object:
an index from every module and parameter in the process to its FQN in the largest root module holding it
(a root: a module no other module holds), without the wrappers of torch.compile, DDP, FSDP1 and activation
checkpointing.

One compiled graph serves every block that runs the same code: when include/exclude treat those blocks
differently, :func:`specialize` guards the graph on the block's selection, so Dynamo compiles once per
distinct selection.
"""

import gc
import hashlib
import logging
import re
import warnings
import weakref

import torch
import torch.nn as nn
from torch.utils.weak import WeakIdKeyDictionary

log = logging.getLogger("fp4compile")

_WRAPPER_ATTRS = {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}
_DATA_PARALLEL = (nn.DataParallel, nn.parallel.DistributedDataParallel)
# The frame variable a Dynamo path starts from: L['self'], L['args'][0], G['model'].
_BASE = re.compile(r"^([LG])\['([^']*)'\]((?:\[\d+\])*)")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_wrapper(parent: nn.Module, attr: str) -> bool:
    return attr in _WRAPPER_ATTRS or (attr == "module" and isinstance(parent, _DATA_PARALLEL))


class _Index:
    """Every module and parameter alive in the process -> (FQN, root module). One walk over gc's objects.
    Keys and roots are held weakly: the index outlives the compile that built it, and must not keep a
    model the user has let go alive (with its parameters: a whole model's memory on the GPU)."""

    def __init__(self):
        self.compile = _compile_token()
        self.entries = WeakIdKeyDictionary()
        modules = [o for o in gc.get_objects() if issubclass(type(o), nn.Module)]
        held = {id(c) for m in modules for c in m._modules.values() if c is not None}
        roots = [m for m in modules if id(m) not in held]
        # Largest root first: a module held by several roots (a model and a copy of one block) is named in it.
        roots.sort(key=lambda r: -sum(1 for _ in r.parameters()))
        for root in roots:
            self._walk(root)

    def get(self, obj) -> tuple[str, nn.Module] | None:
        entry = self.entries.get(obj)
        root = entry[1]() if entry else None
        return None if root is None else (entry[0], root)

    def _walk(self, root: nn.Module) -> None:
        stack, root_ref = [(root, "")], weakref.ref(root)
        while stack:
            module, prefix = stack.pop()
            if module in self.entries:
                continue
            self.entries[module] = (prefix, root_ref)
            for name, p in module._parameters.items():
                if p is not None and p not in self.entries:
                    self.entries[p] = (_join(prefix, name), root_ref)
            for name, child in reversed(module._modules.items()):
                if child is not None:
                    stack.append((child, prefix if _is_wrapper(module, name) else _join(prefix, name)))


_index: _Index | None = None


def _compile_token():
    """Something that differs between two compiles (compile ids repeat after torch._dynamo.reset())."""
    context = torch._guards.TracingContext.try_get()
    return None if context is None else weakref.ref(context)


def lookup(obj) -> tuple[str, nn.Module] | None:
    """(FQN, root) of a module or parameter. Walks gc again for an object not seen yet (once per compile)."""
    global _index
    token = _compile_token()
    found = None if _index is None else _index.get(obj)
    if found is None and (_index is None or token is None or _index.compile != token):
        _index = _Index()
        found = _index.get(obj)
    return found


def modules_of_type(cls: type, exact: bool = False) -> list[nn.Module]:
    """The indexed modules that are instances of ``cls`` (of exactly ``cls`` if ``exact``)."""
    global _index
    if _index is None:
        _index = _Index()
    return [m for m in _index.entries.keys() if (type(m) is cls if exact else isinstance(m, cls))]


def parameter_name(value) -> str | None:
    found = lookup(value) if isinstance(value, torch.Tensor) else None
    return found[0] if found else None


def _frame_scope() -> dict | None:
    """The compiled frame's globals and locals as Dynamo's paths name them (L, G), None outside Dynamo."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    try:
        tx = InstructionTranslator.current_tx()
    except AttributeError:  # no frame was ever traced in this thread
        return None
    if tx is None:
        return None
    root = tx.output.root_tx
    return {"L": root.f_locals, "G": root.f_globals}


# A step of a Dynamo path into a module's own dicts: ._modules['mlp'] (or _parameters, _buffers), or through
# __dict__ (.__dict__['_modules']['mlp']) where the module's class defines its own __getattr__ (diffusers'
# ModelMixin, PEFT's models).
CONTAINER = r"\.(?:__dict__\['_(?:modules|parameters|buffers)'\]|_(?:modules|parameters|buffers))\['([^']*)'\]"
# One step of a Dynamo path after its base: a container step, .mlp, [0].
_STEP = re.compile(CONTAINER + r"|\.(\w+)|\[(\d+)\]")


def frame_value(path: str):
    """The object a Dynamo path ("L['self'].layers.0.mlp", "G['model']._modules['fc']") names in the frame
    being compiled, or None."""
    scope = _frame_scope()
    base = _BASE.match(path)
    if scope is None or base is None:
        return None
    kind, name, indices = base.groups()
    steps = list(_STEP.finditer(path, base.end()))
    if sum(len(m.group(0)) for m in steps) != len(path) - base.end():
        return None
    try:
        obj = scope[kind][name]
        for index in re.findall(r"\d+", indices):
            obj = obj[int(index)]
        for step in steps:
            key, attr, index = step.groups()
            if index is not None:
                obj = obj[int(index)]
            elif isinstance(obj, nn.Module) and (key or attr) in obj._modules:
                obj = obj._modules[key or attr]
            else:
                obj = getattr(obj, key or attr)
    except (KeyError, IndexError, AttributeError, TypeError):
        return None
    return obj


def resolve_module(path: str) -> tuple[str, nn.Module] | None:
    """(FQN in its root model, the root) of the module at a Dynamo path, None if it cannot be resolved."""
    module = frame_value(path)
    return lookup(module) if isinstance(module, nn.Module) else None


def root_label(root: nn.Module) -> str:
    """How a report tells roots apart: the frame variable holding the root (``teacher``), else its class."""
    scope = _frame_scope() or {}
    for variables in scope.values():
        for name, value in variables.items():
            if value is root:
                return name
    return type(root).__name__


_warned: set = set()


def warn_unresolved(module: str | None, config) -> None:
    """Warn once per include/exclude pattern that it is matched against a name relative to the frame."""
    for field in ("include", "exclude"):
        patterns = getattr(config, field)
        for pattern in (patterns,) if callable(patterns) else patterns or ():
            key = (field, pattern if callable(pattern) else str(pattern))
            if key in _warned:
                continue
            _warned.add(key)
            message = (
                f"fp4compile: the module {module!r} of a compiled graph could not be named in its root model, so "
                f"config.{field} {pattern!r} is matched against its name relative to the compiled frame"
            )
            warnings.warn(message, stacklevel=2)
            log.warning("%s", message)


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _relative(name: str, prefix: str) -> str | None:
    if not prefix or name == prefix:
        return name[len(prefix):]
    return name[len(prefix) + 1:] if name.startswith(prefix + ".") else None


def _selection(block: nn.Module, config) -> tuple[str, ...]:
    """The submodules of ``block`` (relative FQNs, "" for itself) that include/exclude keep out of FP4."""
    prefix = lookup(block)[0]
    kept_out = []
    for module in block.modules():
        name = lookup(module)[0]
        rel = _relative(name, prefix)
        if rel is not None and not config.selects(name)[0]:
            kept_out.append(rel)
    return tuple(sorted(kept_out))


def _source(base: str):
    """Dynamo's source for a frame variable path: L['self'], L['args'][0], G['model']."""
    from torch._dynamo.source import GetItemSource, GlobalSource, LocalSource

    scope, name, indices = _BASE.match(base).groups()
    source = LocalSource(name, is_input=True) if scope == "L" else GlobalSource(name)
    for index in re.findall(r"\d+", indices):
        source = GetItemSource(source, int(index))
    return source


def specialize(sites, config) -> dict[str, list[str]]:
    """For each module the frame reaches sites through (the block under regional compilation), the FQNs of
    the modules of its class whose calls this graph also serves: Dynamo reuses a graph for every module
    running the same code. When include/exclude decide this graph's sites differently in some of them, the
    graph is guarded on the block's selection (an attribute set on each module of the class), so Dynamo
    compiles once per distinct selection and serves only the modules with this block's."""
    bases: dict[str, set[str]] = {}
    for site in sites:
        stack = site.node.meta.get("nn_module_stack")
        match = _BASE.match(list(stack.values())[-1][0]) if stack and site.module_resolved else None
        if match:
            bases.setdefault(match.group(0), set()).add(site.module)
    served = {}
    for base, modules in bases.items():
        block = frame_value(base)
        found = lookup(block) if isinstance(block, nn.Module) else None
        if found is None or not found[0]:  # a root: modules of its class are named alike, and decided alike
            continue
        name = found[0]
        rels = sorted({r for m in modules if (r := _relative(m, name)) is not None})
        blocks = [(lookup(b)[0], b) for b in modules_of_type(type(block), exact=True)]
        decisions = {tuple(config.selects(_join(n, r))[0] for r in rels) for n, _ in blocks}
        if len(decisions) > 1:
            selections = [_selection(b, config) for _, b in blocks]
            _guard(base, blocks, selections, config)
            selection = _selection(block, config)
            blocks = [nb for nb, s in zip(blocks, selections) if s == selection]
        # Modules of the class in other models (a teacher, a model not freed yet) may run this graph too.
        mine = {n for n, b in blocks if lookup(b)[1] is found[1]}
        if len(mine) > 1:
            served[name] = sorted(mine, key=_natural)
    return served


def _guard(base: str, blocks: list, selections: list, config) -> None:
    from torch._dynamo.guards import GuardBuilder, install_guard
    from torch._dynamo.source import AttrSource

    attr = "_fp4compile_selection_" + hashlib.sha1(repr((config.include, config.exclude)).encode()).hexdigest()[:8]
    for (_, block), selection in zip(blocks, selections):
        if block.__dict__.get(attr) != selection:
            block.__dict__[attr] = selection
    install_guard(AttrSource(_source(base), attr).make_guard(GuardBuilder.EQUALS_MATCH))
    groups = len(set(selections))
    limit = torch._dynamo.config.recompile_limit
    cls = type(blocks[0][1])
    if groups + 2 > limit and (cls, attr) not in _warned:
        _warned.add((cls, attr))
        message = (
            f"fp4compile: include/exclude select the sites of the {len(blocks)} {cls.__name__} modules in {groups} "
            f"different ways, so their shared code compiles {groups} times, too close to "
            f"torch._dynamo.config.recompile_limit = {limit}: past it Dynamo runs the remaining blocks eagerly, "
            f"unquantized. Raise it: torch._dynamo.config.recompile_limit = {groups + 8} (or "
            f"torch.compile(..., recompile_limit={groups + 8})), or make the filters treat the blocks alike."
        )
        warnings.warn(message, stacklevel=2)
        log.warning("%s", message)
