"""Launching a Triton kernel from an operator's Python body in a few microseconds of host time.

Triton's JIT call, ``kernel[grid](...)``, binds the arguments, works out their specialization and looks
the compiled kernel up on every call, several times the host time of the compiled kernel's own
launcher, and a training step launches hundreds of these kernels (CHANGELOG.md). ``launch`` goes through the JIT once per specialization, then calls the compiled kernel.
Its key holds everything Triton specializes on (dtypes, pointers' 16-byte alignment, integers equal to
1, divisible by 16, or beyond int32) and the constexprs, so no call reuses a kernel compiled under
assumptions its arguments break. The fast path calls Triton internals (the compiled kernel's ``run``,
``function``, ``packed_metadata``, ``launch_metadata`` and ``triton.knobs``' launch hooks, as Triton 3.3-3.9
have them): where they are missing, and under Triton's interpreter, every call goes through the JIT.
"""

import torch

try:
    from triton import knobs
except ImportError:
    knobs = None

_LAUNCHER = ("run", "function", "packed_metadata", "launch_metadata")
_compiled = {}


def _launcher(kernel):
    """The compiled kernel if the fast path can call it, else None (every call through the JIT)."""
    if knobs is None or not all(hasattr(kernel, name) for name in _LAUNCHER):
        return None
    return kernel


def _specialization(arg):
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, int) and not isinstance(arg, bool):
        return arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31
    return type(arg), arg


def launch(fn, grid: tuple, args: tuple, constexprs: dict, num_warps: int) -> None:
    """``fn[grid](*args, **constexprs, num_warps=num_warps)``; ``args`` are fn's leading parameters and
    ``constexprs`` name the rest; the first argument is a tensor on the kernel's device."""
    key = (fn, args[0].device, tuple(map(_specialization, args)), tuple(constexprs.items()), num_warps)
    kernel = _compiled.get(key)
    if kernel is None:
        kernel = fn[grid](*args, **constexprs, num_warps=num_warps)
        if key not in _compiled:
            _compiled[key] = _launcher(kernel)
        return
    grid = (*grid, 1, 1)[:3]
    stream = torch.cuda.current_stream(args[0].device).cuda_stream
    values = (*args, *(constexprs[name] for name in fn.arg_names[len(args):]))
    kernel.run(*grid, stream, kernel.function, kernel.packed_metadata, kernel.launch_metadata(grid, stream, *values),
               knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *values)
