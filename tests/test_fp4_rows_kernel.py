"""The Triton kernel for an activation's FP4 operand (kernels/fp4_rows_triton.py) against its reference,
``gemm_operand(x, "vector")`` and the scale's ``reciprocal``: bit-exact values, scales and reciprocals on
a CUDA device; on CPU in Triton's interpreter (a subprocess, as in test_fp8_grad_kernel.py), where scales
and reciprocals are bit-exact and values are compared except where the reference's are NaN (the
interpreter casts NaN to arbitrary float8 bytes; E2M1 values are exact in float8, so its cast of every
other value is exact).

Cases: ragged widths (1, 70, 2048, 5632: one row per program to four), a row stride wider than the
row, the fused rotation (hadamard.rotate first) in each group size, float32 / bfloat16 / float16
inputs, values on E2M1 rounding ties, a NaN, an inf, an all-zero row, a row tiny enough for the 2^-126
scale floor, and negative values that round to -0; and SwiGLU's product quantized (``fp4_rows_swiglu``)
at each shape and rotation, against ``gemm_operand(silu(gate) * up)``. Run as ``TRITON_INTERPRET=1 python
tests/test_fp4_rows_kernel.py``, this file prints the interpreter results.
Ahead-of-time builds for sm_90 and sm_100 check the kernel compiles for both, on any machine.
"""

import json
import os
import re

import pytest
import torch
from conftest import CPU_CODEGEN_ROUNDS_AS_EAGER, bits_equal, relative_error, run_interpreted

triton = pytest.importorskip("triton")

from fp4compile.runtime.hadamard import rotate, rotation_matrix  # noqa: E402
from fp4compile.runtime.kernels.fp4_rows_triton import MAX_K, fp4_rows, fp4_rows_swiglu  # noqa: E402
from fp4compile.runtime.quantize import gemm_operand, reciprocal  # noqa: E402

