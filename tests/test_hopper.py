"""The FP8 tensor-core path of scaled_gemm: its dispatch rules (CPU, in CI) and its numerics (CUDA)."""

import re

import pytest
import torch

import fp4compile
from fp4compile import FP4Config
from fp4compile.runtime import gemm, hopper
from fp4compile.runtime.fp8 import quantize_fp8_rows
from fp4compile.runtime.matmul import MatmulSpec, fp4_matmul_nt
from fp4compile.runtime.quantize import gemm_operand

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
HAS_FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= hopper.MIN_CAPABILITY
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# Inductor's Python wrapper, whose kernel launches (``<kernel>_<n>.run(``) and operator calls the tests that
# read generated code count; the C++ wrapper, the backend's default on CUDA, launches the same kernels.
PYTHON_WRAPPER = {"cpp_wrapper": False}
needs_fp8 = pytest.mark.skipif(not HAS_FP8, reason="needs a CUDA GPU with FP8 tensor cores (sm_89+)")


# --- dispatch rules: pure, run everywhere ---------------------------------------------------------------


@pytest.mark.parametrize(
    "device, capability, format, mnk, path, reason",
    [
        ("cuda", (9, 0), "vector", (16384, 14336, 4096), "hopper_fp8", None),
        ("cuda", (8, 9), "tensor", (100, 32, 48), "hopper_fp8", None),  # M is free
        ("cpu", None, "vector", (64, 64, 64), "emulated", "device 'cpu' has no FP8 tensor cores"),
        ("cuda", (8, 0), "vector", (64, 64, 64), "bf16_exact", "CUDA capability (8, 0) < sm_89"),
        ("cuda", (7, 5), "vector", (64, 64, 64), "emulated", "CUDA capability (7, 5) < sm_89"),
        ("cuda", None, "vector", (64, 64, 64), "emulated", "CUDA capability None < sm_89"),
        ("cuda", (9, 0), "mxfp4", (64, 64, 64), "hopper_fp8", None),  # block scales folded into the FP8 values
        ("cuda", (9, 0), "nvfp4", (64, 64, 64), "bf16_exact", "format 'nvfp4': E2M1 values times E4M3 block scales"),
        ("cuda", (9, 0), "vector", (64, 64, 40), "bf16_exact", "K=40 is not a multiple of 16"),
        ("cuda", (9, 0), "vector", (64, 40, 64), "bf16_exact", "N=40 is not a multiple of 16"),
    ],
)
def test_plan(device, capability, format, mnk, path, reason):
    m, n, k = mnk
    got, why = gemm.plan(device, capability, format, (m, k), (n, k))
    assert got == path
    assert why == reason if reason is None else why.startswith(reason), why


def _t(shape, dtype, device="cpu"):
    return torch.zeros(shape, device=device).to(dtype)


@pytest.mark.parametrize(
    "a, b, reason",
    [
        (_t((64, 32), E4M3), _t((48, 32), E4M3), None),
        (_t((2, 8, 32), E5M2), _t((32, 48), E4M3).mT, None),  # backward: e5m2 x a transposed view
        (_t((64, 32), torch.float32), _t((48, 32), torch.float32), "torch.float32 x torch.float32 operands are not both FP8"),
        (_t((64, 32), E5M2), _t((48, 32), E5M2), "two float8_e5m2 operands"),
        (_t((2, 64, 32), E4M3), _t((2, 48, 32), E4M3), "operand ranks 3 and 3"),
        (_t((64, 24), E4M3), _t((48, 24), E4M3), "K=24 is not a multiple of 16"),
        (_t((64, 32), E4M3), _t((40, 32), E4M3), "N=40 is not a multiple of 16"),
        (_t((65, 32), E4M3)[1:], _t((48, 32), E4M3), None),  # offset 32 bytes: aligned
        (_t((64 * 32 + 8,), E4M3)[8:].view(64, 32), _t((48, 32), E4M3), "operand a starts 8 elements into"),
    ],
)
def test_operand_reason(a, b, reason):
    why = hopper.operand_reason(a, b)
    assert why == reason if reason is None else why.startswith(reason), why


