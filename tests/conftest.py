import functools
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch._inductor import config as inductor_config

from fp4compile.config import FP4Config
from fp4compile.passes import fp4_pass


# The suite's reference torch is 2.13 (CI's); it also runs with 2.11 (the GPU machines') and 2.12, where a
# few CPU tests see torch's own differences (each marked with its reason).
_TORCH = torch.torch_version.TorchVersion(torch.__version__)
TORCH_2_12, TORCH_2_13 = _TORCH >= "2.12", _TORCH >= "2.13"
# Whether Inductor's C++ (CPU) code rounds where eager rounds (emulate_precision_casts, which the backend
# sets): its codegen honours it from torch 2.13; before, CPU results differ from eager in the last bits.
CPU_CODEGEN_ROUNDS_AS_EAGER = TORCH_2_13
older_cpu_codegen = pytest.mark.xfail(
    not CPU_CODEGEN_ROUNDS_AS_EAGER, strict=True,
    reason=f"torch {torch.__version__}'s C++ codegen ignores emulate_precision_casts (honoured from 2.13)")


def _interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter (the GPU machines') takes int() of a scalar argument's 1-element array,
    which NumPy >= 2.4 refuses, so a loop over a runtime bound (``range(0, K, BLOCK_K)``) fails there;
    later Triton squeezes the array first, as this does."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None:
        return

    def squeezed(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = squeezed


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_scalar_index()


def rewritten(fn, *inputs, config: FP4Config | None = None, **compile_kwargs):
    """Run ``fn`` through Dynamo and the FP4 pass only (no Inductor): (the pass's report, the rewritten
    graph's code without source comments)."""
    captured = {}

    def capture(gm, example_inputs):
        captured["report"] = fp4_pass(gm, example_inputs, config or FP4Config.from_recipe_name("paper"))
        captured["code"] = readable_code(gm)
        return gm

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=True, **compile_kwargs)(*inputs)
    assert_complete([captured["report"]])
    return captured["report"], captured["code"]


def assert_complete(reports):
    """Every matmul-like node of each graph and subgraph (counted apart by the pass: summary.matmuls) is a
    site of its report, rewritten or skipped with a reason."""
    assert reports, "no report: was the model compiled with the fp4 backend?"
    for report in reports:
        sites = report["sites"]
        assert report["summary"]["matmuls"] == len(sites), (report["summary"], [(s["subgraph"], s["node"]) for s in sites])
        assert len({(s["subgraph"], s["node"]) for s in sites}) == len(sites), "a site listed twice"
        for s in sites:
            assert s["status"] == "fp4" or (s["status"] == "skipped" and s["reason"]), s


def train_causal_lm(model, backend, tokens, dump_dir, steps=6):
    """AdamW steps on one fixed batch of a transformers causal LM compiled with ``backend``: (losses, the
    reports written under ``dump_dir``, each checked by assert_complete)."""
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = compiled(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    reports = [json.loads(p.read_text()) for p in sorted(dump_dir.glob("*/report.json"))]
    assert_complete(reports)
    return losses, reports


def readable_code(gm) -> str:
    """gm.code less the signature, placeholder aliases, comments and the `x = None` frees."""
    lines = []
    for line in gm.code.strip("\n").splitlines()[1:]:
        line = re.sub(r";\s+[\w =]+= None$", "", line.strip())
        if line and not line.startswith("#") and not re.fullmatch(r"(\w+) = L_\w+", line):
            lines.append(line)
    return "\n".join(lines)


def relative_error(got, want) -> float:
    """||got - want|| / ||want|| of two tensors (or nested lists of numbers), in float64."""
    got, want = (torch.as_tensor(t).double() for t in (got, want))
    return float((got - want).norm() / want.norm())


@functools.lru_cache(maxsize=None)
def bits_equal(got: torch.Tensor, want: torch.Tensor, interpreted: bool) -> bool:
    """Whether two tensors hold the same bits, a NaN matching a NaN; under Triton's interpreter, which
    casts NaN to arbitrary float8 bytes, a float8 NaN in ``want`` matches anything."""
    bits = lambda t: t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int32)  # noqa: E731
    skip = want.float().isnan() & (got.float().isnan() | (interpreted and want.element_size() == 1))
    return bool(((bits(got) == bits(want)) | skip).all())


def run_interpreted(script: str, *args: str, **env: str) -> dict:
    """Run a test file as a script under Triton's interpreter (TRITON_INTERPRET=1 must be set before
    triton is imported, hence a subprocess) and return the JSON it prints last."""
    # The repo root first on the path, so that the script imports this checkout's fp4compile and not the
    # installed one (a script's sys.path starts at its own folder, not the cwd).
    root = os.path.dirname(os.path.dirname(os.path.abspath(script)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path, **env}
    proc = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield


# Most of the suite's time is Inductor generating and building C++ kernels (CPU, cold cache), and
# vectorized kernels take about twice as long as scalar ones. So the suite compiles scalar kernels,
# except in the tests marked `vectorized` (compiled numerics against eager), which compile as users'
# Inductor does.
inductor_config.cpp.simdlen = 1


@pytest.fixture(autouse=True)
def _cpp_vectorization(request):
    if request.node.get_closest_marker("vectorized") is None:
        yield
        return
    with inductor_config.patch({"cpp.simdlen": None}):
        yield
