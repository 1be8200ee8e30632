"""The unbiased NVFP4 recipes ("nvidia_nvfp4", "quartet2"): config, forward, the gradient GEMMs against a
reference of each scheme written out here, unbiasedness, seeding, and training through the backend."""

import pytest
import torch

import fp4compile
from fp4compile import FP4Config
from fp4compile.runtime import gemm
from fp4compile.runtime.eden import ms_eden
from fp4compile.runtime.kernels import blackwell
from fp4compile.runtime.kernels import blackwell_quantize as bq
from fp4compile.runtime.kernels import rotate_quantize as rq
from fp4compile.runtime.hadamard import random_signs, rht
from fp4compile.runtime.matmul import MatmulSpec, fp4_matmul_nt
from fp4compile.runtime.quantize import fake_quantize, gemm_operand, tiles_operand

RECIPES = ["nvidia_nvfp4", "quartet2"]


def _dequantized(operand):
    values, tensor_scale = operand
    return values.float() * tensor_scale


def _tiles(w):
    return _dequantized(tiles_operand(w))


def _nvfp4(x):
    return _dequantized(gemm_operand(x, "nvfp4"))


def _spec(recipe):
    return MatmulSpec(FP4Config.from_recipe_name(recipe))


def _inputs(m=256, n=128, k=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen) * 0.1, torch.randn(m, n, generator=gen)


def test_recipes_by_name_and_their_checks():
    nv, q2 = (FP4Config.from_recipe_name(r) for r in RECIPES)
    assert (nv.backward, nv.hadamard_group, q2.backward, q2.hadamard_group) == ("nvidia", 16, "quartet2", 128)
    assert nv.format == q2.format == "nvfp4" and not (nv.dge or nv.occ or q2.dge or q2.occ)
    with pytest.raises(ValueError, match="use format='nvfp4', dge=False, occ=False"):
        FP4Config.from_recipe_name("paper", backward="quartet2")
    with pytest.raises(ValueError, match="backward must be one of"):
        FP4Config.from_recipe_name("paper", backward="fp4")
    with pytest.raises(ValueError, match="Hadamard group size"):
        FP4Config.from_recipe_name("quartet2", hadamard_group=100)


def test_weight_tiles_quantize_like_their_transpose():
    w = torch.randn(48, 80)
    assert torch.equal(_tiles(w), _tiles(w.T.contiguous()).T)
    assert tiles_operand(w)[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="multiples of 16"):
        tiles_operand(torch.randn(40, 24))


def _reference_backward(recipe, a, b, dy):
    """Each scheme as method.md states it, drawing in the order the op draws (dA first, then dB)."""
    aq, bq = _nvfp4(a), _tiles(b)
    sr = lambda t: fake_quantize(t, "nvfp4", rounding="stochastic")  # noqa: E731
    if recipe == "nvidia_nvfp4":
        da = sr(dy) @ bq
        s = random_signs(16, device=a.device)
        db = sr(rht(dy.T, s)) @ fake_quantize(rht(a.T, s), "nvfp4").T
        return da, db
    s = random_signs(128, device=a.device)
    da = ms_eden(rht(dy, s)) @ ms_eden(rht(bq.T, s)).T
    s = random_signs(128, device=a.device)
    db = ms_eden(rht(dy.T, s)) @ ms_eden(rht(aq.T, s)).T
    return da, db


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", RECIPES)
def test_forward_and_gradient_gemms_match_the_scheme(recipe, device):
    """The op against each scheme written out with the reference quantizers, same seed. On CUDA the op
    runs the fused Triton rotate+quantize kernel and BF16 GEMMs: its rotation sums in another order, so a
    rare value rounds the other way (tests/test_rotate_quantize.py); there the check is on the norm."""
    a, b, dy = (t.to(device) for t in _inputs())
    a.requires_grad_(True), b.requires_grad_(True)
    torch.manual_seed(7)
    y = fp4_matmul_nt(a, b, None, _spec(recipe))
    y.backward(dy)
    torch.testing.assert_close(y, _nvfp4(a.detach()) @ _tiles(b.detach()).T)
    torch.manual_seed(7)
    da, db = _reference_backward(recipe, a.detach(), b.detach(), dy)
    for got, want in ((a.grad, da), (b.grad, db)):
        if device == "cpu":
            # Same draws and formulas; FP32 sums in another order (the op's operands are contiguous copies).
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        else:
            assert float((got - want).norm() / want.norm()) < 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b_is_weight", [True, False])
