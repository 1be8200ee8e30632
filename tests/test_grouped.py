"""The FP4 grouped GEMM (MoE experts) against the method written out per expert with the reference
quantizer: forward, STE on the tokens, DGE on the experts' weights, OCC, FP8 dY with folded scales.

Tolerance: the op accumulates in FP32 (the emulation's per-expert FP32 GEMMs) and the reference in
float64 from the same FP4 values, so they differ by FP32 summation-order rounding: rtol 1e-5 of the
largest entry (sums of at most 64 products here)."""

import pytest
import torch
from conftest import older_cpu_codegen
from hypothesis import given, settings
from hypothesis import strategies as st

import fp4compile
from fp4compile import FP4Config, fake_quantize
from fp4compile.runtime import hopper
from fp4compile.runtime.dge import dge_derivative
from fp4compile.runtime.grouped import fp4_grouped_mm, grouped_mm_fp32
from fp4compile.runtime.hadamard import rotate
from fp4compile.runtime.matmul import MatmulSpec
from fp4compile.runtime.occ import occ_clamp

S, K, N, E = 40, 64, 32, 4
OFFS = [7, 7, 30, 40]  # expert 1 gets no tokens


def _inputs(s=S, k=K, n=N, e=E, dtype=torch.float32):
    x = torch.randn(s, k, dtype=dtype)
    if s > 3:
        x[3, 5] = 25.0  # an outlier for OCC to clamp
    w = (torch.randn(e, n, k) / k**0.5).to(dtype)
    return x, w, torch.randn(s, n, dtype=dtype)


def _run(x, w, offs, dy, config):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp4_grouped_mm(x, w, torch.tensor(offs, dtype=torch.int32), MatmulSpec(config))
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def _ste(value, x, slope=1.0):
    """``value`` forward, gradient ``slope`` * upstream to ``x``."""
    return value.detach() + (x - x.detach()) * slope


def _reference(x, w, offs, dy, config):
    """Autograd in float64 through a per-expert loop of reference quantize/dequantize, STE on x, DGE on w."""
    x0, w0 = x.double().requires_grad_(), w.double().requires_grad_()
    x, w = x0, w0
    if config.rotation:  # differentiated through: autograd rotates the gradients back
        x, w = rotate(x, config.rotation) / config.rotation, rotate(w, config.rotation)
    residual = torch.zeros_like(x)
    clamped = x.detach()
    if config.occ:
        c, r = occ_clamp(x.detach().float(), config.occ_quantile, config.occ_sample)
        clamped, residual = c.double(), r.double()
    xq = _ste(fake_quantize(clamped), x)
    y = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64)
    start = 0
    for e, end in enumerate(offs):
        we = w[e]
        slope = 1.0
        if config.dge:
            w_scaled = we.detach() / (we.detach().abs().amax(1, keepdim=True) / 6)
            slope = dge_derivative(w_scaled, config.dge_k, config.dge_clip).double()
        wq = _ste(fake_quantize(we.detach()), we, slope)
        y[start:end] = xq[start:end] @ wq.T + residual[start:end] @ we.T
        start = end
    y.backward(dy.double())
    return y.detach(), x0.grad, w0.grad


def _close(actual, expected, rtol=1e-5):
    largest = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * largest)


@pytest.mark.parametrize("recipe", ["paper", "direct_cast", "dge", "occ"])
def test_forward_and_gradients_match_the_method_per_expert(recipe):
    config = FP4Config.from_recipe_name(recipe, grad_dtype=None)
    x, w, dy = _inputs()
    for got, want in zip(_run(x, w, OFFS, dy, config), _reference(x, w, OFFS, dy, config)):
        _close(got, want)


@pytest.mark.parametrize("recipe", ["rotated", "paper"])
def test_rotation_matches_the_method_per_expert(recipe):
    """Both operands rotated along K before they are quantized (with OCC on the rotated activations for
    "paper"): dyadic inputs, so every rotation is exact in FP32 and the reference's quantized values agree."""
    config = FP4Config.from_recipe_name(recipe, rotation=16, grad_dtype=None, occ_sample=None)
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randint(-8, 9, (S, K), generator=gen) / 4, torch.randint(-8, 9, (E, N, K), generator=gen) / 64
    x[3, 5] = 25.0
    dy = torch.randn(S, N, generator=gen)
    for got, want in zip(_run(x, w, OFFS, dy, config), _reference(x, w, OFFS, dy, config)):
        _close(got, want)


