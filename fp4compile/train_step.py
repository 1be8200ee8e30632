"""``@fp4compile.train_step``: compile a whole training step (forward, loss, backward, optimizer step)."""

import functools

from fp4compile.dynamo_backend import compile
from fp4compile.config import FP4Config


def train_step(fn=None, *, config: FP4Config | str | None = None, **torch_compile_kwargs):
    """Decorate a function that runs one training step; it runs compiled with the fp4 backend and returns
    what the function returns. Use bare (``@train_step``) or with arguments (``@train_step(config=...)``).
    Dynamo splits the step at ``loss.backward()``; the forward graphs carry the FP4 matmuls."""
    if fn is None:
        return functools.partial(train_step, config=config, **torch_compile_kwargs)
    compiled = compile(fn, config=config, **torch_compile_kwargs)
    return functools.wraps(fn)(compiled)
