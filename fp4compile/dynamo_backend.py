"""The ``fp4`` torch.compile backend: the FP4 pass on Dynamo's graph, then Inductor."""

import collections
import functools
import importlib.util
import os
import warnings

import torch
from torch._dynamo.backends.registry import lookup_backend
from torch._inductor.compile_fx import compile_fx

from fp4compile.config import FP4Config
from fp4compile.passes import fp4_pass
from fp4compile.passes.joint import JointPasses


INNER_COMPILERS = ("inductor", "aot_eager")


@functools.cache
def prepare_inductor() -> None:
    """Two additions to Inductor, per process (later compiles with other backends see them too; neither
    changes numerics):

    - The Triton-kernel operators' lowerings (kernels/triton_operator.py): Inductor launches their kernels
      from its generated code instead of calling the operator through the dispatcher.
    - A quantized operand stored once when several extern kernels read it (x's FP4 values feed the q, k and
      v GEMMs and the transpose saved for dW). Inductor gives an extern kernel an input that is not yet a
      buffer as a copy, fused into the producer as one more store per reader, unless the reader is in its
      ``needs_realized_inputs`` (as ``aten.mm`` is, ``aten._scaled_mm`` and custom ops are not): then a
      value with several users becomes one buffer first, if computing it reads more than one buffer
      (``realize_hint``; on torch 2.11 the values of a SwiGLU output read one, and keep a copy per reader).
    """
    from torch._inductor.lowering import add_needs_realized_inputs

    ops = [torch.ops.aten._scaled_mm.default]
    if importlib.util.find_spec("triton"):
        from fp4compile.runtime.kernels import fp4_rows_triton, fp8_grad_triton, transpose_triton  # noqa: F401
        from fp4compile.runtime.kernels.triton_operator import register_lowerings

        ops += [torch.ops.fp4compile.fp8_grad_operands.default, torch.ops.fp4compile.transpose_bytes.default,
                torch.ops.fp4compile.fp4_rows.default, torch.ops.fp4compile.fp4_rows_swiglu.default]
        register_lowerings()
    add_needs_realized_inputs(ops)


def on_cuda(example_inputs) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)


def inductor_patches(mode: str | None = None, options: dict | None = None, cuda: bool = False) -> dict:
    """Inductor settings for torch.compile's ``mode`` and ``options``, as backend="inductor" reads them: the
    mode's (``torch._inductor.list_mode_options``), then each option (``torch._inductor.list_options``).
    One default differs on CUDA (``cuda``): the C++ wrapper is on, unless the options or the process
    (``TORCHINDUCTOR_CPP_WRAPPER``) say otherwise or CUDA graphs are asked for (Inductor runs the C++
    wrapper without them): the FP4 graphs launch about twice BF16's kernels and extern calls, and
    from generated Python that host time bounds small batches."""
    from torch._inductor import list_mode_options, list_options

    patches = dict(list_mode_options(mode)) if mode and mode != "default" else {}
    for key, value in (options or {}).items():
        name = key.replace("-", "_")
        if name not in list_options():
            raise ValueError(f"unknown Inductor option {key!r}: torch._inductor.list_options() lists them")
        patches[name] = value
    if cuda and "cpp_wrapper" not in patches and "TORCHINDUCTOR_CPP_WRAPPER" not in os.environ and not patches.get(
            "triton.cudagraphs", torch._inductor.config.triton.cudagraphs):
        patches["cpp_wrapper"] = True
    if patches.get("cpp_wrapper"):
        patches = {**patches, **cpp_wrapper_settings(patches)}
    return patches


# Before torch 2.13, Inductor's AVX2-wide C++ code computed the rotated recipe's linear wrong (2.11, 2.12:
# errors of ~800 on outputs below 10, tests/test_fp4_matmul.py), its scalar code right.
SCALAR_CPU_CODE = torch.torch_version.TorchVersion(torch.__version__) < "2.13"


