"""Inputs at the edges: batches without tokens, non-finite activations under OCC, and dims the unbiased
recipes cannot rotate. Each behaves like eager (or fails with an error naming the fix)."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fp4compile
from fp4compile import FP4Config
from fp4compile.runtime.fp8 import quantize_fp8_rows
from fp4compile.runtime.matmul import MatmulSpec, fp4_matmul_nt
from fp4compile.runtime.occ import occ_thresholds, sample_index

EMPTY_CONFIGS = {
    "paper": FP4Config.from_recipe_name("paper"),
    "occ_off": FP4Config.from_recipe_name("paper", occ=False),
    "nvidia": FP4Config.from_recipe_name("nvidia_nvfp4"),
    "quartet2": FP4Config.from_recipe_name("quartet2"),
}


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128))


def _train_step(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.sum().backward()
    return out, x.grad, [p.grad for p in model.parameters()]


def _assert_empty_step(step, shape):
    out, dx, grads = step
    assert out.shape == (*shape[:-1], 128) and dx.shape == shape
    for g in grads:  # no tokens: every gradient is an exact zero, never NaN
        assert g is not None and torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("shape", [(0, 128), (2, 0, 128)])
@pytest.mark.parametrize("name", EMPTY_CONFIGS)
def test_a_batch_without_tokens_trains_like_eager(name, shape):
    """Compiled with the FP4 pass (AOTAutograd traces the backward, where dW reduces over the tokens)."""
    model = _mlp()
    _assert_empty_step(_train_step(model, torch.zeros(shape)), shape)  # eager
    inner = "inductor" if name == "paper" else "aot_eager"  # the tracing failed; Inductor once suffices
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=fp4compile.backend(EMPTY_CONFIGS[name], inner=inner))
    _assert_empty_step(_train_step(compiled, torch.randn(shape)), shape)


def test_empty_batch_after_a_dynamic_one():
    model = _mlp()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fp4", dynamic=True)
    out, _, grads = _train_step(compiled, torch.randn(32, 128))
    assert out.isfinite().all() and all(g.abs().sum() > 0 for g in grads)
    _assert_empty_step(_train_step(compiled, torch.randn(0, 128)), (0, 128))


@pytest.mark.parametrize("name", EMPTY_CONFIGS)
def test_eager_fp4_matmul_without_tokens(name):
    x = torch.randn(0, 128, requires_grad=True)
    w = torch.randn(128, 128, requires_grad=True)
    b = torch.randn(128, requires_grad=True)
    y = fp4_matmul_nt(x, w, b, MatmulSpec(EMPTY_CONFIGS[name]))
    y.sum().backward()
    assert y.shape == (0, 128)
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_fp8_rows_of_no_entries_have_zero_scale():
    data, scale = quantize_fp8_rows(torch.randn(5, 0), torch.float8_e5m2)
    assert data.shape == (5, 0) and torch.equal(scale, torch.zeros(5, 1))


# --- OCC with non-finite activations ---------------------------------------------------------------------


def ref_finite_thresholds(values: torch.Tensor, q: float) -> tuple[float, float]:
    """runtime/occ.py's definition, from the sorted finite entries: with k = ceil(q n) over all n and c
    non-finite, the (k - c)-th smallest and largest finite entries; (-inf, inf) where they cross."""
    n = values.numel()
    finite = sorted(values[values.isfinite()].tolist())
    k = -(-Fraction(q).limit_denominator(1 << 20) * n // 1)
    r = int(k) - (n - len(finite))
    if r < 1 or finite[len(finite) - r] > finite[r - 1]:
        return -math.inf, math.inf
    return finite[len(finite) - r], finite[r - 1]


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 2000),
    bad=st.lists(st.sampled_from([math.nan, math.inf, -math.inf]), max_size=30),
    q=st.sampled_from([0.99, 0.9, 0.75, 0.51, 1.0]),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_occ_thresholds_count_non_finite_entries_out(n, bad, q, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))).to(dtype)
    where = torch.randperm(n, generator=g)[: len(bad)]
    x[where] = torch.tensor(bad[: where.numel()], dtype=dtype)
    lower, upper = occ_thresholds(x, q)
    assert (lower.item(), upper.item()) == ref_finite_thresholds(x, q)  # c = 0: the plain nearest rank


def test_occ_sampled_thresholds_count_non_finite_entries_out():
    x = torch.randn(256, 1024)
    m = 4096
    picked = sample_index(x.numel(), m)
    flat = x.view(-1)
    flat[picked[:5]] = math.nan  # in the sample
    flat[picked[5:7]] = math.inf
    flat[picked[0] + 1] = -math.inf  # not in the sample: no effect
    lower, upper = occ_thresholds(x, 0.99, sample=m)
    assert (lower.item(), upper.item()) == ref_finite_thresholds(flat[picked], 0.99)
    assert math.isfinite(lower.item()) and math.isfinite(upper.item())


def _tied_activation():
    """Integers in [-4, 4] with 8 outliers: both thresholds fall inside a run of ~200 ties (+-4), so
    counting a few entries out of the ranks leaves them where they were and rows can be compared bit for
    bit with a clean run; the outliers are clamped and compensated."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-4, 5, (64, 32), generator=g).float()
    x.view(-1)[torch.randperm(x.numel(), generator=g)[:8]] = torch.tensor([30.0, -25, 17, -40, 22, -19, 50, -33])
    return x


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("cols, compiled", [(slice(5, 6), False), (slice(None), False), (slice(None), True)])
def test_a_non_finite_token_poisons_only_its_own_row(bad, cols, compiled):
    """With OCC on (the default recipe), a NaN or inf in token t (one entry, or the whole token, as a
    layer that overflowed gives): row t of the output is not finite, every other row is finite and
    bit-equal to the run with those entries set to 0 (the thresholds, asserted equal here, are unchanged by
    the tied data; in general they move by the c ranks counted out)."""
    x, t = _tied_activation(), 9
    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(1))
    poisoned = x.clone()
    poisoned[t, cols] = bad
    clean = x.clone()
    clean[t, cols] = 0.0
    assert torch.equal(torch.stack(occ_thresholds(poisoned, 0.99)), torch.stack(occ_thresholds(clean, 0.99)))
    assert occ_thresholds(clean, 0.99)[1].item() == 4.0  # and the outliers are clamped
    fn = lambda a: fp4_matmul_nt(a, w, None, MatmulSpec(FP4Config.from_recipe_name("paper")))  # noqa: E731
    if compiled:
        linear = torch.nn.Linear(32, 48, bias=False)
        linear.weight.data.copy_(w)
        torch._dynamo.reset()
        fn = torch.compile(linear, backend="fp4")
    got, want = fn(poisoned), fn(clean)
    others = torch.arange(64) != t
    assert not got[t].isfinite().all()
    assert got[others].isfinite().all()
    assert torch.equal(got[others], want[others])


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_rotated_recipe_keeps_a_non_finite_token_in_its_row(bad):
    """The rotation mixes entries along K only, within each token: a NaN or inf in token t poisons row t of
    the output (its whole rotated row, hence its scale), every other row is finite and bit-equal to the
    clean run's, and the gradients of the other tokens stay finite."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 128, generator=g), torch.randn(48, 128, generator=g) / 128**0.5
    t, others = 9, torch.arange(64) != 9
    spec = MatmulSpec(FP4Config.from_recipe_name("rotated"))
    poisoned, clean = x.clone(), x.clone()
    poisoned[t, 5], clean[t, 5] = bad, 0.0
    poisoned.requires_grad_()
    got, want = fp4_matmul_nt(poisoned, w, None, spec), fp4_matmul_nt(clean, w, None, spec)
    assert not got[t].isfinite().any() and torch.equal(got[others], want[others])
    dy = torch.zeros_like(got)
    dy[others] = 1.0
    got.backward(dy)
    assert poisoned.grad[others].isfinite().all()


# --- dims the unbiased recipes cannot rotate --------------------------------------------------------------


class _Attention(torch.nn.Module):
    """q_proj's 128 output features divide quartet2's Hadamard group of 128; k_proj's and v_proj's 32 do not."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(128, n) for n in (128, 32, 32))

    def forward(self, x):
        return self.q_proj(x).sum(-1) + self.k_proj(x).sum(-1) + self.v_proj(x).sum(-1)


