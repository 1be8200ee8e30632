"""Inputs at the edges: batches without tokens, non-finite activations under OCC, and dims the unbiased
recipes cannot rotate. Each behaves like eager (or fails with an error naming the fix)."""

import pytest
import torch

import fp4compile
from fp4compile import FP4Config
from fp4compile.runtime.fp8 import quantize_fp8_rows
from fp4compile.runtime.matmul import MatmulSpec, fp4_matmul_nt

EMPTY_CONFIGS = {
    "paper": FP4Config(),
    "occ_off": FP4Config(occ=False),
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
