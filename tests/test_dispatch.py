"""GEMM dispatch (runtime/gemm.py) decided on CPU: the path per device and format, the MXFP4 fold into FP8
values, output dtypes, the native block-scaled forward's wiring, and the path each site reports."""

import json

import pytest
import torch

import fp4compile
from fp4compile import FP4Config
from fp4compile.runtime import gemm
from fp4compile.runtime.formats import get_format
from fp4compile.runtime.matmul import MatmulSpec, fp4_matmul_nt
from fp4compile.runtime.quantize import fake_quantize, gemm_operand


@pytest.mark.parametrize(
    "capability, format, path",
    [
        ((10, 0), "mxfp4", "blackwell_fp4"),
        ((10, 0), "nvfp4", "blackwell_fp4"),
        ((10, 0), "vector", "blackwell_fp4"),  # unit block scales, row scales in the epilogue
        ((10, 0), "tensor", "hopper_fp8"),
        ((9, 0), "mxfp4", "hopper_fp8"),
        ((9, 0), "nvfp4", "bf16_exact"),
        (None, "mxfp4", "emulated"),
    ],
)
def test_plan_per_device_and_format(capability, format, path):
    device = "cuda" if capability else "cpu"
    assert gemm.plan(device, capability, format, (4096, 4096), (4096, 4096))[0] == path


def test_mxfp4_fold_is_exact_within_fourteen_binades():
    """Block scales 2^0 .. 2^-14 below the row's largest: every value survives the fold into E4M3."""
    x = torch.randn(8, 16 * 32)
    x = x * torch.exp2(-torch.arange(16.0)).repeat_interleave(32)  # block b is ~2^-b of block 0
    x[:, 15 * 32 :] = 0  # keep the last block out of the claim (2^-15)
    values, outer = gemm_operand(x, "mxfp4")
    assert values.dtype == torch.float8_e4m3fn and outer.shape == (8, 1)
    assert torch.equal(values.float() * outer, fake_quantize(x, "mxfp4"))


def test_mxfp4_fold_below_range_rounds_within_bound():
    """A block far below its row's largest rounds onto E4M3's subnormal grid: error < 2^-10 * outer."""
    x = torch.randn(4, 64)
    x[:, 32:] *= 2.0**-20
    values, outer = gemm_operand(x, "mxfp4")
    err = (values.float() * outer - fake_quantize(x, "mxfp4")).abs()
    assert bool((err <= 2.0**-10 * outer).all())
    assert torch.equal(values[:, :32].float() * outer, fake_quantize(x, "mxfp4")[:, :32])


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scaled_gemm_rounds_once_to_out_dtype(out_dtype):
    va, sa = gemm_operand(torch.randn(32, 64), "vector")
    vb, sb = gemm_operand(torch.randn(48, 64), "vector")
    out = gemm.scaled_gemm(va, sa, vb, sb, out_dtype)
    assert out.dtype == out_dtype
    assert torch.equal(out, gemm.emulated(va, sa, vb, sb).to(out_dtype))


@pytest.mark.parametrize("format", ["vector", "mxfp4", "nvfp4"])
def test_native_forward_quantizes_each_operand_once(monkeypatch, executed, format):
    """On sm_100 (every path's GEMM computing as the CPU does), the forward goes through the native op, whose CPU
    implementation decodes and multiplies in FP32: it must give the emulated forward's result, and the
    backward's. A block format's operands are quantized once each, into the kernel's codes and scales
    (the values the backward takes decoded from them); the vector format's once each by gemm_operand."""
    from fp4compile.runtime import matmul
    from fp4compile.runtime.kernels import blackwell_quantize

    spec = MatmulSpec(FP4Config.from_recipe_name("paper", format=format, occ=False), b_is_weight=False)
    x, w = torch.randn(2, 40, 64), torch.randn(48, 64)

    def run():
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp4_matmul_nt(a, b, None, spec)
        y.backward(torch.ones_like(y))
        return y, a.grad, b.grad

    expected = run()
    calls = []
    for module, name in ((matmul, "gemm_operand"), (blackwell_quantize, "pack_operand")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, real=real, name=name, **kw: calls.append(name) or real(*args, **kw))
    _on(monkeypatch, (10, 0))
    executed.clear()
    got = run()
    assert calls == (["gemm_operand"] * 2 if format == "vector" else ["pack_operand"] * 2)
    assert executed[0] == "blackwell_fp4"
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_report_records_each_sites_gemm_path(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 40))
    compiled = torch.compile(model, backend=fp4compile.backend(FP4Config.from_recipe_name("paper", dump_dir=str(tmp_path)), inner="aot_eager"))
    compiled(torch.randn(8, 64))
    (report,) = [json.loads(p.read_text()) for p in tmp_path.glob("*/report.json")]
    gemms = [site["gemm"] for site in report["sites"]]
    assert gemms == [{"path": "emulated", "reason": "device 'cpu' has no FP8 tensor cores (CUDA sm_89+ needed)"}] * 2


# --- one source of truth: the path gemm.plan gives is the path the runtime takes, and the one reported ----