def test_cpu_tensors_take_the_emulation():
    a, b = _t((64, 32), E4M3), _t((48, 32), E4M3)
    assert hopper.eligible(a, b) == (False, "device 'cpu' has no FP8 tensor cores (CUDA sm_89+ needed)")
    va, sa = gemm_operand(torch.randn(64, 32), "vector")
    vb, sb = gemm_operand(torch.randn(48, 32), "vector")
    assert torch.equal(gemm.scaled_gemm(va, sa, vb, sb), gemm.emulated(va, sa, vb, sb))


@pytest.mark.parametrize(
    "a_shape, a_dtype, b, scales",
    [
        ((100, 64), E4M3, _t((48, 64), E4M3, "meta"), "rows"),  # forward
        ((100, 64), E5M2, _t((64, 48), E4M3, "meta").mT, "row_and_scalar"),  # backward: b a transposed view
        ((3, 100, 64), E4M3, _t((48, 64), E4M3, "meta"), "rows"),  # leading dims of a flattened
        ((100, 64), E4M3, _t((48, 64), E4M3, "meta"), "scalars"),  # "tensor" format
    ],
)
def test_hopper_call_passes_scaled_mm_checks(a_shape, a_dtype, b, scales):
    """On meta tensors torch._scaled_mm runs its shape, layout (A row-major, B column-major) and scale
    checks without a GPU."""
    a = _t(a_shape, a_dtype, "meta")
    rows = torch.ones((*a_shape[:-1], 1), device="meta")
    a_scale = rows if scales != "scalars" else torch.ones((), device="meta")
    b_scale = torch.ones((), device="meta") if scales != "rows" else torch.ones(b.shape[0], 1, device="meta")
    for out_dtype in (torch.float32, torch.bfloat16):
        out = hopper.scaled_gemm(a, a_scale, b, b_scale, out_dtype)
        assert out.shape == (*a_shape[:-1], b.shape[0]) and out.dtype == out_dtype


# --- numerics on the GPU ----------------------------------------------------------------------------------


def _magnitude(a, a_scale, b, b_scale):
    """sum_k |a_mk b_nk| |a_scale_m b_scale_n|, in float64: what rounding errors of the GEMM scale with."""
    scales = (a_scale.double() * gemm.row_scale_as_columns(b_scale).double()).abs()
    return (a.double().abs() @ b.double().abs().mT) * scales


def _check_against_float64(out, a, a_scale, b, b_scale, relative_bound):
    """|out - float64 product| <= relative_bound * _magnitude, elementwise."""
    ref = (a.double() @ b.double().mT) * a_scale.double() * gemm.row_scale_as_columns(b_scale).double()
    err = (out.double() - ref).abs()
    assert out.dtype == torch.float32 and not out.isnan().any()
    ratio = (err / (relative_bound * _magnitude(a, a_scale, b, b_scale)).clamp_min(1e-300)).max()
    assert ratio <= 1, f"error {float(ratio):.3g}x the bound"


def _operands(case, m, n, k, generator):
    """(a, a_scale, b, b_scale) as matmul.py builds them for the forward and the two backward GEMMs."""
    randn = lambda *s: torch.randn(*s, device="cuda", generator=generator) * 3  # noqa: E731
    if case == "forward":
        return (*gemm_operand(randn(m, k), "vector"), *gemm_operand(randn(n, k), "vector"))
    if case == "tensor_format":
        return (*gemm_operand(randn(m, k), "tensor"), *gemm_operand(randn(n, k), "tensor"))
    if case == "batched_a":
        return (*gemm_operand(randn(3, m, k), "vector"), *gemm_operand(randn(n, k), "vector"))
    # "backward": dY [m, k] in e5m2 per row times the saved E2M1 values [k, n] of the other operand.
    grad, scale = quantize_fp8_rows(randn(m, k), E5M2)
    saved, _ = gemm_operand(randn(k, n), "vector")
    return grad, scale, saved.mT, torch.ones((), device="cuda")


