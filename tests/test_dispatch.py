"""GEMM dispatch (runtime/gemm.py) decided on CPU: the path per device and format, the MXFP4 fold into FP8
values, output dtypes, the native block-scaled forward's wiring, and the path each site reports."""

import json

import pytest
import torch

import fp4compile
from fp4compile import FP4Config
from fp4compile.runtime import gemm
from fp4compile.runtime.matmul import MatmulSpec, fp4_matmul_nt
from fp4compile.runtime.quantize import fake_quantize, gemm_operand


@pytest.mark.parametrize(
    "capability, format, path",
    [
        ((10, 0), "mxfp4", "blackwell_fp4"),
        ((10, 0), "nvfp4", "blackwell_fp4"),
        ((10, 0), "vector", "hopper_fp8"),  # FP8 tensor cores on Blackwell too
        ((9, 0), "mxfp4", "hopper_fp8"),
        ((9, 0), "nvfp4", "bf16_exact"),
        (None, "mxfp4", "emulated"),
    ],
)
def test_plan_per_device_and_format(capability, format, path):
    device = "cuda" if capability else "cpu"
    assert gemm.plan(device, capability, format, 4096, 4096, 4096)[0] == path


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


@pytest.mark.parametrize("format", ["mxfp4", "nvfp4"])
def test_native_block_forward_wiring(monkeypatch, format):
    """With the native path forced on (as on sm_100), the forward goes through the block-scaled op, whose
    CPU implementation decodes and multiplies in FP32: it must give the emulated forward's result."""
    spec = MatmulSpec(FP4Config(format=format, occ=False))
    x, w = torch.randn(40, 64), torch.randn(48, 64)
    expected = fp4_matmul_nt(x, w, None, spec)
    calls = []
    real = gemm.native_block_gemm

    def forced(a, b, fmt, out_dtype):
        calls.append(fmt)
        monkeypatch.setattr(gemm, "native_block_reason", lambda *args: None)
        return real(a, b, fmt, out_dtype)

    monkeypatch.setattr("fp4compile.runtime.matmul.native_block_gemm", forced)
    got = fp4_matmul_nt(x, w, None, spec)
    assert calls == [format]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_report_records_each_sites_gemm_path(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 40))
    compiled = torch.compile(model, backend=fp4compile.backend(FP4Config(dump_dir=str(tmp_path)), inner="aot_eager"))
    compiled(torch.randn(8, 64))
    (report,) = [json.loads(p.read_text()) for p in tmp_path.glob("*/report.json")]
    gemms = [site["gemm"] for site in report["sites"]]
    assert gemms == [{"path": "emulated", "reason": "device 'cpu' has no FP8 tensor cores (CUDA sm_89+ needed)"}] * 2