def _compiled(recipe, **kwargs):
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = FP4Config.from_recipe_name(recipe)
    return torch.compile(torch.nn.Sequential(_Attention()), backend=fp4compile.backend(config, inner="aot_eager"),
                         **kwargs)


def test_quartet2_names_each_module_whose_output_features_break_dx():
    """dX reduces over N, the output features: the error names k_proj and v_proj at compile time, the GEMM,
    the dim and its multiple, and a fix that is not the batch."""
    x = torch.randn(2, 64, 128, requires_grad=True)
    with pytest.raises(Exception) as info:
        _compiled("quartet2")(x).sum().backward()
    text = str(info.value)
    for module in ("0.k_proj", "0.v_proj"):
        expected = f"module {module!r}: backward='quartet2' quantizes dX = dY @ W along N = 32 (the output features)"
        assert expected in text
    assert "0.q_proj" not in text and "multiple of 128" in text and "hadamard_group=32" in text
    assert "batch" not in text


def test_no_error_for_a_gradient_gemm_that_does_not_run():
    """The input needs no gradient: no dX GEMM, so the 32 output features are fine."""
    _compiled("quartet2")(torch.randn(2, 64, 128)).sum().backward()


def test_dynamic_token_count_must_stay_a_multiple():
    compiled = _compiled("nvidia_nvfp4", dynamic=True)
    compiled(torch.randn(2, 64, 128)).sum().backward()
    with pytest.raises(Exception) as info:
        compiled(torch.randn(2, 36, 128)).sum().backward()
    text = str(info.value)
    assert "module '0.q_proj': backward='nvidia' quantizes dW = dY^T @ X along M = 72 (the tokens)" in text
    assert "must stay a multiple of 16 at every step" in text and "pad the batch" in text


@pytest.mark.parametrize("recipe, m, n, gemm", [("quartet2", 48, 128, "dW"), ("quartet2", 128, 64, "dX"),
                                                ("nvidia_nvfp4", 128, 24, "weight tiles")])
def test_runtime_check_names_the_module(recipe, m, n, gemm):
    spec = MatmulSpec(FP4Config.from_recipe_name(recipe), name="layers.0.mlp.up_proj")
    x, w = torch.randn(m, 128, requires_grad=True), torch.randn(n, 128, requires_grad=True)
    with pytest.raises(ValueError, match=rf"module 'layers.0.mlp.up_proj': .*{gemm}"):
        fp4_matmul_nt(x, w, None, spec)