@needs_fp8
@pytest.mark.parametrize("case", ["forward", "tensor_format", "batched_a", "backward"])
@pytest.mark.parametrize("seed", range(4))
def test_hopper_matches_emulation(case, seed):
    g = torch.Generator("cuda").manual_seed(seed)
    m = int(torch.randint(1, 700, (1,), generator=torch.Generator().manual_seed(seed)))
    n, k = (16 * int(v) for v in torch.randint(1, 64, (2,), generator=torch.Generator().manual_seed(100 + seed)))
    a, sa, b, sb = _operands(case, m, n, k, g)
    assert hopper.eligible(a, b) == (True, None)
    fast, emulated = hopper.scaled_gemm(a, sa, b, sb), gemm.emulated(a, sa, b, sb)
    fp32_accumulation = (k + 3) * 2.0**-24  # worst case of K FP32 additions and the two scale multiplies
    _check_against_float64(emulated, a, sa, b, sb, fp32_accumulation)
    if case == "backward":
        # An e5m2 x E2M1 product does not fit Hopper's FP8 MMA adder, which sums products in reduced
        # precision (~14 bits per the DeepSeek-V3 report) before each FP32 promotion; bench_gemm measured
        # errors up to 2^-16 of the magnitude. FP32 accumulation cannot be had here; 2^-13 is the bound.
        _check_against_float64(fast, a, sa, b, sb, 2.0**-13)
    else:
        # E2M1 x E2M1 terms are multiples of 1/4 below 36: their sums are exact even in that adder, so
        # only the two scale multiplies may round differently from the emulation.
        _check_against_float64(fast, a, sa, b, sb, fp32_accumulation)
        torch.testing.assert_close(fast, emulated, rtol=2 * 2.0**-23, atol=0)


@needs_fp8
def test_scaled_gemm_dispatches_to_hopper(monkeypatch):
    calls = []
    monkeypatch.setitem(gemm.SCALED_GEMMS, "hopper_fp8", lambda *args: calls.append(args) or gemm.emulated(*args[:4]))
    a, sa, b, sb = _operands("forward", 64, 64, 64, torch.Generator("cuda").manual_seed(0))
    gemm.scaled_gemm(a, sa, b, sb)
    assert len(calls) == 1


@needs_cuda
@pytest.mark.parametrize(
    "a_shape, a_dtype, b_shape, b_dtype, reason",
    [
        ((64, 32), torch.float32, (48, 32), torch.float32, "torch.float32 x torch.float32"),
        ((64, 32), E5M2, (48, 32), E5M2, "two float8_e5m2 operands"),
        ((2, 64, 32), E4M3, (2, 48, 32), E4M3, "operand ranks 3 and 3"),
        ((64, 24), E4M3, (48, 24), E4M3, "K=24"),
        ((64, 32), E4M3, (40, 32), E4M3, "N=40"),
    ],
)
def test_fallbacks_on_cuda(a_shape, a_dtype, b_shape, b_dtype, reason):
    """Operands _scaled_mm refuses: FP8 ones take the exact BF16 GEMM (FP32 accumulation), float32 ones
    the emulation; both within FP32-accumulation rounding of the float64 product."""
    a = torch.randn(a_shape, device="cuda").to(a_dtype)
    b = torch.randn(b_shape, device="cuda").to(b_dtype)
    sa, sb = torch.rand(*a_shape[:-1], 1, device="cuda"), torch.rand(*b_shape[:-1], 1, device="cuda")
    ok, why = hopper.eligible(a, b)
    if HAS_FP8:
        assert not ok and reason in why, why
    else:
        assert not ok and "sm_89" in why
    assert (gemm.bf16_reason(a, b) is None) == (a_dtype != torch.float32)
    _check_against_float64(gemm.scaled_gemm(a, sa, b, sb), a, sa, b, sb, (a_shape[-1] + 3) * 2.0**-24)