def cpu_vector_width(patches: dict) -> dict:
    """The vector width of CPU code where the options name none: scalar before torch 2.13
    (``SCALAR_CPU_CODE``); ``cpp.simdlen`` = 256 where Inductor would vectorize with AVX512: torch 2.13's
    AVX512 code for a kernel of two 16-bit transposed copies (a backward storing W^T and X^T) stored
    wrong values, NaN among them (tests/test_backend.py); at AVX2 width they are right."""
    from torch._inductor import config
    from torch._inductor.cpu_vec_isa import pick_vec_isa, valid_vec_isa_list

    if "cpp.simdlen" in patches or config.cpp.simdlen is not None:
        return {}
    if SCALAR_CPU_CODE:
        return {"cpp.simdlen": 1}
    if pick_vec_isa().bit_width() != 512:
        return {}
    return {"cpp.simdlen": 256} if any(isa.bit_width() == 256 for isa in valid_vec_isa_list()) else {}


def cpp_wrapper_settings(patches: dict) -> dict:
    """The Triton settings the C++ wrapper needs (``store_cubin``, ``autotune_at_compile_time``...), as
    Inductor derives them under ``patches``. Inductor applies them around the forward's compile only;
    the backward, compiled at the first backward call, re-enters ``config_patches`` alone, so without them
    there the C++ wrapper found no compiled kernels ("CudaKernelParamCache not populated", torch 2.11)."""
    from torch._inductor import config

    try:
        from torch._inductor.compile_fx import get_cpp_wrapper_config
    except ImportError:  # a torch without it: Inductor's own handling, as for backend="inductor"
        return {}
    with config.patch(patches):
        return get_cpp_wrapper_config()


# Dynamo's graph-break counts (never reset in a process) when the backend last looked: what it finds
# above them broke while the graph it is called with was traced.
_BREAKS_SEEN = collections.Counter(torch._dynamo.utils.counters["graph_break"])


def warn_checkpoint_breaks() -> None:
    """Warn of a graph break Dynamo took inside an activation-checkpointed region (or another higher-order
    op: its reasons start with "HOP:") since the backend last looked: the region then runs eagerly, in
    high precision, and no graph the backend sees (so no report) has its matmuls. Dynamo counts its
    graph-break reasons before it compiles the graph that ends at the break."""
    counts = torch._dynamo.utils.counters["graph_break"]
    for reason, count in counts.items():
        if count > _BREAKS_SEEN[reason] and (reason.startswith("HOP:") or "checkpoint" in reason.lower()):
            warnings.warn(
                "fp4compile: Dynamo broke the graph inside an activation-checkpointed region (or another "
                "higher-order op), which therefore runs eagerly in high precision and is in no fp4 report. "
                f"Dynamo's reason: {reason.splitlines()[0]!r}. For a side effect that the region undoes "
                "before it returns (as transformers' attention code does with a context variable), set "
                "torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True before "
                "compiling; otherwise remove the side effect or the checkpointing (docs/usage.md, "
                "\"Activation checkpointing\"). TORCH_LOGS=graph_breaks shows where.", stacklevel=2)
    _BREAKS_SEEN.update({reason: count - _BREAKS_SEEN[reason] for reason, count in counts.items()})


