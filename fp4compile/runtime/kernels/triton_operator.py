"""Operators made of Triton kernels, with one body that either runs the kernels now or has Inductor launch
them from its generated code.

Each operator is a ``torch.library`` operator with a functional schema (inputs only read, outputs new), so
AOTAutograd sees one opaque node: its CSE merges the calls on an input that several GEMMs share (q/k/v's),
and no input is copied for a kernel that might write it. The body allocates the outputs and launches the
kernels through an executor:

- ``Eager`` runs them at once (``kernel[grid](...)``): the operator's implementation, for eager calls,
  ``inner="aot_eager"`` and Triton's interpreter.
- ``Lowering`` is what Inductor runs instead of the operator (``register_lowerings``) on CUDA tensors: the
  outputs become Inductor buffers and each launch a user-defined Triton kernel in the generated code, as
  for a ``triton_op``, so a call costs no round trip through the dispatcher into Python at run time.

A body reads sizes and dtypes with ``ex.size`` and ``ex.dtype``, grid sizes with ``ex.cdiv`` (symbolic
under dynamic shapes), a size that picks a tile with ``ex.static`` before it allocates (a symbolic one
keeps the operator call), allocates with ``ex.empty`` and ``ex.zeros``, and launches with
``ex.run(kernel, grid, args, meta)``: ``args`` the kernel's tensor and integer arguments by name, ``meta``
its constexprs and ``num_warps``. ``ex.as_bytes`` views a 1-byte tensor as uint8 where it runs eagerly
(Triton's interpreter moves uint8, not float8).
"""

import functools
import warnings

import torch
import triton

_lib = torch.library.Library("fp4compile", "FRAGMENT")
_BODIES = {}


class Eager:
    """Runs a body's kernels now, on ``device``."""

    cdiv = staticmethod(triton.cdiv)
    static = staticmethod(int)

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def size(t: torch.Tensor) -> tuple:
        return tuple(t.shape)

    @staticmethod
    def dtype(t: torch.Tensor) -> torch.dtype:
        return t.dtype

    @staticmethod
    def contiguous(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous()

    @staticmethod
    def as_bytes(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.uint8)

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def zeros(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=self.device)

    @staticmethod
    def run(kernel, grid, args: dict, meta: dict) -> None:
        kernel[tuple(grid)](**args, **meta)


class NotStatic(Exception):
    """A size the body needs as a number is symbolic: Inductor keeps the operator call."""


class Lowering:
    """Records a body's allocations and launches into the graph Inductor is lowering (CUDA only)."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def cdiv(a, b):
        from torch.utils._sympy.functions import CeilDiv

        return CeilDiv(a, b)

    @staticmethod
    def static(size) -> int:
        if not getattr(size, "is_number", True):
            raise NotStatic(size)
        return int(size)

    @staticmethod
    def size(t) -> tuple:
        return tuple(t.get_size())

    @staticmethod
    def dtype(t) -> torch.dtype:
        return t.get_dtype()

    @staticmethod
    def as_bytes(t):
        return t  # a kernel compiled for the 1-byte float dtype moves the same bytes

    @staticmethod
    def contiguous(t):
        from torch._inductor import ir

        t = ir.ExternKernel.require_contiguous(t)
        return t if isinstance(t, ir.TensorBox) else ir.TensorBox.create(t)

    def empty(self, shape, dtype: torch.dtype):
        from torch._inductor.lowering import empty_strided

        return empty_strided(list(shape), None, dtype=dtype, device=self.device)

    def zeros(self, shape, dtype: torch.dtype):
        from torch._inductor.lowering import full

        return full(list(shape), 0, dtype=dtype, device=self.device)

    @staticmethod
    def run(kernel, grid, args: dict, meta: dict) -> None:
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_mutation
        from torch._inductor.lowering import lowerings

        # The lowering torch.library.triton_op's launches get: Inductor's user-defined Triton kernel.
        # Inductor drops num_warps passed as an argument (4 warps instead): as Dynamo does for such a
        # launch, they travel in a one-config autotuner.
        options = tuple((name, meta[name]) for name in _LAUNCH_OPTIONS if name in meta)
        constants = {name: value for name, value in meta.items() if name not in _LAUNCH_OPTIONS}
        lowerings[triton_kernel_wrapper_mutation](
            kernel_idx=kernel_side_table.add_kernel(_with_options(kernel, options) if options else kernel),
            constant_args_idx=kernel_side_table.add_constant_args(constants),
            grid=[(*grid, 1, 1)[:3]],
            tma_descriptor_metadata={},
            kwargs=args,
        )


_LAUNCH_OPTIONS = ("num_warps", "num_stages")


@functools.cache
def _with_options(kernel, options: tuple):
    """``kernel`` as a one-config autotuner with these launch options (one object per pair, so the kernel
    side table keeps one entry)."""
    return triton.autotune(configs=[triton.Config({}, **dict(options))], key=[])(kernel)


def define(schema: str, body, fake):
    """Define ``fp4compile::<schema>`` with ``body(ex, *args)`` as its implementation on every device (the
    kernels run under Triton's interpreter on CPU) and as its Inductor lowering on CUDA; ``fake`` gives
    its outputs' metadata. Returns the operator's overload."""
    name = schema.split("(")[0]
    _lib.define(schema)
    _lib.impl(name, lambda *args: body(Eager(args[0].device), *args), "CompositeExplicitAutograd")
    torch.library.register_fake(f"fp4compile::{name}", fake, lib=_lib)
    op = getattr(torch.ops.fp4compile, name).default
    _BODIES[op] = body
    return op


@functools.cache
def register_lowerings() -> bool:
    """Have Inductor lower every operator ``define`` made into launches from its generated code, for CUDA
    tensors; elsewhere, and where the body needs a symbolic size as a number, the operator call stays.
    Inductor keeps lowerings per process. The lowering builds on torch internals (the lowering of
    ``triton_kernel_wrapper_mutation``, ``kernel_side_table``, as torch 2.11-2.13 have them): where they
    are missing, it warns once and the operators stay calls (same results, more host time). Returns
    whether the lowerings are in place."""
    try:
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_mutation
        from torch._inductor.lowering import fallback_handler, lowerings, register_lowering

        if triton_kernel_wrapper_mutation not in lowerings or not hasattr(kernel_side_table, "add_constant_args"):
            raise AttributeError("no lowering of triton_kernel_wrapper_mutation or no kernel_side_table.add_constant_args")
    except (ImportError, AttributeError, KeyError) as e:
        warnings.warn(f"fp4compile: this torch lacks what the quantize kernels' Inductor lowering uses ({e!r}); "
                      "they run as operator calls, with more host time per step")
        return False

    for op, body in _BODIES.items():
        call = fallback_handler(op, add_to_fallback_set=False)

        def lower(*args, body=body, call=call):
            device = args[0].get_device()
            if device is None or device.type != "cuda":
                return call(*args)
            try:
                return body(Lowering(device), *args)
            except NotStatic:
                return call(*args)

        register_lowering(op, type_promotion_kind=None)(lower)
    return True