CAPABILITIES = [None, (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (10, 3), (11, 0), (12, 0)]
SHAPES = {  # the forward GEMM's A [..., M, K] and B [..., N, K]
    "2-D": ((40, 64), (48, 64)),
    "batched": ((3, 40, 64), (3, 48, 64)),
    "batched twice": ((2, 3, 8, 64), (2, 3, 16, 64)),
    "broadcast B": ((40, 64), (3, 48, 64)),
    "N=40": ((40, 64), (40, 64)),
    "K=40": ((40, 40), (48, 40)),
    "no tokens": ((0, 64), (48, 64)),
}
CASES = [(cap, fmt, shape) for cap in CAPABILITIES for fmt in ("vector", "tensor", "mxfp4", "nvfp4")
         for shape in SHAPES if SHAPES[shape][0][-1] % (get_format(fmt).block_size or 1) == 0]


@pytest.fixture
def executed(monkeypatch):
    """Every path's GEMM replaced by a recorder of its name that computes as the CPU does (the emulation, or
    the native op's FP32 decode): the list of paths that ran."""
    from fp4compile.runtime.kernels import blackwell

    ran = []
    for path in gemm.SCALED_GEMMS:
        monkeypatch.setitem(gemm.SCALED_GEMMS, path, lambda a, sa, b, sb, dtype, path=path: ran.append(path)
                            or gemm.emulated(a, sa, b, sb).to(dtype))
    for op in ("block_scaled_mm", "vector_scaled_mm"):
        real = getattr(blackwell, op)
        monkeypatch.setattr(blackwell, op, lambda *args, real=real: ran.append("blackwell_fp4") or real(*args))
    return ran


def _on(monkeypatch, capability):
    """Make every tensor look as if it sat on a CUDA device of ``capability`` (None: the CPU)."""
    monkeypatch.setattr(gemm, "device_of", lambda t: ("cuda", capability) if capability else ("cpu", None))
    return "cuda" if capability else "cpu"


@pytest.mark.parametrize("capability, format, shape", CASES)
def test_the_forward_runs_the_path_plan_gives(monkeypatch, executed, capability, format, shape):
    a_shape, b_shape = SHAPES[shape]
    a, b = torch.randn(a_shape), torch.randn(b_shape)
    spec = MatmulSpec(FP4Config.from_recipe_name("paper", format=format, occ=False), b_is_weight=False)
    expected = fp4_matmul_nt(a, b, None, spec)  # on the CPU
    executed.clear()
    device = _on(monkeypatch, capability)
    got = fp4_matmul_nt(a, b, None, spec)
    assert executed == [gemm.plan(device, capability, format, a_shape, b_shape)[0]]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)  # same numerics on every path


def test_sm120_and_sm110_take_no_native_fp4_path():
    """The kernel is built for sm_10x only (blackwell.NATIVE_MAJORS): elsewhere FP8 tensor cores."""
    for capability in [(11, 0), (12, 0)]:
        assert gemm.plan("cuda", capability, "mxfp4", (64, 64), (64, 64))[0] == "hopper_fp8"
        assert gemm.plan("cuda", capability, "nvfp4", (64, 64), (64, 64))[0] == "bf16_exact"


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("recipe", ["nvidia_nvfp4", "quartet2"])
@pytest.mark.parametrize("b_shape", [(48, 64), (3, 48, 64)])
def test_unbiased_forward_runs_the_path_plan_gives(monkeypatch, executed, capability, recipe, b_shape):
    """The unbiased recipes' forward (NVFP4 operands): the path plan gives, with the CPU's numerics."""
    a, b = torch.randn(3, 40, 64), torch.randn(b_shape)
    spec = MatmulSpec(FP4Config.from_recipe_name(recipe), b_is_weight=False)
    expected = fp4_matmul_nt(a, b, None, spec)
    executed.clear()
    device = _on(monkeypatch, capability)
    got = fp4_matmul_nt(a, b, None, spec)
    assert executed == [gemm.plan(device, capability, "nvfp4", a.shape, b.shape)[0]]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(64, 48)

    def forward(self, x):
        h = self.proj(x)  # [2, 40, 48]: a linear
        return torch.bmm(h, h.mT)  # batched activations


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("format", ["vector", "nvfp4"])
def test_report_gives_the_path_that_runs(monkeypatch, executed, tmp_path, capability, format):
    device = _on(monkeypatch, capability)
    config = FP4Config.from_recipe_name("paper", format=format, quantize_activation_matmuls=True, occ=False, dump_dir=str(tmp_path))
    torch._dynamo.reset()
    compiled = torch.compile(_Block(), backend=fp4compile.backend(config, inner="aot_eager"))
    with torch.no_grad():  # the forward only, traced once: the recorders run at trace time
        compiled(torch.randn(2, 40, 64))
    (report,) = [json.loads(p.read_text()) for p in tmp_path.glob("*/report.json")]
    want = [gemm.plan(device, capability, format, (80, 64), (48, 64)),
            gemm.plan(device, capability, format, (2, 40, 48), (2, 40, 48))]
    assert [(s["gemm"]["path"], s["gemm"]["reason"]) for s in report["sites"]] == want
    paths = [path for path, _ in want]
    assert executed and executed == paths * (len(executed) // 2)  # each trace ran both sites' paths
