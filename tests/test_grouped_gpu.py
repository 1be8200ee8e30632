"""The grouped GEMM's FP8 path (torch._scaled_grouped_mm, CUDA sm_90 / sm_100) against the FP32
emulation, which tests/test_grouped.py checks against the method. Both multiply the same FP8 values
exactly and round once to BF16, so they differ by FP32 summation order and the order of the two scale
multiplies (a BF16 ulp where that crosses a rounding boundary), and for an E4M3 gradient by Hopper's FP8
MMA adding products in reduced precision before each FP32 promotion, as for the dense path."""

import pytest
import torch

from fp4compile import FP4Config
from fp4compile.runtime import hopper
from fp4compile.runtime.grouped import fp4_grouped_mm, grouped_gemm, grouped_mm_fp32, segment_ids
from fp4compile.runtime.matmul import MatmulSpec
from fp4compile.runtime.quantize import gemm_operand

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() not in hopper.GROUPED_CAPABILITIES,
    reason="torch._scaled_grouped_mm needs CUDA sm_90 or sm_100",
)

S, K, N, E = 300, 256, 128, 8


def _offs(s=S, e=E, seed=0):
    """Uneven groups (not multiples of 16), one of them empty."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randint(0, s + 1, (e - 1,), generator=g).sort().values
    offs = torch.cat([cuts, torch.tensor([s])])
    offs[1] = offs[0]
    return offs.to(torch.int32).cuda()


def _emulated(a, a_scale, b, b_scale, offs):
    seg = segment_ids(offs, a.shape[0])
    y = grouped_mm_fp32(a, b, offs) * a_scale * (b_scale.squeeze(-1)[seg] if b_scale.dim() else b_scale)
    return y.bfloat16()


def test_forward_gemm_matches_the_emulation():
    x = torch.randn(S, K, device="cuda")
    w = torch.randn(E, N, K, device="cuda")
    offs = _offs()
    (vx, sx), (vw, sw) = gemm_operand(x, "vector"), gemm_operand(w, "vector")
    assert hopper.grouped_reason(vx, vw, torch.bfloat16) is None
    got = grouped_gemm(vx, sx, vw, sw, offs, torch.bfloat16)
    want = _emulated(vx, sx, vw, sw, offs).float()
    torch.testing.assert_close(got.float(), want, rtol=2**-6, atol=1e-6 * want.abs().max().item())


def test_e4m3_gradient_gemm_matches_the_emulation():
    """dX = Q8(dY * s_w[e(s)]) @ W_values[e(s)] with dY in float8_e4m3fn (the FP8 grouped kernel takes e4m3 only)."""
    g = torch.randn(S, N, device="cuda").to(torch.float8_e4m3fn)
    r = torch.rand(S, 1, device="cuda")
    vw, _ = gemm_operand(torch.randn(E, N, K, device="cuda"), "vector")
    offs = _offs(seed=1)
    one = r.new_ones(())
    got = grouped_gemm(g, r, vw.mT, one, offs, torch.bfloat16)
    want = _emulated(g, r, vw.mT, one, offs).float()
    torch.testing.assert_close(got.float(), want, rtol=2**-6, atol=1e-3 * want.abs().max().item())


@pytest.mark.parametrize("grad_dtype", ["float8_e5m2", "float8_e4m3fn"])
def test_op_on_the_gpu_matches_the_op_on_the_cpu(grad_dtype):
    """The whole autograd function (OCC, DGE, FP8 dY) on the GPU against the same op on the CPU, where
    every GEMM is the emulation."""
    config = FP4Config.from_recipe_name("paper", grad_dtype=grad_dtype, occ_sample=None)
    x = torch.randn(S, K).bfloat16()
    w = (torch.randn(E, N, K) / K**0.5).bfloat16()
    dy = torch.randn(S, N).bfloat16()
    offs = _offs(seed=2)
    results = []
    for device in ("cuda", "cpu"):
        xd, wd = x.to(device).requires_grad_(), w.to(device).requires_grad_()
        y = fp4_grouped_mm(xd, wd, offs.to(device), MatmulSpec(config, out_dtype=torch.bfloat16))
        y.backward(dy.to(device))
        results.append([t.float().cpu() for t in (y, xd.grad, wd.grad)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=2**-6, atol=1e-3 * want.abs().max().item())


def test_compiled_qwen3_moe_layer_trains():
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2, head_dim=32,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config).cuda().bfloat16()
    tokens = torch.randint(0, 256, (4, 64), device="cuda")
    compiled = torch.compile(model, backend="fp4")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = compiled(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1, losses
