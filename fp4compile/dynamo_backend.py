"""The ``fp4`` torch.compile backend: the FP4 pass on Dynamo's graph, then Inductor."""

import torch
from torch._dynamo.backends.registry import lookup_backend
from torch._inductor.compile_fx import compile_fx

from fp4compile.config import FP4Config
from fp4compile.passes import fp4_pass


INNER_COMPILERS = ("inductor", "aot_eager")


def backend(config: FP4Config | None = None, *, inner: str = "inductor"):
    """A torch.compile backend that quantizes matmuls as ``config`` says (default: the paper's recipe).

    ``inner`` compiles the rewritten graph: "inductor" (generated Triton/C++ code, with Inductor's default
    settings), or "aot_eager" (AOTAutograd with eager kernels: the same numerics without Inductor, for
    debugging)."""
    config = config or FP4Config()
    if inner not in INNER_COMPILERS:
        raise ValueError(f"inner must be one of {INNER_COMPILERS}, got {inner!r}")
    compile_inner = compile_fx if inner == "inductor" else lookup_backend("aot_eager")

    def fp4_backend(gm: torch.fx.GraphModule, example_inputs):
        fp4_pass(gm, example_inputs, config)
        return compile_inner(gm, example_inputs)

    fp4_backend.config = config
    return fp4_backend


# The entry point behind torch.compile(..., backend="fp4").
fp4_backend = backend()


def compile(model_or_fn=None, config: FP4Config | str | None = None, **torch_compile_kwargs):
    """``torch.compile`` with the fp4 backend; ``config`` may also be a recipe name ("paper", ...)."""
    if isinstance(config, str):
        config = FP4Config.from_recipe_name(config)
    if "backend" in torch_compile_kwargs:
        raise TypeError("fp4compile.compile sets the backend itself; pass config=FP4Config(...) instead")
    return torch.compile(model_or_fn, backend=backend(config), **torch_compile_kwargs)
