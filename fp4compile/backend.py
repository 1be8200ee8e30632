"""The ``fp4`` torch.compile backend: the FP4 pass on Dynamo's graph, then Inductor."""

import torch
from torch._inductor.compile_fx import compile_fx

from fp4compile.config import FP4Config
from fp4compile.passes import fp4_pass


def backend(config: FP4Config | None = None):
    """A torch.compile backend that quantizes matmuls as ``config`` says (default: the paper's recipe)."""
    config = config or FP4Config()

    def fp4_backend(gm: torch.fx.GraphModule, example_inputs):
        fp4_pass(gm, example_inputs, config)
        return compile_fx(gm, example_inputs)

    fp4_backend.config = config
    return fp4_backend


# The entry point behind torch.compile(..., backend="fp4").
fp4_backend = backend()


def compile(model_or_fn=None, config: FP4Config | None = None, **torch_compile_kwargs):
    """``torch.compile`` with the fp4 backend; ``config`` may also be a recipe name ("paper", ...)."""
    if isinstance(config, str):
        config = FP4Config.from_recipe_name(config)
    if "backend" in torch_compile_kwargs:
        raise TypeError("fp4compile.compile sets the backend itself; pass config=FP4Config(...) instead")
    return torch.compile(model_or_fn, backend=backend(config), **torch_compile_kwargs)