@needs_cuda
@pytest.mark.parametrize("batched", [False, True])
def test_nvfp4_operands_take_the_exact_bf16_gemm(batched):
    """NVFP4 values times E4M3 block scales arrive in BF16 (exact): a BF16 GEMM with FP32 output multiplies
    them within FP32-accumulation rounding of the float64 product, here and in the emulation."""
    g = torch.Generator("cuda").manual_seed(0)
    shape_a, shape_b = ((3, 96, 256), (3, 80, 256)) if batched else ((96, 256), (80, 256))
    va, sa = gemm_operand(torch.randn(shape_a, device="cuda", generator=g), "nvfp4")
    vb, sb = gemm_operand(torch.randn(shape_b, device="cuda", generator=g), "nvfp4")
    assert va.dtype == torch.bfloat16 and gemm.bf16_reason(va, vb) is None
    bound = (256 + 3) * 2.0**-24
    _check_against_float64(gemm.scaled_gemm(va, sa, vb, sb), va, sa, vb, sb, bound)
    _check_against_float64(gemm.emulated(va, sa, vb, sb), va, sa, vb, sb, bound)


def _planted_ties(rows, k, dtype, generator):
    """Random rows, half of them holding values exactly on E2M1 rounding ties (amax 1.5 -> scale 1/4)."""
    x = torch.randn(rows, k, generator=generator) * 3
    ties = torch.tensor([0.0625, 0.1875, 0.3125, 0.4375, 0.625, 0.875, 1.25])  # x / scale = .25, .75, ... 5
    pick = torch.randint(0, len(ties), (rows // 2, k), generator=generator)
    x[: rows // 2] = ties[pick] * torch.where(torch.rand(rows // 2, k, generator=generator) < 0.5, -1, 1)
    x[: rows // 2, 0] = 1.5
    return x.to(dtype)


def _bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int32)


@needs_cuda
@pytest.mark.parametrize("shape", [(300, 200), (128, 256), (1, 17), (4096, 130)])
def test_transpose_kernel(shape):
    from fp4compile.runtime.kernels.transpose_triton import transpose_bytes

    x = torch.randn(shape, device="cuda").to(E4M3)
    assert torch.equal(_bits(transpose_bytes(x)), _bits(x.t().contiguous()))
    # test_schema multiplies the inputs, which has no float8 kernel
    torch.library.opcheck(transpose_bytes, (x,), test_utils=("test_faketensor",))


@needs_cuda
@pytest.mark.parametrize("format", ["vector", "tensor", "mxfp4", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_quantized_operands_bit_exact_with_cpu(format, dtype, compiled):
    """The FP4 values and scales made on the GPU (eager, or by Inductor with its default settings, as the
    fp4 backend compiles) equal the CPU reference's bit for bit, including values planted on E2M1
    rounding ties."""
    torch._dynamo.reset()
    x = _planted_ties(256, 512, dtype, torch.Generator().manual_seed(0))
    quantize = torch.compile(gemm_operand, fullgraph=True) if compiled else gemm_operand
    values, scales = quantize(x.cuda(), format)
    ref_values, ref_scales = gemm_operand(x, format)
    assert torch.equal(_bits(scales.cpu()), _bits(ref_scales))
    assert torch.equal(_bits(values.cpu()), _bits(ref_values))


@needs_cuda
def test_exact_div_compiled_on_cuda_is_ieee():
    """Inductor's Triton code for exact_div (float64 inside) gives the CPU's IEEE float32 quotients, where
    a float32 division in the same code would be approximate."""
    from fp4compile.runtime.quantize import exact_div

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(1 << 22, generator=g) * torch.exp2(torch.randint(-60, 60, (1 << 22,), generator=g))
            for _ in range(2))
    got = torch.compile(exact_div, fullgraph=True)(a.cuda(), b.cuda()).cpu()
    assert torch.equal(got.view(torch.int32), (a / b).view(torch.int32))


@needs_cuda
@pytest.mark.parametrize("dtype", [E5M2, E4M3])
def test_fp8_gradient_bit_exact_with_cpu(dtype):
    torch._dynamo.reset()
    g = torch.randn(300, 700, generator=torch.Generator().manual_seed(1)) * torch.rand(300, 1) * 100
    data, scale = torch.compile(quantize_fp8_rows, fullgraph=True)(g.cuda(), dtype)
    ref_data, ref_scale = quantize_fp8_rows(g, dtype)
    assert torch.equal(_bits(scale.cpu()), _bits(ref_scale))
    assert torch.equal(_bits(data.cpu()), _bits(ref_data))


@needs_fp8
@pytest.mark.parametrize(
    "recipe, format, occ, dtype",
    [("paper", "vector", False, torch.float32), ("paper", "vector", True, torch.float32),
     ("paper", "mxfp4", False, torch.float32), ("paper", "vector", True, torch.bfloat16),
     ("rotated", "vector", False, torch.float32), ("rotated", "vector", False, torch.bfloat16)],
)
def test_compiled_fp4_linear_on_cuda_matches_cpu_reference(recipe, format, occ, dtype):
    """A compiled FP4 nn.Linear (hopper path; MXFP4 with its block scales folded into FP8; the rotated
    recipe's activation rotated inside its quantize kernel) against the eager FP4 matmul on the CPU
    (rotations as GEMMs). The forward GEMM is exact, so y agrees to FP32 rounding; the e5m2
    gradient GEMMs carry the FP8 MMA's reduced-precision sums (test_hopper_matches_emulation), so dX and
    dW agree to 1e-4 in norm. In BF16 every GEMM output is rounded to BF16 once on both sides, but
    products that tie differently may round apart: 2^-8 (BF16's relative precision) in norm."""
    torch._dynamo.reset()
    cfg = FP4Config.from_recipe_name(recipe, format=format, occ=occ)
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(256, 384)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(384, 256, generator=gen) * 0.05)
        lin.bias.copy_(torch.randn(384, generator=gen))
    lin = lin.to(dtype)
    x = torch.randn(4, 32, 256, generator=gen).to(dtype)
    dy = torch.randn(4, 32, 384, generator=gen).to(dtype)

    w, bias, xr = (t.detach().clone().requires_grad_(True) for t in (lin.weight, lin.bias, x))
    y_ref = fp4_matmul_nt(xr.reshape(-1, 256), w, bias, MatmulSpec(cfg)).reshape(4, 32, 384)
    y_ref.backward(dy)

    gpu = torch.nn.Linear(256, 384).cuda().to(dtype)
    gpu.load_state_dict(lin.state_dict())
    xg = x.cuda().requires_grad_(True)
    y = torch.compile(gpu, backend=fp4compile.backend(cfg), fullgraph=True)(xg)
    y.backward(dy.cuda())
    low = 2.0**-8 if dtype == torch.bfloat16 else 0.0
    checks = {"y": (y, y_ref, max(1e-6, low)), "dx": (xg.grad, xr.grad, max(1e-4, low)),
              "dw": (gpu.weight.grad, w.grad, max(1e-4, low)), "dbias": (gpu.bias.grad, bias.grad, max(1e-6, low))}
    for name, (got, want, tol) in checks.items():
        error = float((got.cpu().double() - want.double()).norm() / want.double().norm())
        assert error <= tol, f"{name}: relative error {error:.3g} > {tol}"


@needs_fp8
def test_no_recompiles_or_host_syncs_across_steps():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.SiLU(), torch.nn.Linear(512, 256)).cuda()
    compiled = torch.compile(model, backend=fp4compile.backend(FP4Config.from_recipe_name("paper", occ=False)))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(x):
        compiled(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(torch.randn(128, 256, device="cuda"))  # compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                step(torch.randn(128, 256, device="cuda"))
        finally:
            torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_sampled_occ_thresholds_compiled_on_cuda():
    """The stratified OCC sample of a large activation (Inductor folds its index arithmetic into a gather,
    in int32 on CUDA) gives the eager thresholds."""
    from fp4compile.runtime.occ import occ_thresholds

    torch._dynamo.reset()
    x = torch.randn(32768, 768, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(lambda t: occ_thresholds(t, 0.99, 65536), fullgraph=True)
    assert [float(t) for t in compiled(x)] == [float(t) for t in occ_thresholds(x, 0.99, 65536)]


class _SharedInputs(torch.nn.Module):
    """q/k/v-style projections of one input and a SwiGLU: the shapes of the inputs that sites share."""

    def __init__(self, d=256, hidden=512):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(d, d, bias=False) for _ in range(3))
        self.gate, self.up = torch.nn.Linear(d, hidden, bias=False), torch.nn.Linear(d, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        h = self.q(x) * self.k(x) + self.v(x)
        return self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


@needs_fp8
def test_compiled_step_transposes_shared_inputs_once_and_writes_dy_once():
    """The FP8 path's Triton-kernel operators in a compiled step, launched from Inductor's generated code
    (no operator call left): one FP4 quantize and one transpose of the FP4 values of each input (x for
    q/k/v, h for gate/up, the SwiGLU output for down: AOTAutograd's CSE merges a shared input's) plus one
    of each per weight, and the silu-backward kernel writes dY of gate and of up once each for the FP8
    kernel pair (its schema says it only reads them: no copy per kernel)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = _SharedInputs().cuda().bfloat16()
    compiled = torch.compile(model, backend=fp4compile.backend(FP4Config.from_recipe_name("paper", occ=False)),
                             options=PYTHON_WRAPPER)
    x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    _, codes = run_and_get_code(lambda: compiled(x).float().square().mean().backward())
    code = "\n".join(codes)

    def launches(kernel):
        return len(re.findall(rf"\b{kernel}_\d+\.run\(", code))

    assert not re.findall(r"torch\.ops\.fp4compile\.\w+\.default\(", code)  # no operator calls left
    assert launches("_transpose_tiles") == 3 + 6
    assert launches("_amax_kernel") == launches("_scale_kernel") == launches("_quantize_kernel") == 6
    assert launches("_fp4_rows_kernel") == 3 + 6  # x, h, the SwiGLU output; the weights
    kernels = dict(re.findall(r"@triton\.jit\ndef (\w+)\((.*?)\n\'\'\'", code, re.S))
    silu_backward = [source for name, source in kernels.items() if "silu_backward" in name]
    assert len(silu_backward) == 1 and silu_backward[0].count("tl.store(") == 2, silu_backward


@needs_fp8
def test_rotated_recipe_rotates_activations_inside_their_quantize():
    """The rotated recipe's compiled step: each shared activation (x, h, the SwiGLU output) rotated and
    quantized by one fused kernel launched from Inductor's code, each weight quantized by the kernel
    after its rotation GEMM, which DGE's backward recomputes. Numerics against the CPU's rotation
    GEMMs: test_compiled_fp4_linear_on_cuda_matches_cpu_reference; through several layers the two
    paths' last-bit differences flip FP4 and E5M2 roundings, so whole steps are not compared."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = _SharedInputs().cuda().bfloat16()
    x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(model, backend=fp4compile.backend(FP4Config.from_recipe_name("rotated")),
                             options=PYTHON_WRAPPER)
    _, codes = run_and_get_code(lambda: compiled(x).float().square().mean().backward())
    code = "\n".join(codes)
    assert not re.findall(r"torch\.ops\.fp4compile\.\w+\.default\(", code)
    assert len(re.findall(r"\b_rotated_fp4_rows_kernel_\d+\.run\(", code)) == 3
    assert len(re.findall(r"\b_fp4_rows_kernel_\d+\.run\(", code)) == 6  # the weights, rotated by a GEMM
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@needs_fp8
@pytest.mark.parametrize("recipe", ["dge", "rotated"])
def test_recompute_options_quantize_again_from_the_forward_scales(recipe):
    """Both recompute options in a compiled step on the FP8 path: outputs and gradients as without them,
    bit for bit. What the backward quantizes again from the forward's scales (matmul.requantized: the
    weights, and without a rotation the activations too) it computes in Inductor's own kernels, stored
    transposed: no quantize or transpose kernel for it. The rotated recipe's activations are rotated and
    quantized again by the fused kernel (x, h; SwiGLU's product from gate and up), then transposed.
    With and without the options, DGE and the requantize multiply by the reciprocals of the forward's
    scales that the quantize kernel wrote: no float64 division per element in dge's backward code."""
    from torch._inductor.utils import run_and_get_code

    steps = []
    for recompute in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = _SharedInputs().cuda().bfloat16()
        x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        config = FP4Config.from_recipe_name(recipe, recompute_activations=recompute, recompute_weights=recompute)
        compiled = torch.compile(model, backend=fp4compile.backend(config), options=PYTHON_WRAPPER)

        def step():
            y = compiled(x)
            y.float().square().mean().backward()
            return y

        y, codes = run_and_get_code(step)
        steps.append(([y, x.grad, *(p.grad for p in model.parameters())], codes[-1]))
    (plain, plain_backward), (recomputed, backward) = steps
    assert all(torch.equal(a, b) for a, b in zip(plain, recomputed, strict=True))
    rotated = recipe == "rotated"
    if not rotated:  # (the rotated recipe builds its rotation matrices in float64)
        assert "tl.float64" not in plain_backward and "tl.float64" not in backward

    def launches(kernel):
        return len(re.findall(rf"\b{kernel}_\d+\.run\(", backward))

    assert launches("_fp4_rows_kernel") == 0
    assert launches("_rotated_fp4_rows_kernel") == launches("_transpose_tiles") == (3 if rotated else 0)


@needs_fp8
def test_lowered_kernels_take_symbolic_token_counts():
    """Compiled with dynamic shapes, the quantize kernels' grids and sizes are symbolic: they are still
    launched from Inductor's code (no operator call), and the step agrees with the static-shape compile
    at two token counts (a wrong grid or stride would leave rows unwritten or garbage)."""
    from torch._inductor.utils import run_and_get_code

    model = _SharedInputs().cuda().bfloat16()
    results = {}
    for dynamic in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=fp4compile.backend(FP4Config.from_recipe_name("paper", occ=False)),
                                 dynamic=dynamic, options=PYTHON_WRAPPER)
        for tokens in (96, 160):
            x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16,
                            generator=torch.Generator("cuda").manual_seed(tokens)).requires_grad_()
            model.zero_grad(set_to_none=True)
            y, codes = run_and_get_code(lambda: compiled(x))
            y.float().square().mean().backward()
            results[dynamic, tokens] = [y.float(), x.grad.float(), model.q.weight.grad.float()]
            if dynamic and tokens == 160:
                code = "\n".join(codes)
                assert not re.findall(r"torch\.ops\.fp4compile\.\w+\.default\(", code)
                assert re.search(r"\b_fp4_rows_kernel_\d+\.run\(", code)
    for tokens in (96, 160):
        for got, want in zip(results[True, tokens], results[False, tokens]):
            assert torch.isfinite(got).all()
            assert (got - want).norm() <= 1e-2 * want.norm()