SHAPES = [(9, 70), (5, 2048), (3, 5632), (6, 1)]
# (shape, row padding, rotation group): the fused rotation, at 1-4 rows per program, in every group size
ROTATED = [((5, 2048), 0, 128), ((3, 5632), 0, 128), ((9, 64), 32, 16), ((70, 256), 0, 32), ((6, 512), 0, 64)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# x / scale on every E2M1 rounding tie (amax 1.5 -> scale 1/4), both signs, and values that round to -0;
# all dyadic, so that sums of them are exact in any order (a rotated row 0).
TIES = [0.0625, 0.1875, 0.3125, 0.4375, 0.625, 0.875, 1.25, -0.0625, -0.3125, -1.25, -0.0078125, 1.5]


def _reference(x: torch.Tensor) -> tuple:
    """What fp4_rows returns for x: gemm_operand(x, "vector") and the scale's reciprocal."""
    values, scale = gemm_operand(x, "vector")
    return values, scale, reciprocal(scale)


def _inputs(m: int, k: int, dtype: torch.dtype, device: str, pad: int = 0, dyadic: bool = False) -> torch.Tensor:
    """x [m, k], seen through a [m, k + pad] buffer (row stride k + pad) when ``pad``. ``dyadic``: each
    row's values are multiples of one power of two, small enough that sums of 128 are exact in FP32, so
    a rotation's result does not depend on the order of its additions (the kernel's dot, torch's GEMM)."""
    g = torch.Generator().manual_seed(m * 1000 + k)
    base = torch.randint(-64, 65, (m, k + pad), generator=g) / 16 if dyadic else torch.randn(m, k + pad, generator=g)
    x = base * torch.exp2(torch.randint(-10, 10, (m, 1), generator=g).float())
    if k >= len(TIES):
        x[0, : len(TIES)] = torch.tensor(TIES)
        x[0, len(TIES):k] = 0.5
    if m > 4 and k > 4:
        x[1, 2], x[2, 0] = float("nan"), float("-inf")
        x[3] = 0.0
        # Below the 2^-126 scale floor's reach (amax < 6 * 2^-126); powers of two, so that a rotated row's
        # FP32 sums are exact in any order (FP16's smallest normal is 6e-5: 1e-7 rounds to 2^-23).
        x[4] = 2.0**-125 if dtype != torch.float16 else 1e-7
    return x.to(dtype).to(device)[:, :k]


def _gate(m: int, k: int, dtype: torch.dtype, exact: bool) -> torch.Tensor:
    """SwiGLU's gate [m, k] in ``dtype`` on the CPU, each value's silu the same in every FP32 computation of
    it within 2^-16 (CUDA's, the CPU's, approximate divisions): where silu could round to either of two
    ``dtype`` values, 0 (silu 0).
    ``exact`` (FP32, where any such difference shows, and a rotation, whose sums must be exact in any
    order: see _inputs): values whose silu rounds to themselves or to -0 (in FP32, whose exp over- or
    underflows), and 0."""
    g = torch.Generator().manual_seed(7 * m + k)
    if exact:
        choices = torch.tensor([0.0, 104.0, -90.0, -1000.0] if dtype == torch.float32 else [0.0, 16.0, 32.0, -1000.0])
        return choices[torch.randint(0, len(choices), (m, k), generator=g)].to(dtype)
    x = (torch.randn(m, k, generator=g) * 4).to(dtype)
    silu = torch.nn.functional.silu(x.double())
    clear = (silu * (1 + 2**-16)).to(dtype) == (silu * (1 - 2**-16)).to(dtype)
    return torch.where(clear, x, torch.zeros((), dtype=dtype))


def _swiglu_case(m: int, k: int, pad: int, dtype: torch.dtype, group, device: str) -> list:
    exact = dtype == torch.float32 or group is not None
    gate, up = _gate(m, k + pad, dtype, exact)[:, :k], _inputs(m, k, dtype, "cpu", pad, dyadic=group is not None)
    x = torch.nn.functional.silu(gate) * up
    got = fp4_rows_swiglu(gate.to(device), up.to(device),
                          *([] if group is None else [rotation_matrix(group, device, dtype)]))
    want = _reference(x if group is None else rotate(x, group))
    return [[tuple(g.shape) == tuple(w.shape), bits_equal(g.cpu(), w, INTERPRETED)]
            for g, w in zip(got, want, strict=True)]


def _all_cases(device: str) -> dict:
    results = {}
    cases = [(shape, 0, None) for shape in SHAPES] + [((9, 70), 10, None)] + ROTATED
    for (m, k), pad, group in cases:
        for dtype in DTYPES:
            x = _inputs(m, k, dtype, device, pad, dyadic=group is not None)
            got = fp4_rows(x) if group is None else fp4_rows(x, rotation_matrix(group, x.device, dtype))
            want = _reference(x.cpu() if group is None else rotate(x.cpu(), group))
            results[f"{m}x{k} pad {pad} rotation {group} {dtype}"] = [
                [tuple(g.shape) == tuple(w.shape), bits_equal(g.cpu(), w, INTERPRETED)]
                for g, w in zip(got, want, strict=True)]
            results[f"swiglu {m}x{k} pad {pad} rotation {group} {dtype}"] = _swiglu_case(m, k, pad, dtype, group, device)
    return results


def _check(results: dict) -> None:
    assert len(results) == 2 * (len(SHAPES) + 1 + len(ROTATED)) * len(DTYPES)
    for name, outputs in results.items():
        assert outputs == [[True, True]] * 3, (name, outputs)  # shape and bits of each output


def test_interpreter_matches_reference():
    _check(run_interpreted(__file__))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_reference():
    _check(_all_cases("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_reference_at_llm_widths():
    """Wide rows, one program per row up to MAX_K; BF16 activations of the sizes LLMs quantize."""
    g = torch.Generator().manual_seed(0)
    for k in (4096, 11008, 14336, MAX_K):
        x = (torch.randn(64, k, generator=g) * torch.rand(64, 1, generator=g) * 8).bfloat16()
        got, want = fp4_rows(x.cuda()), _reference(x)
        assert all(bits_equal(a.cpu(), b, INTERPRETED) for a, b in zip(got, want, strict=True)), k
        if k % 128 == 0:  # rotated, with sums exact in FP32 (see _inputs)
            scales = torch.exp2(torch.randint(-8, 8, (64, 1), generator=g).float())
            x = (torch.randint(-64, 65, (64, k), generator=g) * scales).bfloat16()
            got = fp4_rows(x.cuda(), rotation_matrix(128, "cuda", torch.bfloat16))
            want = _reference(rotate(x, 128))
            assert all(bits_equal(a.cpu(), b, INTERPRETED) for a, b in zip(got, want, strict=True)), (k, "rotated")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_swiglu_matches_reference_and_inductors_unfused_code():
    """SwiGLU's product quantized in the kernel at LLM widths: bit-exact against the reference where every
    silu rounds alike (``_gate``), and on any inputs against what ran before the fusion: Inductor's code
    storing silu(gate) * up (with the rounding casts the backend keeps), fp4_rows reading it back."""
    import torch.nn.functional as F

    def unfused(gate, up, *rotation):
        return fp4_rows(F.silu(gate) * up, *rotation)

    compiled = torch.compile(unfused, backend="inductor", options={"emulate_precision_casts": True})
    g = torch.Generator().manual_seed(1)
    for k in (2048, 5632, 14336):
        gate, up = _gate(64, k, torch.bfloat16, exact=False), torch.randn(64, k, generator=g).bfloat16()
        got = fp4_rows_swiglu(gate.cuda(), up.cuda())
        want = _reference(F.silu(gate) * up)
        assert all(bits_equal(a.cpu(), b, INTERPRETED) for a, b in zip(got, want, strict=True)), k
        gate, up = (torch.randn(256, k, generator=g).mul(4).bfloat16().cuda() for _ in range(2))
        for rotation in ([], [rotation_matrix(128, "cuda", torch.bfloat16)]):
            got, want = fp4_rows_swiglu(gate, up, *rotation), compiled(gate, up, *rotation)
            assert all(bits_equal(a, b, INTERPRETED) for a, b in zip(got, want, strict=True)), (k, len(rotation))


def test_rows_too_wide_name_the_reference():
    with pytest.raises(ValueError, match="gemm_operand"):
        fp4_rows(torch.zeros(2, MAX_K + 1))


def test_swiglu_operands_of_two_shapes_or_dtypes_name_the_unfused_form():
    for up in (torch.zeros(2, 8, dtype=torch.bfloat16), torch.zeros(2, 4)):
        with pytest.raises(ValueError, match=r"fp4_rows\(silu\(gate\) \* up\)"):
            fp4_rows_swiglu(torch.zeros(2, 4, dtype=torch.bfloat16), up)


@pytest.mark.parametrize("cc", [90, 100])
@pytest.mark.parametrize("k, group, swiglu", [(2048, 0, False), (MAX_K, 0, False), (2048, 128, False),
                                              (5632, 128, False), (MAX_K, 128, False), (2048, 16, False),
                                              (5632, 0, True), (MAX_K, 0, True), (5632, 128, True)])
def test_compiles_ahead_of_time_for_hopper_and_blackwell(cc, k, group, swiglu):
    """On any machine: the kernel builds for sm_90 and sm_100 at the launch shape the operator picks,
    with an IEEE division for each row's reciprocal and Hopper's E4M3 conversion instruction; with a
    rotation, its dot on BF16 tensor cores (wgmma / tcgen05 kind::f16) rather than FP32 FMAs; without,
    16-byte loads and stores and no tile moved through shared memory, also with SwiGLU's product
    computed from two inputs."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fp4compile.runtime.kernels import fp4_rows_triton as rows

    block_m, block_k, warps = rows._launch_shape(k, bool(group))
    constexprs = {"INV_MAX": 1.0 / rows.E2M1_MAX, "MIN_SCALE": rows.MIN_SCALE, "BLOCK_M": block_m, "BLOCK_K": block_k,
                  "SWIGLU": swiglu, "INTERPRETED": False, **({"GROUP": group} if group else {})}
    pointers = {"x_ptr": "*bf16", "up_ptr": "*bf16", **({"r_ptr": "*bf16"} if group else {}), "v_ptr": "*fp8e4nv",
                "s_ptr": "*fp32", "i_ptr": "*fp32"}
    signature = {**pointers, "M": "i32", "K": "i32", **{name: "constexpr" for name in constexprs}}
    kernel = rows._rotated_fp4_rows_kernel if group else rows._fp4_rows_kernel
    # pointers and K divisible by 16, as Triton specializes them at run time
    aligned = {(list(signature).index(name),): [["tt.divisibility", 16]] for name in (*pointers, "K")}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=aligned),
                              target=GPUTarget("cuda", cc, 32), options={"num_warps": warps})
    ptx = compiled.asm["ptx"]
    assert "div.rn.f32" in ptx and "cvt.rn.satfinite.e4m3x2.f32" in ptx
    assert bool(group) == bool(re.search(r"mma\S*\.bf16|tcgen05\.mma\S*kind::f16", ptx))
    assert len(compiled.asm["cubin"]) > 0
    if not group:  # the only layout conversions: each row's scale and its reciprocal, to store them
        assert re.search(r"ld\.global\.v4", ptx) and re.search(r"st\.global\.v4", ptx)
        assert compiled.asm["ttgir"].count("ttg.convert_layout") == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_custom_op_schema_and_fake_match_the_kernel():
    x = _inputs(9, 70, torch.bfloat16, "cuda")
    torch.library.opcheck(fp4_rows, (x,), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(fp4_rows_swiglu, (x, x.flip(0)), test_utils=("test_schema", "test_faketensor"))


class _SwiGLU(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up = (torch.nn.Linear(256, 768, bias=False) for _ in range(2))
        self.down = torch.nn.Linear(768, 256, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def _step(kernels: bool, recompute: bool = False, activation: str = "GELU", fuse: bool = True,
          recipe: str = "rotated") -> tuple:
    """A compiled MLP's step with ``recipe`` on the CPU, FP32 weights under BF16 autocast (as
    train_lm.py trains): outputs and gradients, the (dtype, shape) of what it saves for the backward
    (weights left out), and how often the forward's and the backward's code call the fused SwiGLU
    quantize and the plain one. ``kernels``: the path CUDA takes (activations rotated and quantized by
    fp4_rows, weights quantized by it), its kernels run in Triton's interpreter; ``recompute``:
    recompute_activations and recompute_weights on; ``activation``: the torch.nn module between the two
    linears, or "SwiGLU"; ``fuse``: passes/swiglu.py on."""
    import torch.nn as nn
    from torch._inductor.utils import run_and_get_code

    import fp4compile
    from fp4compile import FP4Config
    from fp4compile.passes import joint
    from fp4compile.runtime import matmul

    fused_rows, fuse_swiglu = matmul.fused_rows, joint.fuse_swiglu_quantize
    if kernels:
        matmul.fused_rows = lambda x, format: format == "vector" and x.dim() > 0 and 0 < x.shape[-1] <= MAX_K
    if not fuse:
        joint.fuse_swiglu_quantize = lambda graph: 0
    try:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = _SwiGLU() if activation == "SwiGLU" else nn.Sequential(
            nn.Linear(256, 768, bias=False), getattr(nn, activation)(), nn.Linear(768, 256, bias=False))
        x = (torch.randint(-16, 17, (64, 256)) / 8).requires_grad_()  # dyadic: exact rotations
        saved = {}
        config = FP4Config.from_recipe_name(recipe, recompute_activations=recompute, recompute_weights=recompute)
        compiled = torch.compile(model, backend=fp4compile.backend(config))

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                with torch.autograd.graph.saved_tensors_hooks(
                        lambda t: saved.setdefault(t.untyped_storage().data_ptr(), t), lambda t: t):
                    y = compiled(x)
            y.float().square().mean().backward()
            return y

        y, codes = run_and_get_code(step)
    finally:
        matmul.fused_rows, joint.fuse_swiglu_quantize = fused_rows, fuse_swiglu
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    results = [y, x.grad, *(p.grad for p in model.parameters())]
    return ([t.float().tolist() for t in results],
            sorted([str(t.dtype), list(t.shape)] for k, t in saved.items() if k not in weights),
            [code.count("fp4_rows_swiglu.default(") for code in codes],
            [code.count("fp4_rows.default(") for code in codes])


def test_compiled_step_on_the_cuda_path_matches_the_reference_path():
    """The default recipe's compiled step as CUDA runs it (each activation rotated and quantized by
    fp4_rows, each weight quantized by it after its rotation GEMM, launched from Inductor's code there), in
    Triton's interpreter, against the CPU's path (rotation GEMMs, then Inductor's quantize): the same
    outputs and gradients, bit for bit, and the same activation tensors (those with the 64 tokens) saved for
    the backward. Weights' FP8 values may differ there: Inductor's partitioner may recompute its own
    quantize of a weight in the backward, never the kernel's unless recompute_weights says so."""
    results = run_interpreted(__file__, "step")
    (got, saved, *_), (want, kept, *_) = results["kernels"], results["reference"]
    assert got == want
    assert [t for t in saved if 64 in t[1]] == [t for t in kept if 64 in t[1]]
    # With both recompute options the backward runs fp4_rows again on the input, the ReLU output (which
    # ReLU's backward keeps) and each weight: no FP8 values kept, and the same outputs and gradients.
    # ReLU, not GELU: a GELU recomputed in the backward's kernel rounded differently from the forward's
    # with torch 2.11 on the CPU, a difference of Inductor's, not of the quantize recomputed.
    (got, saved, *_), (want, kept, *_) = results["recomputed"], results["kernels_relu"]
    assert got == want
    assert not [shape for dtype, shape in saved if dtype == "torch.float8_e4m3fn"]
    assert [shape for dtype, shape in kept if dtype == "torch.float8_e4m3fn" and 64 in shape]
    assert sorted(shape for dtype, shape in kept if dtype == "torch.float8_e4m3fn" and 64 not in shape) == [
        [256, 768], [768, 256]]


def test_compiled_swiglu_step_quantizes_the_product_where_it_is_computed():
    """A SwiGLU MLP's compiled step on the CUDA path (Triton's interpreter): the forward quantizes
    silu(gate) * up in one call of the fused operator, and with the recompute options the backward does
    again, keeping no FP8 values; outputs and gradients as without the fusion, where Inductor's code
    stores the product and fp4_rows reads it back (its CPU exp and the interpreter's may round a value of
    silu differently: close, not bit for bit)."""
    results = run_interpreted(__file__, "swiglu")
    (fused, saved, calls, _), (unfused, kept, none, _) = results["fused"], results["unfused"]
    assert calls == [1, 0] and none == [0, 0]  # forward, backward
    assert saved == kept
    # Before torch 2.13 the CPU's C++ code does not round silu to BF16 before the product (conftest), so
    # the unfused step quantizes other values: 3.6-7.2% apart with torch 2.11.
    for got, want in zip(fused, unfused, strict=True):
        if CPU_CODEGEN_ROUNDS_AS_EAGER:
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-2, atol=1e-3)
        else:
            assert relative_error(got, want) < 0.1
    (recomputed, saved, calls, _), (plain, *_) = results["recomputed"], results["fused_plain"]
    assert calls == [1, 1]
    assert not [shape for dtype, shape in saved if dtype == "torch.float8_e4m3fn"]
    assert recomputed == plain  # the same kernel in the forward and again in the backward


def test_recomputed_dge_step_quantizes_again_from_the_forward_scales():
    """The dge recipe (no rotation) with both recompute options on the CUDA path (Triton's interpreter):
    the backward quantizes the activations and weights again from the forward's scales in Inductor's own
    code (matmul.requantized), calling no quantize operator; the forward still quantizes SwiGLU's product
    in its kernel (the backward's reading of the product does not stop the fusion); of FP8 values only
    the step's input's are kept, transposed (the partitioner keeps them rather than the input in BF16,
    which nothing else keeps); outputs and gradients as without the options, bit for bit."""
    results = run_interpreted(__file__, "dge")
    (recomputed, saved, fused, rows), (plain, kept, _, plain_rows) = results["recomputed"], results["plain"]
    assert fused == [1, 0] and rows[1] == 0 and plain_rows[0] == rows[0]
    fp8 = lambda tensors: sorted(shape for dtype, shape in tensors if dtype == "torch.float8_e4m3fn")  # noqa: E731
    assert fp8(saved) == [[256, 64]] and len(fp8(kept)) > 1
    # Before torch 2.13 the CPU's C++ code recomputes SwiGLU's product for the backward without rounding
    # silu to BF16 (conftest), where the forward's kernel rounds it: other values for down's weight
    # gradient (the last tensor), 2.9% apart with torch 2.11; the rest bit for bit.
    assert recomputed[:-1] == plain[:-1]
    assert recomputed[-1] == plain[-1] or (not CPU_CODEGEN_ROUNDS_AS_EAGER
                                           and relative_error(recomputed[-1], plain[-1]) < 0.05)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["step"]:
        print(json.dumps({"kernels": _step(True), "reference": _step(False),
                          "kernels_relu": _step(True, activation="ReLU"), "recomputed": _step(True, True, "ReLU")}))
    elif sys.argv[1:] == ["swiglu"]:
        print(json.dumps({"fused": _step(True, activation="SwiGLU"),
                          "unfused": _step(True, activation="SwiGLU", fuse=False),
                          "recomputed": _step(True, True, "SwiGLU"), "fused_plain": _step(True, activation="SwiGLU")}))
    elif sys.argv[1:] == ["dge"]:
        print(json.dumps({"recomputed": _step(True, True, "SwiGLU", recipe="dge"),
                          "plain": _step(True, activation="SwiGLU", recipe="dge")}))
    else:
        print(json.dumps(_all_cases("cpu")))