@settings(max_examples=25, deadline=None)
@given(
    counts=st.lists(st.integers(0, 9), min_size=1, max_size=5),
    k=st.sampled_from([8, 24, 64]),
    n=st.sampled_from([4, 16]),
    tail=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_any_grouping_matches_the_method(counts, k, n, tail, seed):
    """Any split of the tokens, empty experts and rows past offs[-1] (zeros in Y and dX) included."""
    torch.manual_seed(seed)
    offs = torch.tensor(counts).cumsum(0).tolist()
    x, w, dy = _inputs(offs[-1] + tail, k, n, len(counts))
    config = FP4Config.from_recipe_name("paper", grad_dtype=None, occ_sample=None)
    got, want = _run(x, w, offs, dy, config), _reference(x, w, offs, dy, config)
    for g, r in zip(got, want):
        _close(g, r)
    assert not got[0][offs[-1]:].any() and not got[1][offs[-1]:].any()


def _fp8_rows(g):
    scale = g.abs().amax(-1, keepdim=True) / 57344.0  # float8_e5m2's largest finite value
    return (g / scale).to(torch.float8_e5m2).double() * scale.double()


def test_fp8_gradients_fold_the_forward_scales():
    """dX[s] = Q8(dY[s] * s_w[e(s)]) @ W_values[e(s)]; dW_e = Q8(dY^T * s_x)[:, rows of e] @ X_values[rows
    of e], with dY^T quantized per feature over all tokens (its scale factors out of each expert)."""
    config = FP4Config.from_recipe_name("paper", occ=False, dge=False)
    x, w, dy = _inputs()
    _, dx, dw = _run(x, w, OFFS, dy, config)
    s_x = x.abs().amax(1, keepdim=True) / 6
    s_w = w.abs().amax(2, keepdim=True) / 6
    x_values = fake_quantize(x.double()) / s_x.double()
    w_values = fake_quantize(w.double()) / s_w.double()
    g_w = _fp8_rows(dy.T * s_x.T)
    for e, rows in _groups(OFFS):
        _close(dx[rows], _fp8_rows(dy[rows] * s_w[e].T) @ w_values[e])
        _close(dw[e], g_w[:, rows] @ x_values[rows])
    assert not dw[1].any()  # the expert without tokens gets no gradient


def _groups(offs):
    """(expert, its rows) of every expert with tokens."""
    starts = [0, *offs[:-1]]
    return [(e, slice(s, t)) for e, (s, t) in enumerate(zip(starts, offs)) if t > s]


def test_backward_operands_original_uses_unquantized_operands():
    config = FP4Config.from_recipe_name("paper", occ=False, dge=False, grad_dtype=None, backward_operands="original")
    x, w, dy = _inputs()
    _, dx, dw = _run(x, w, OFFS, dy, config)
    for e, rows in _groups(OFFS):
        _close(dx[rows], dy[rows].double() @ w[e].double())
        _close(dw[e], dy[rows].double().T @ x[rows].double())


@older_cpu_codegen
@pytest.mark.vectorized
def test_bfloat16_keeps_its_dtype_and_compiles_like_eager():
    """torch._grouped_mm (BF16 only under torch.compile) through the fp4 backend and Inductor computes the
    bits of the eager op with the default recipe (its rotation group where K = 64: report's rotation)."""
    x, w, dy = (t.bfloat16() for t in _inputs())
    offs = torch.tensor(OFFS, dtype=torch.int32)
    wp = torch.nn.Parameter(w.clone())

    def moe(x, offs):
        return torch._grouped_mm(x, wp.transpose(-2, -1), offs=offs)

    xc = x.clone().requires_grad_()
    y = torch.compile(moe, backend="fp4")(xc, offs)
    y.backward(dy)
    eager = _run(x, w, OFFS, dy, FP4Config(rotation=64))
    for got, want in zip((y, xc.grad, wp.grad), eager):
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_recompute_weights_keeps_no_fp8_expert_weights():
    """The experts' FP4 values are recomputed in the backward with recompute_weights (their quantize
    tagged for Inductor's partitioner) and kept without it; the same gradients either way."""
    x, w, dy = (t.bfloat16() for t in _inputs())
    offs = torch.tensor(OFFS, dtype=torch.int32)
    results = []
    for recompute in (False, True):
        torch._dynamo.reset()
        wp = torch.nn.Parameter(w.clone())
        xc = x.clone().requires_grad_()
        config = FP4Config.from_recipe_name("dge", recompute_weights=recompute)
        moe = torch.compile(lambda x, offs: torch._grouped_mm(x, wp.transpose(-2, -1), offs=offs),
                            backend=fp4compile.backend(config))
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = moe(xc, offs)
        y.backward(dy)
        fp8 = [tuple(t.shape) for t in saved if t.dtype == torch.float8_e4m3fn and t.dim() == 3]
        results.append((fp8, [y, xc.grad, wp.grad]))
    (kept, plain), (recomputed, got) = results
    assert kept and not recomputed
    assert all(torch.equal(a, b) for a, b in zip(plain, got))


def test_emulation_is_exact_fp32_per_group():
    a, b = torch.randn(10, 8), torch.randn(3, 4, 8)
    offs = torch.tensor([2, 2, 9], dtype=torch.int32)
    y = grouped_mm_fp32(a, b, offs)
    assert torch.equal(y[:2], a[:2] @ b[0].T) and torch.equal(y[2:9], a[2:9] @ b[2].T) and not y[9:].any()
    g = torch.randn(4, 10)
    dw = grouped_mm_fp32(g, a, offs)
    assert torch.equal(dw[2], g[:, 2:9] @ a[2:9]) and not dw[1].any()


@pytest.mark.parametrize(("capability", "out_dtype", "n", "k", "fp8"), [
    ((9, 0), torch.bfloat16, 128, 256, True),
    ((10, 0), torch.bfloat16, 128, 256, True),
    ((8, 9), torch.bfloat16, 128, 256, False),  # FP8 tensor cores, but no grouped FP8 kernel
    ((12, 0), torch.bfloat16, 128, 256, False),
    ((9, 0), torch.float32, 128, 256, False),  # the kernel returns BF16 only
    ((9, 0), torch.bfloat16, 120, 256, False),
    ((9, 0), torch.bfloat16, 128, 200, False),
])
def test_fp8_grouped_path_conditions(capability, out_dtype, n, k, fp8):
    reason = hopper.grouped_device_reason("cuda", capability, out_dtype, n, k)
    assert (reason is None) == fp8, reason