def backend(config: FP4Config | None = None, *, inner: str = "inductor"):
    """A torch.compile backend that quantizes matmuls as ``config`` says (default: FP4Config(), the
    rotated recipe).

    ``inner`` compiles the rewritten graph: "inductor" (generated Triton/C++ code, with Inductor's default
    settings unless torch.compile's ``mode`` or ``options`` say otherwise, as for backend="inductor",
    except ``emulate_precision_casts``, on by default: generated kernels round where eager code does,
    on CUDA the C++ wrapper, on unless CUDA graphs are asked for, and on CPU AVX2-wide vectors where
    Inductor would pick AVX512, scalar code before torch 2.13: ``cpu_vector_width``), or
    "aot_eager" (AOTAutograd with eager kernels: the same numerics without Inductor, for debugging)."""
    config = config or FP4Config()
    if inner not in INNER_COMPILERS:
        raise ValueError(f"inner must be one of {INNER_COMPILERS}, got {inner!r}")

    def fp4_backend(gm: torch.fx.GraphModule, example_inputs, *, mode=None, options=None):
        try:
            return _rewrite_and_compile(gm, example_inputs, mode, options)
        except Exception as e:
            if torch._dynamo.config.suppress_errors:  # Dynamo will log the error and run the code eagerly
                warnings.warn(
                    f"fp4compile: compiling a graph failed ({_summary(e)}) "
                    "and torch._dynamo.config.suppress_errors is set, so Dynamo runs its code eagerly: its "
                    "matmuls train in high precision. Unset suppress_errors to see the error.", stacklevel=2)
            raise

    def _rewrite_and_compile(gm, example_inputs, mode, options):
        if inner != "inductor" and (mode or options):
            raise ValueError(f"mode and options configure Inductor, which inner={inner!r} does not use")
        patches = inductor_patches(mode, options, cuda=on_cuda(example_inputs)) if inner == "inductor" else None
        warn_checkpoint_breaks()
        report = fp4_pass(gm, example_inputs, config)
        try:
            return _compile(gm, example_inputs, patches)
        except _EAGER_FALLBACK as e:
            if not report["summary"].get("fp4"):
                raise  # nothing quantized: Dynamo runs the code eagerly, as it would for backend="inductor"
            raise eager_fallback_error(report, e) from e

    def _compile(gm, example_inputs, patches):
        if inner == "inductor":
            prepare_inductor()
            # Fused kernels round where eager rounds (to BF16: DGE's factor, a rotated weight recomputed for
            # DGE): without it Inductor skips those casts and the weight gradients drift from eager's.
            patches.setdefault("emulate_precision_casts", True)
            if not on_cuda(example_inputs):
                patches.update(cpu_vector_width(patches))
            # Always (also where it changes nothing): its uuid keys Inductor's cache on fp4compile's code.
            previous = patches.get("joint_custom_pre_pass", torch._inductor.config.joint_custom_pre_pass)
            patches["joint_custom_pre_pass"] = JointPasses(previous)
            return compile_fx(gm, example_inputs, config_patches=patches)
        return lookup_backend(inner)(gm, example_inputs)

    fp4_backend.config = config
    return fp4_backend


# What a backend may raise for Dynamo to run the graph's code eagerly instead of failing (a graph break):
# fake-tensor errors, such as a data-dependent scalar a tensor subclass's op needs.
_EAGER_FALLBACK = getattr(torch._dynamo.exc, "exceptions_allowed_to_be_fallback", ())


def _summary(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def eager_fallback_error(report: dict, error: Exception) -> RuntimeError:
    """The error raised in place of ``error``, which would make Dynamo run a graph with FP4 sites eagerly,
    in high precision, with only a log line."""
    modules = sorted({str(s["module"]) for s in report["sites"] if s["status"] == "fp4"})
    shown = ", ".join(modules[:4]) + (f" and {len(modules) - 4} more" if len(modules) > 4 else "")
    return RuntimeError(
        f"fp4compile: compiling {report['graph']} failed after its matmuls were rewritten "
        f"({_summary(error)}). Dynamo would run this "
        f"code eagerly instead, so its {report['summary']['fp4']} FP4 sites (modules {shown}) would train in "
        "high precision with no error; fp4compile raises instead. With tensor-parallel (DTensor) weights "
        "see docs/distributed.md for the recipes that support them; to run these modules in high precision "
        "on purpose, exclude them (FP4Config.exclude)."
    )


# The entry point behind torch.compile(..., backend="fp4").
fp4_backend = backend()


def compile(model_or_fn=None, config: FP4Config | str | None = None, **torch_compile_kwargs):
    """``torch.compile`` with the fp4 backend; ``config`` may also be a recipe name ("paper", ...)."""
    if isinstance(config, str):
        config = FP4Config.from_recipe_name(config)
    if "backend" in torch_compile_kwargs:
        raise TypeError("fp4compile.compile sets the backend itself; pass config=FP4Config(...) instead")
    return torch.compile(model_or_fn, backend=backend(config), **torch_compile_kwargs)