@pytest.mark.parametrize("recipe", RECIPES)
def test_native_block_scaled_wiring(monkeypatch, recipe, b_is_weight, device):
    """With sm_100's native path forced on, every NVFP4 GEMM of the recipe goes through the block-scaled op
    and gives the results of the other paths (same draws), except nvidia's dA with an activation B: B_q^T is
    not NVFP4 along N, so that GEMM stays on scaled_gemm. Each gradient operand of a native GEMM is
    quantized once, straight into codes and scales (``packed``). On CPU the op decodes the packed operands
    and multiplies in FP32; on a CUDA GPU other than sm_100 too, fed by the Triton quantizers' codes."""
    a, b, dy = (t.to(device) for t in _inputs())
    spec = MatmulSpec(FP4Config.from_recipe_name(recipe), b_is_weight=b_is_weight)

    def run():
        aa, bb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        torch.manual_seed(3)
        y = fp4_matmul_nt(aa, bb, None, spec)
        y.backward(dy)
        return y, aa.grad, bb.grad

    expected = run()
    calls = []
    real = blackwell.block_scaled_mm
    monkeypatch.setattr(gemm, "native_block_reason", lambda device, cap, fmt: None if fmt == "nvfp4" else "not FP4")
    monkeypatch.setattr(blackwell, "block_scaled_mm", lambda *args, **kw: calls.append(args[6]) or real(*args, **kw))
    quantized, name = [], "rotate_quantize" if device == "cuda" else "reference"
    quantizer = getattr(rq, name)
    monkeypatch.setattr(rq, name, lambda *args, **kw: quantized.append(kw["packed"]) or quantizer(*args, **kw))
    decoded, gemm_values = [], bq.gemm_values
    monkeypatch.setattr(bq, "gemm_values", lambda op: decoded.append(op) or gemm_values(op))
    got = run()
    native = 3 if b_is_weight or recipe == "quartet2" else 2
    assert calls == ["nvfp4"] * native
    # dA's operands (quartet2: both; nvidia: dY, B_q^T kept from the forward), then dB's two.
    assert quantized == ([True] * 4 if recipe == "quartet2" else [b_is_weight, True, True])
    # Forward operands decoded to values only where the backward reads them: quartet2 rotates both,
    # nvidia reads A itself and a tiled B_q^T's codes (an activation B_q's values: scaled_gemm).
    assert len(decoded) == (2 if recipe == "quartet2" else 0 if b_is_weight else 1)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", RECIPES)
def test_draws_are_fresh_every_step_and_seeded(recipe):
    a, b, dy = _inputs()
    grads = []
    for seed in (1, 2, 1):
        bb = b.clone().requires_grad_(True)
        torch.manual_seed(seed)
        fp4_matmul_nt(a, bb, None, _spec(recipe)).backward(dy)
        grads.append(bb.grad)
    assert torch.equal(grads[0], grads[2]) and not torch.equal(grads[0], grads[1])


def test_quartet2_gradients_are_unbiased():
    """Mean over 300 backwards of dA against dY @ B_q: relative error shrinks as 1/sqrt(draws) (one draw:
    ~0.14), so the mean must be within 3x of 0.14 / sqrt(300) = 0.008."""
    a, b, dy = _inputs()
    bq = _tiles(b)
    total = torch.zeros_like(a)
    for _ in range(300):
        aa = a.clone().requires_grad_(True)
        fp4_matmul_nt(aa, b, None, _spec("quartet2")).backward(dy)
        total += aa.grad
    exact = dy @ bq
    assert float((total / 300 - exact).norm() / exact.norm()) < 0.025


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(128, 256), torch.nn.Linear(256, 128)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)))


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("recipe", RECIPES)
def test_compiled_gradients_match_eager_statistics(monkeypatch, recipe, native):
    """Under torch.compile (Inductor) the weight gradient of one step is the scheme's estimate: its error
    against dY^T A is at the level of one draw's noise (eager: ~0.14-0.19), not a broken rotation (>1).
    ``native``: sm_100's path forced, its packed operands and block-scaled op traced and compiled too."""
    calls = []
    if native:
        real = blackwell.block_scaled_mm
        monkeypatch.setattr(gemm, "native_block_reason", lambda device, cap, fmt: None if fmt == "nvfp4" else "no")
        monkeypatch.setattr(blackwell, "block_scaled_mm", lambda *args: calls.append(args[6]) or real(*args))
    torch._dynamo.reset()
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 256, bias=False)
    a, _, _ = _inputs()
    dy = torch.randn(256, 256)
    torch.compile(lin, backend=fp4compile.backend(FP4Config.from_recipe_name(recipe)))(a).backward(dy)
    exact = dy.T @ fake_quantize(a, "nvfp4")
    assert float((lin.weight.grad - exact).norm() / exact.norm()) < 0.3
    # The forward's GEMM (traced once), then dA's and dB's, run inside the gradient op.
    assert calls == (["nvfp4"] * 3 if native else [])


@pytest.mark.parametrize("recipe", RECIPES)
def test_mlp_trains_through_the_backend(recipe):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _MLP()
    compiled = torch.compile(model, backend=fp4compile.backend(FP4Config.from_recipe_name(recipe), inner="aot_eager"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(128, 128, generator=gen) / 10
    losses = []
    for _ in range(40):
        x = torch.randn(256, 128, generator=gen)
        loss = (compiled(x) - torch.tanh(x @ target)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5]), losses
