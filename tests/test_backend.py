"""The backend as users meet it: registration, configs, dumps and logs, train_step, guard rails."""

import json
import logging
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention
from conftest import CPU_CODEGEN_ROUNDS_AS_EAGER, TORCH_2_13, older_cpu_codegen, relative_error, rewritten

import fp4compile
from fp4compile import FP4Config
from fp4compile import dynamo_backend
from fp4compile.dynamo_backend import fp4_backend, inductor_patches
from fp4compile.passes.find_sites import clean_fqn
from fp4compile.passes.joint import JointPasses
from fp4compile.runtime.matmul import MatmulSpec, fp4_matmul_nt


def _mlp(d_in=64):
    return nn.Sequential(nn.Linear(d_in, 64), nn.ReLU(), nn.Linear(64, 32))


class CountingBackend:
    """The fp4 backend (on aot_eager, numerics without Inductor's compile time), counting its graphs."""

    def __init__(self, config=None):
        self.inner = fp4compile.backend(config, inner="aot_eager")
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)


def test_backend_string_is_registered_by_entry_point():
    assert "fp4" in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("fp4") is fp4_backend


def test_the_default_is_the_rotated_recipe_and_recipes_name_their_estimators():
    assert FP4Config() == FP4Config.from_recipe_name("rotated") == fp4compile.backend().config
    assert (FP4Config().occ, FP4Config().rotation) == (False, 128)
    paper = FP4Config.from_recipe_name("paper")
    assert (paper.dge, paper.occ, paper.rotation) == (True, True, None)
    for name in fp4compile.RECIPES:  # no recipe inherits the default's rotation unless it is the default
        assert (FP4Config.from_recipe_name(name).rotation is not None) == (name == "rotated"), name
    with pytest.raises(ValueError, match=r"rotation=128 \(the default\) .* add rotation=None"):
        FP4Config(format="mxfp4")
    with pytest.raises(ValueError, match="add rotation=None, or use the recipe 'nvidia_nvfp4'"):
        FP4Config(format="nvfp4", backward="nvidia", dge=False)


def test_recipes_and_config_errors():
    assert FP4Config.from_recipe_name("direct_cast") == FP4Config.from_recipe_name("paper", dge=False, occ=False)
    assert FP4Config.from_recipe_name("paper", occ_quantile=0.999).occ_quantile == 0.999
    with pytest.raises(ValueError, match="choose one of"):
        FP4Config.from_recipe_name("fp5")
    with pytest.raises(ValueError, match="unknown FP4 format 'fp5'"):
        FP4Config.from_recipe_name("paper", format="fp5")
    with pytest.raises(ValueError, match="occ_quantile must be in"):
        FP4Config.from_recipe_name("paper", occ_quantile=0.3)
    with pytest.raises(ValueError, match="float8_e5m2"):
        FP4Config.from_recipe_name("paper", grad_dtype="int8")
    with pytest.raises(ValueError, match="Hadamard group size must be one of"):
        FP4Config.from_recipe_name("paper", rotation=48)
    with pytest.raises(ValueError, match="not format='mxfp4' with backward='fp8': add rotation=None"):
        FP4Config.from_recipe_name("paper", format="mxfp4", rotation=32)
    with pytest.raises(TypeError, match=r"exclude=\('lm_head',\)"):
        FP4Config.from_recipe_name("paper", exclude="lm_head")
    with pytest.raises(TypeError, match="sets the backend itself"):
        fp4compile.compile(_mlp(), backend="inductor")
    with pytest.raises(ValueError, match="inner must be one of"):
        fp4compile.backend(inner="eager")


@older_cpu_codegen
@pytest.mark.vectorized
@pytest.mark.parametrize("recipe", ["dge", "rotated"])
def test_inductor_computes_the_bits_eager_does(recipe):
    """A BF16 model's outputs and gradients through Inductor equal those of the same rewritten graph run
    eagerly (inner="aot_eager"): DGE's factor and a rotated weight recomputed for it are rounded to BF16
    inside Inductor's fused kernels as eager rounds them (emulate_precision_casts, the backend's default;
    without it the weight gradients differ by ~0.3% of their norm)."""
    config = FP4Config.from_recipe_name(recipe)
    results = []
    for inner in ("inductor", "aot_eager"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model, x = _mlp(128).bfloat16(), torch.randn(48, 128, dtype=torch.bfloat16, requires_grad=True)
        y = torch.compile(model, backend=fp4compile.backend(config, inner=inner))(x)
        y.float().square().mean().backward()
        results.append([y, x.grad, *(p.grad for p in model.parameters())])
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_a_graph_with_fp4_sites_that_dynamo_would_run_eagerly_raises(monkeypatch):
    """When the compiler behind the pass raises a fake-tensor error (AOTAutograd does for a data-dependent
    scalar that a DTensor op needs: OCC's quantile on row-parallel activations), Dynamo runs the graph's
    code eagerly with only a log line: FP4 sites would train in high precision, so the backend raises,
    naming them. A graph with none falls back as under backend="inductor"; under suppress_errors a warning
    says the code runs eagerly."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    def failing(gm, example_inputs):
        raise DataDependentOutputException(torch.ops.aten._local_scalar_dense.default)

    monkeypatch.setattr(dynamo_backend, "lookup_backend", lambda name: failing)
    model, x = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)), torch.randn(4, 32)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=r"its 2 FP4 sites \(modules 0, 2\) would train in high precision"):
        torch.compile(model, backend=fp4compile.backend(inner="aot_eager"))(x)
    torch._dynamo.reset()
    excluded = fp4compile.backend(FP4Config(exclude=("0", "2")), inner="aot_eager")
    assert torch.equal(torch.compile(model, backend=excluded)(x), model(x))
    # torch._dynamo.config.suppress_errors runs the code eagerly on any backend error: a warning says so.
    torch._dynamo.reset()
    with torch._dynamo.config.patch(suppress_errors=True), pytest.warns(UserWarning, match="suppress_errors is set"):
        y = torch.compile(model, backend=fp4compile.backend(inner="aot_eager"))(x)
    assert torch.equal(y, model(x))


@pytest.mark.vectorized
def test_mode_and_options_reach_inductor(monkeypatch):
    """torch.compile's mode and options configure Inductor under the fp4 backend as under backend="inductor",
    through the backend string and through fp4compile.compile, on top of the backend's one default
    (emulate_precision_casts, which an option overrides); wrong ones fail naming the way out."""
    patches = []
    compile_fx = dynamo_backend.compile_fx

    def recording(gm, example_inputs, config_patches):
        patches.append(config_patches)
        return compile_fx(gm, example_inputs, config_patches=config_patches)

    monkeypatch.setattr(dynamo_backend, "compile_fx", recording)
    model, x = _mlp(), torch.randn(4, 64)
    want = torch.compile(model, backend="fp4")(x)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model, backend="fp4", mode="reduce-overhead")(x), want)
    torch._dynamo.reset()
    torch.testing.assert_close(fp4compile.compile(model, options={"coordinate-descent-tuning": True})(x), want)
    # The joint-graph passes (passes/joint.py) ride along with whatever else is asked for.
    assert all(isinstance(p.pop("joint_custom_pre_pass"), JointPasses) for p in patches)
    exact = {"emulate_precision_casts": True, **dynamo_backend.cpu_vector_width({})}
    assert patches == [exact, {**exact, "triton.cudagraphs": True}, {**exact, "coordinate_descent_tuning": True}]
    torch._dynamo.reset()
    torch.compile(model, backend="fp4", options={"emulate_precision_casts": False, "cpp.simdlen": 512})(x)
    assert patches[-1].pop("joint_custom_pre_pass") and patches[-1] == {"emulate_precision_casts": False,
                                                                         "cpp.simdlen": 512}
    assert inductor_patches("max-autotune-no-cudagraphs") == {"max_autotune": True, "coordinate_descent_tuning": True}
    for kwargs, message in (({"options": {"no_such_option": 1}}, "unknown Inductor option 'no_such_option'"),
                            ({"mode": "fastest"}, "Unrecognized mode=fastest")):
        torch._dynamo.reset()
        with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=message):
            torch.compile(model, backend="fp4", **kwargs)(x)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="which inner='aot_eager' does not use"):
        torch.compile(model, backend=fp4compile.backend(inner="aot_eager"), mode="max-autotune")(x)


@pytest.mark.vectorized
def test_cpu_kernels_storing_two_transposed_16_bit_copies_store_their_values():
    # A backward stores W^T and X^T so; torch 2.13's AVX512 code for such a kernel stored wrong values,
    # NaN among them: the backend vectorizes CPU graphs at AVX2 width there (cpu_vector_width).
    a, b = (torch.randn(n, 128, dtype=torch.bfloat16).t() for n in (128, 256))

    def copies(a, b):
        return a.contiguous(), b.contiguous()

    torch._dynamo.reset()
    for got, want in zip(torch.compile(copies, backend="fp4")(a, b), copies(a, b)):
        assert torch.equal(got, want)


@pytest.mark.vectorized
@pytest.mark.parametrize("scalar", [True, False])
def test_cpu_code_is_scalar_before_torch_2_13(monkeypatch, scalar):
    # torch 2.11's and 2.12's AVX2-wide code computed the rotated linear wrong (dynamo_backend.SCALAR_CPU_CODE).
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(dynamo_backend, "SCALAR_CPU_CODE", scalar)
    _, (code,) = run_and_get_code(torch.compile(nn.Linear(64, 32), backend="fp4"), torch.randn(4, 64))
    assert ("at::vec::" in code) == (not scalar and bool(pick_vec_isa()))
    assert dynamo_backend.cpu_vector_width({"cpp.simdlen": 512}) == {}


def test_include_exclude_filters():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
    x = torch.randn(4, 64)
    report, _ = rewritten(model, x, config=FP4Config.from_recipe_name("paper", include=("1",), exclude=()))
    assert [s["status"] for s in report["sites"]] == ["skipped", "fp4"]
    assert "not matched by config.include" in report["sites"][0]["reason"]
    report, _ = rewritten(model, x, config=FP4Config.from_recipe_name("paper", exclude=lambda fqn: fqn == "0"))
    assert [s["status"] for s in report["sites"]] == ["skipped", "fp4"]


@pytest.mark.parametrize("path", [
    "L['self']._modules['block']._modules['fc']", "L['self'].block.fc", "L['args'][0].block.fc",
    "L['self']._modules['block']._parameters['fc']",
])
def test_module_paths_from_dynamo_sources_become_fqns(path):
    # L['args'][0]: transformers 5.2x wraps forward in a decorator, so the module arrives as the first positional arg.
    assert clean_fqn(path) == "block.fc"


def test_unsupported_sites_keep_the_original_op_with_a_reason():
    def fn(x, y, w):
        return torch.addmm(x, y, w), y @ w[:, 0], (y.long() @ w.long())

    report, code = rewritten(fn, torch.randn(4, 4), torch.randn(4, 8), torch.randn(8, 4))
    reasons = [s["reason"] for s in report["sites"]]
    assert "activation x activation" in reasons[0]
    assert "1-D operand" in reasons[1]
    assert "torch.int64 operands" in reasons[2]
    assert "fp4compile" not in code


def test_addmm_and_baddbmm_with_beta_and_alpha_are_rewritten():
    """beta * input + alpha * (the FP4 product), where beta = 0 ignores the input's NaNs, as torch does."""
    lin, w3 = nn.Linear(16, 8), nn.Parameter(torch.randn(1, 16, 8))

    def fn(x, b, nan):
        w = lin.weight
        return (torch.addmm(b, x, w.T, beta=0.5, alpha=2.0), torch.addmm(nan, x, w.T, beta=0, alpha=3.0),
                torch.baddbmm(b[None], x[None], w3, alpha=0.25), x @ w.T, torch.bmm(x[None], w3))

    x, b, nan = torch.randn(4, 16), torch.randn(4, 8), torch.full((4, 8), float("nan"))
    report, _ = rewritten(fn, x, b, nan)
    assert [(s["op"], s["status"]) for s in report["sites"]] == [
        ("addmm", "fp4"), ("addmm", "fp4"), ("baddbmm", "fp4"), ("matmul", "fp4"), ("bmm", "fp4")]
    torch._dynamo.reset()
    *got, product, batched = torch.compile(fn, backend=fp4compile.backend(inner="aot_eager"))(x, b, nan)
    assert not torch.equal(product, x @ lin.weight.T)
    for y, want in zip(got, (product * 2.0 + b * 0.5, product * 3.0, batched * 0.25 + b[None])):
        assert torch.equal(y, want)


def test_every_other_matmul_like_op_is_a_site_skipped_with_its_reason():
    """Matmul-like ops the pass does not rewrite are sites skipped with a reason naming what to write
    instead, never left out of the report (conftest.assert_complete counts them apart);
    torch.linalg.matmul is rewritten as matmul."""
    from fp4compile.passes.find_sites import NOT_REWRITTEN

    w = nn.Parameter(torch.randn(8, 16))
    cell = nn.LSTMCell(16, 8)

    def fn(x, v, q, b3):
        m = w.detach()
        return (torch.mv(m, v), m.mv(v), torch.addmv(v[:8], m, v), torch.dot(v, v), v.dot(v),
                torch.linalg.vecdot(x, x), torch.inner(x, m), x.inner(m), torch.outer(v, v),
                torch.addr(v[:, None] * v, v, v), torch.tensordot(x, m, dims=([1], [1])),
                torch.linalg.multi_dot([x, m.T, m]), F.bilinear(x, x, b3),
                torch.addbmm(x[:2, :8], x.view(2, 2, 16), torch.stack([m.T, m.T])),
                torch.zeros(4, 8).addmm_(x, m.T), F.scaled_dot_product_attention(q, q, q), cell(x)[0],
                flex_attention(q, q, q), torch.cdist(x, m), torch.ops.aten.mv(m, v), torch.linalg.matmul(x, w.T))

    report, code = rewritten(fn, torch.randn(4, 16), torch.randn(16), torch.randn(1, 2, 4, 16), torch.randn(3, 16, 16))
    ops = ["mv", "mv", "addmv", "dot", "dot", "dot", "inner", "inner", "outer", "addr", "tensordot", "multi_dot",
           "bilinear", "addbmm", "addmm_", "scaled_dot_product_attention", "recurrent", "flex_attention", "cdist", "mv"]
    sites = report["sites"]
    assert [s["op"] for s in sites] == [*ops, "matmul"]
    assert [(s["status"], s["reason"]) for s in sites[:-1]] == [("skipped", NOT_REWRITTEN[op]) for op in ops]
    assert sites[-1]["status"] == "fp4" and "fp4compile" in code


def test_keyword_operands_aten_calls_and_rmatmul_are_rewritten():
    """The same product written five more ways is found with its weight and rewritten: operands by keyword
    (moved to their positions), aten's ops called directly, ``__rmatmul__`` (as ``a @ b``). All compute
    the FP4 linear's bits."""
    lin = nn.Linear(16, 8, bias=False)

    def fn(x):
        w = lin.weight
        return (F.linear(x, w), F.linear(x, weight=w), torch.mm(x, mat2=w.T), torch.ops.aten.mm(x, w.T),
                torch.ops.aten.linear.default(x, w), w.T.__rmatmul__(x))

    x = torch.randn(4, 16)
    report, _ = rewritten(fn, x)
    assert [(s["op"], s["status"], s["weights"][1]) for s in report["sites"]] == [
        (op, "fp4", "weight") for op in ("linear", "linear", "mm", "mm", "linear", "matmul")]
    backend = fp4compile.backend(FP4Config.from_recipe_name("rotated", rotation=16), inner="aot_eager")
    first, *others = torch.compile(fn, backend=backend)(x)
    assert not torch.equal(first, x @ lin.weight.T)
    for i, y in enumerate(others):
        assert torch.equal(y, first), i


def test_weights_computed_from_parameters_are_weights():
    """A weight the model computes from parameters only (weight_norm, a slice of a fused weight, a LoRA
    merge, table rows picked by constant ids) is quantized as a weight, named by the parameters it is
    made of, and coverage counts each of them; a weight scaled by an activation stays an activation."""
    from torch.nn.utils.parametrizations import weight_norm

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.normed, self.fused = weight_norm(nn.Linear(16, 16)), nn.Linear(16, 48, bias=False)
            self.a, self.b = nn.Parameter(torch.randn(16, 4)), nn.Parameter(torch.randn(4, 16) * 0.1)
            self.table = nn.Parameter(torch.randn(40, 16))

        def forward(self, x):
            x = self.normed(x)
            x = x @ self.fused.weight[:16].T + (x @ (self.fused.weight.chunk(3)[1] + self.a @ self.b).T)
            x = x @ self.table[torch.arange(16)].T + x @ torch.ones(self.table.shape[1], 16, dtype=x.dtype)
            return x @ (self.table[:16] * x.mean()).T

    model, x = Model(), torch.randn(8, 16)
    report, _ = rewritten(model, x)
    w = "normed.parametrizations.weight.original"
    assert [(s["op"], s["status"], s["weights"]) for s in report["sites"]] == [
        ("linear", "fp4", [None, f"{w}1+{w}0"]), ("matmul", "fp4", [None, "fused.weight"]),
        ("matmul", "fp4", ["a", "b"]), ("matmul", "fp4", [None, "fused.weight+a+b"]),
        ("matmul", "fp4", [None, "table"]), ("matmul", "skipped", [None, None]), ("matmul", "skipped", [None, None])]
    torch._dynamo.reset()
    torch.compile(model, backend=fp4compile.backend(inner="aot_eager"))(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert fp4compile.coverage(model) == {
        "fp4": ["a", "b", "table", f"{w}0", f"{w}1", "fused.weight"], "skipped": [], "not_a_weight": [], "unseen": []}


@torch.library.custom_op("fp4test::scaled_linear", mutates_args=())
def _scaled_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x @ w.T * scale


_scaled_linear.register_fake(lambda x, w, scale: x.new_empty(*x.shape[:-1], w.shape[0]))


def test_custom_operators_taking_a_weight_are_reported_and_warned_about():
    """A custom operator is opaque to the pass: one that takes a weight matrix (here through a view) is
    listed in the report and warned about once; one that takes only activations, or a 1-D parameter, is not."""
    lin, gain = nn.Linear(16, 8, bias=False), nn.Parameter(torch.ones(8))

    def fn(x):
        return _scaled_linear(x, lin.weight.T.T, gain) + _scaled_linear(x, x.repeat(2, 1), gain) + lin(x)

    with pytest.warns(UserWarning, match=r"custom operator fp4test::scaled_linear takes the weight weight;"):
        report, _ = rewritten(fn, torch.randn(4, 16))
    assert report["opaque"] == [{"subgraph": None, "node": "scaled_linear_default", "op": "fp4test::scaled_linear",
                                 "weights": ["weight"]}]
    assert [s["status"] for s in report["sites"]] == ["fp4"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per operator
        rewritten(fn, torch.randn(4, 16))


def test_coverage_tells_weights_from_other_parameters():
    """coverage: a weight a site quantizes is "fp4" (nn.MultiheadAttention's input projection too, a
    keyword of its op); one that only a custom operator takes is "skipped" (the report's opaque list says
    why); parameters the graph uses as no matmul's weight (ViT's class token and positional embedding, a
    matrix that an FP4 addmm only adds) are "not_a_weight", not "unseen" as a weight that ran eagerly
    would be."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls, self.pos = nn.Parameter(torch.zeros(1, 1, 16)), nn.Parameter(torch.randn(1, 5, 16))
            self.proj, self.opaque, self.gain = nn.Linear(16, 16), nn.Parameter(torch.randn(8, 16)), nn.Parameter(torch.ones(8))
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.shift, self.mix = nn.Parameter(torch.zeros(1, 16)), nn.Parameter(torch.randn(16, 16))

        def forward(self, x):
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
            x = self.attn(x, x, x, need_weights=False)[0]
            x = torch.addmm(self.shift, x.flatten(0, 1), self.mix).view_as(x)
            return _scaled_linear(self.proj(x), self.opaque, self.gain)

    model = Model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the custom operator's warning: once per process
        report, _ = rewritten(model, torch.randn(2, 4, 16))
    assert [s["status"] for s in report["sites"]] == ["fp4"] * 3 and report["opaque"][0]["weights"] == ["opaque"]
    assert fp4compile.coverage(model) == {
        "fp4": ["mix", "proj.weight", "attn.in_proj_weight", "attn.out_proj.weight"], "skipped": ["opaque"],
        "not_a_weight": ["cls", "pos", "shift"], "unseen": []}


def test_a_matmul_under_vmap_is_skipped_with_its_reason():
    """torch.func.vmap puts batched tensors into the graph, which the twin's autograd.Function cannot take
    (the compile failed): such a site is skipped, named, and the step trains; the same layer outside
    vmap is FP4."""
    lin = nn.Linear(16, 8)

    def fn(x):
        return torch.func.vmap(lin)(x) + lin(x)

    x = torch.randn(4, 16)
    report, _ = rewritten(fn, x)
    assert [(s["status"], s["reason"] and "vmap" in s["reason"]) for s in report["sites"]] == [
        ("skipped", True), ("fp4", None)]
    torch._dynamo.reset()
    torch.compile(fn, backend=fp4compile.backend(inner="aot_eager"))(x).sum().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


@pytest.mark.parametrize("kdim, rotation", [(None, 32), (48, 16)])
def test_multihead_attention_projections_are_quantized(kdim, rotation, monkeypatch):
    """nn.MultiheadAttention is one op in Dynamo's graph: its site's twin runs torch's implementation with
    each projection (packed or separate q/k/v, and the output's) through the FP4 linear twin, so the
    compiled module computes what that twin computes eagerly, outputs and gradients bit for bit. One
    rotation group serves every projection: the largest dividing each K (32 and 48: 16)."""
    from fp4compile.runtime import ops

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 2, batch_first=True, kdim=kdim, vdim=kdim)
    x, kv = torch.randn(2, 16, 32), torch.randn(2, 16, kdim or 32)
    config = FP4Config.from_recipe_name("rotated", rotation=32)
    report, _ = rewritten(mha, x, kv, kv, config=config)
    (site,) = report["sites"]
    assert (site["op"], site["status"], site["weights"]) == ("multi_head_attention", "fp4", [None, "out_proj.weight"])
    assert site["rotation"] == rotation

    calls = []
    linear = ops.linear
    monkeypatch.setattr(ops, "linear", lambda spec, *args: calls.append(args[1].shape) or linear(spec, *args))
    compiled = torch.compile(mha, backend=fp4compile.backend(config, inner="aot_eager"))
    y = compiled(x, kv, kv)[0]
    y.square().sum().backward()
    got = [y, *(p.grad for p in mha.parameters())]
    # per trace of the forward: q's and the packed k/v's projections (k is v) or the separate q, k and v
    # projections, then the output's
    one = [(32, 32), (64, 32)] if kdim is None else [(32, 32), (32, kdim), (32, kdim)]
    assert calls and [tuple(c) for c in calls] == [*one, (32, 32)] * (len(calls) // (len(one) + 1))
    spec = MatmulSpec(config.replace(rotation=rotation), b_is_weight=True, name="")
    mha.zero_grad()
    y = ops.multi_head_attention(spec, x.transpose(0, 1), kv.transpose(0, 1), kv.transpose(0, 1), 32, 2,
                                 mha.in_proj_weight, mha.in_proj_bias, None, None, False, 0.0, mha.out_proj.weight,
                                 mha.out_proj.bias, use_separate_proj_weight=kdim is not None,
                                 q_proj_weight=mha.q_proj_weight, k_proj_weight=mha.k_proj_weight,
                                 v_proj_weight=mha.v_proj_weight)[0].transpose(0, 1)
    y.square().sum().backward()
    want = [y, *(p.grad for p in mha.parameters())]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not torch.equal(y, mha(x, kv, kv)[0])  # quantized


def test_multihead_attention_with_a_learned_query_takes_its_inputs_as_activations():
    """A pooling head (SigLIP's) asks nn.MultiheadAttention with a learned probe as its query. The site
    treats A as an activation all the same: its spec serves the key, value and output projections too,
    whose A are activations, so the gradients of x are those of the same probe passed as an input."""

    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.probe, self.attn = nn.Parameter(torch.randn(1, 1, 32)), nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x, probe=None):
            q = (self.probe if probe is None else probe).expand(x.shape[0], -1, -1)
            return self.attn(q, x, x, need_weights=False)[0]

    torch.manual_seed(0)
    pool, x = Pool(), torch.randn(2, 8, 32)
    report, _ = rewritten(pool, x)
    assert [s["weights"] for s in report["sites"]] == [[None, "attn.out_proj.weight"]]

    def x_grad(*probe):
        torch._dynamo.reset()
        xg = x.clone().requires_grad_()
        torch.compile(pool, backend=fp4compile.backend(inner="aot_eager"))(xg, *probe).square().sum().backward()
        return xg.grad

    assert torch.equal(x_grad(), x_grad(pool.probe.detach().clone()))


def test_multihead_attention_with_no_common_rotation_group_stays_in_high_precision():
    mha = nn.MultiheadAttention(32, 2, batch_first=True, kdim=12, vdim=12)
    x, kv = torch.randn(2, 16, 32), torch.randn(2, 16, 12)
    report, _ = rewritten(mha, x, kv, kv, config=FP4Config.from_recipe_name("rotated"))
    (site,) = report["sites"]
    assert site["status"] == "skipped" and "reduction dim of size 4 is not a multiple of 16" in site["reason"]


def test_rotation_takes_the_largest_group_dividing_each_reduction_dim():
    """K = 96 takes 32, K = 64 the configured 64; K = 40 (no group divides it) stays in high precision.
    Each site's product equals its own group's (the network computed site by site with that config)."""
    model = nn.Sequential(nn.Linear(96, 64), nn.Linear(64, 40), nn.Linear(40, 8))
    x = torch.randn(4, 96)
    config = FP4Config.from_recipe_name("rotated", rotation=64, grad_dtype=None)
    report, _ = rewritten(model, x, config=config)
    assert [(s["status"], s["rotation"]) for s in report["sites"]] == [("fp4", 32), ("fp4", 64), ("skipped", None)]
    assert "not a multiple of 16, the smallest rotation group" in report["sites"][2]["reason"]
    y = torch.compile(model, backend=fp4compile.backend(config, inner="aot_eager"))(x)
    h = fp4_matmul_nt(x, model[0].weight, model[0].bias, MatmulSpec(config.replace(rotation=32)))
    h = fp4_matmul_nt(h, model[1].weight, model[1].bias, MatmulSpec(config))
    assert torch.equal(y, model[2](h))


def test_einsum_forms():
    w = nn.Parameter(torch.randn(16, 32))
    def fn(x):
        sq = x[:, :, :16]
        return torch.einsum("btd,fd->btf", x, w), torch.einsum("bii,bj->bj", sq, sq[:, 0]), torch.einsum("bii->b", sq)

    report, _ = rewritten(fn, torch.randn(2, 16, 32))
    assert [s["status"] for s in report["sites"]] == ["fp4", "skipped", "skipped"]
    assert "repeated index" in report["sites"][1]["reason"]
    assert "einsum with 1 operands" in report["sites"][2]["reason"]
    x = torch.randn(2, 16, 32)
    y = fp4compile.compile(fn, config=FP4Config.from_recipe_name("paper", occ=False))(x)[0]
    ref = torch.einsum("btd,fd->btf", fp4compile.fake_quantize(x), fp4compile.fake_quantize(w.detach()))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_einsum_ellipsis_is_spelled_out_and_broadcasting_is_skipped():
    """'...' becomes unused letters for the operands' ranks (implicit output too), so the site is rewritten
    and computes what the explicit equation computes; a label of size 1 against n (a broadcast, which
    torch allows) is skipped, named, where the twin's reshapes failed the compile."""
    w, w3 = nn.Parameter(torch.randn(8, 16)), nn.Parameter(torch.randn(3, 16, 8))

    def fn(x, y):
        return (torch.einsum("...d,ed->...e", x, w), torch.einsum("...d,ed", x, w), torch.einsum("abd,ed->abe", x, w),
                torch.einsum("b...d,bdf->b...f", y, w3), torch.einsum("bij,bjk->bik", y[:1], w3))

    x, y = torch.randn(2, 5, 16), torch.randn(3, 4, 16)
    report, code = rewritten(fn, x, y)
    assert [s["status"] for s in report["sites"]] == ["fp4"] * 4 + ["skipped"]
    assert "broadcasting 'b' (1 against 3)" in report["sites"][4]["reason"]
    assert code.count("fp4compile_fp4_einsum") == 4 and code.count("'abd,ed->abe'") == 3
    torch._dynamo.reset()
    got = torch.compile(fn, backend=fp4compile.backend(inner="aot_eager"))(x, y)
    assert torch.equal(got[0], got[2]) and torch.equal(got[1], got[2])
    assert got[3].shape == (3, 4, 8) and torch.equal(got[4], fn(x, y)[4])


def test_dumps_report_and_structured_trace(tmp_path, monkeypatch):
    artifacts = []

    class Capture(logging.Handler):
        def emit(self, record):
            artifacts.append(record.metadata.get("artifact", {}).get("name"))

    trace_log = torch._logging._internal.trace_log
    handler = Capture()
    monkeypatch.setattr(trace_log, "handlers", [handler])
    monkeypatch.setattr(trace_log, "level", logging.DEBUG)
    model = _mlp()
    compiled = torch.compile(model, backend=CountingBackend(FP4Config.from_recipe_name("paper", dump_dir=str(tmp_path))))
    compiled(torch.randn(4, 64)).sum().backward()
    (graph_dir,) = tmp_path.iterdir()
    assert {p.name for p in graph_dir.iterdir()} == {"before.py", "after.py", "report.json"}
    report = json.loads((graph_dir / "report.json").read_text())
    assert [s["status"] for s in report["sites"]] == ["fp4", "fp4"]
    site = report["sites"][0]
    assert {"op", "module", "shapes", "status", "reason"} <= set(site)
    assert site["module"] == "0" and site["shapes"] == [[4, 64], [64, 64]] and site["reason"] is None
    assert "fp4compile_fp4_linear" in (graph_dir / "after.py").read_text()
    assert "fp4compile" not in (graph_dir / "before.py").read_text()
    assert {"fp4compile_report", "fp4compile_graph_before", "fp4compile_graph_after"} <= set(artifacts)


def test_torch_logs_prints_the_site_table(tmp_path):
    script = textwrap.dedent(
        """
        import torch
        m = torch.nn.Linear(64, 32)
        torch.compile(m, backend="fp4")(torch.randn(4, 64))
        """
    )
    env = {"TORCH_LOGS": "+fp4compile", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "fp4compile graph_0_0: 1 fp4, 0 skipped" in out.stderr
    assert "[4, 64] x [32, 64]" in out.stderr


def test_train_step_decorator_bare_and_configured():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = torch.randn(16, 64), torch.randn(16, 32)

    def step(x, target):
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    bare = fp4compile.train_step(step)
    configured = fp4compile.train_step(config="direct_cast")(step)
    for fn in (bare, configured):  # each recipe trains; their losses differ by their quantization
        losses = [fn(x, target).item() for _ in range(3)]
        assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert bare.__name__ == "step"


def test_inference_no_grad_and_inference_mode():
    model = _mlp()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(4, 64)
    with torch.no_grad():
        y1 = compiled(x)
    with torch.inference_mode():
        y2 = compiled(x)
    assert not y1.requires_grad and torch.equal(y1, y2)
    torch.testing.assert_close(y1, compiled(x).detach())


def test_dynamic_shapes_do_not_recompile_and_stay_exact():
    model = _mlp()
    backend = CountingBackend(FP4Config.from_recipe_name("paper", occ=False))
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for tokens in (8, 24, 40, 56):
        x = torch.randn(tokens, 64)
        compiled(x).sum().backward()
        h = torch.relu(fp4compile.fake_quantize(x) @ fp4compile.fake_quantize(model[0].weight.detach()).T + model[0].bias)
        ref = fp4compile.fake_quantize(h) @ fp4compile.fake_quantize(model[2].weight.detach()).T + model[2].bias
        torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-5)
    assert backend.graphs == 1
    # OCC's quantile rank stays symbolic too.
    backend = CountingBackend(FP4Config.from_recipe_name("paper"))
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for tokens in (8, 24, 40):
        compiled(torch.randn(tokens, 64)).sum().backward()
    assert backend.graphs == 1


def test_symbolic_reduction_dim_is_guarded_for_block_formats():
    backend = CountingBackend(FP4Config.from_recipe_name("paper", format="mxfp4", quantize_activation_matmuls=True))
    compiled = torch.compile(lambda a, b: a @ b, backend=backend, dynamic=True)
    for k in (64, 128, 40, 48):
        compiled(torch.randn(8, k), torch.randn(k, 8))
    # One graph for K % 32 == 0 (quantized), one for the rest (kept in high precision): bounded recompiles.
    assert backend.graphs == 2


def test_graph_breaks_and_training_steps_do_not_recompile():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 32)

        def forward(self, x):
            h = self.a(x)
            torch._dynamo.graph_break()
            return self.b(h)

    model = Net()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(4):
        compiled(torch.randn(8, 64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert backend.graphs == 2


class _SharedInputs(nn.Module):
    """q/k/v read one tensor, as in attention; x's size sets it apart from every weight's. d = 128:
    quartet2 rotates every reduction dim in groups of 128."""

    def __init__(self, d=128):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))

    def forward(self, x):
        return self.q(x) + self.k(x) + self.v(x)


@pytest.mark.parametrize("config", [FP4Config.from_recipe_name("paper", occ=False), FP4Config.from_recipe_name("paper"), FP4Config.from_recipe_name("nvfp4"),
                                    FP4Config.from_recipe_name("quartet2"), FP4Config.from_recipe_name("rotated")],
                         ids=["occ_off", "paper", "nvfp4", "quartet2", "rotated"])
def test_sites_sharing_an_input_quantize_and_save_it_once(config):
    # One quantized copy of x for the backward (and one OCC residual), not one per site: a NaN
    # constant in the quantizer's graph used to keep AOTAutograd's CSE from merging the three.
    torch.manual_seed(0)
    model, x = _SharedInputs(), torch.randn(256, 128, requires_grad=True)
    compiled = torch.compile(model, backend=fp4compile.backend(config))
    compiled(x)  # compile outside the hook
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = compiled(x)
    like_x = [t for t in saved.values() if t.numel() == x.numel()]
    assert len(like_x) == 1 + config.occ, [(t.dtype, t.shape) for t in like_x]
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _saved_for_backward(config):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 768, bias=False), nn.GELU(), nn.Linear(768, 256, bias=False))
    compiled, x = torch.compile(model, backend=fp4compile.backend(config)), torch.randn(512, 256, requires_grad=True)
    compiled(x)
    saved = {}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.setdefault(t.untyped_storage().data_ptr(), t),
                                                  lambda t: t):
        compiled(x)
    return sorted((str(t.dtype), t.numel()) for t in saved.values())


def test_rotation_saves_no_rotated_weight():
    """DGE's backward rotates each weight again (passes/recompute.py) rather than saving the forward's
    rotated copy: the rotated recipe saves what the plain one does, plus the 128 x 128 rotation matrix."""
    plain, rotated = (_saved_for_backward(FP4Config.from_recipe_name(r)) for r in ("dge", "rotated"))
    rotated.remove(("torch.float32", 128 * 128))
    assert rotated == plain


def test_inductor_cache_is_keyed_on_fp4compiles_code(monkeypatch):
    """Inductor's FX graph cache keys on a graph, not on the fp4compile operators it calls: another version
    of fp4compile's code (here, another digest of it) must compile afresh, the same code reuse the cache."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    from fp4compile.passes import joint

    model, x = _mlp(), torch.randn(4, 64)

    def cache_hits():
        torch._dynamo.reset()
        counters.clear()
        torch.compile(model, backend=fp4compile.backend(FP4Config.from_recipe_name("dge")))(x).sum().backward()
        return counters["inductor"]["fxgraph_cache_hit"]

    with fresh_cache():
        assert cache_hits() == 0
        assert cache_hits() == 2  # the forward and the backward
        monkeypatch.setattr(joint, "code_digest", lambda: "another version")
        assert cache_hits() == 0


def test_rotation_keeps_a_joint_graph_pass_already_set(monkeypatch):
    """The rotated recipe adds its joint-graph pass after one the user set, rather than replacing it."""
    from fp4compile.passes import joint

    seen = []
    ours = joint.recompute_tagged
    monkeypatch.setattr(joint, "recompute_tagged", lambda graph: (seen.append("ours"), ours(graph)))
    model = nn.Linear(64, 32)
    with torch._inductor.config.patch(joint_custom_pre_pass=lambda graph: seen.append("user's")):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=fp4compile.backend(FP4Config.from_recipe_name("rotated", rotation=64)))
        compiled(torch.randn(8, 64, requires_grad=True)).sum().backward()
    assert seen == ["user's", "ours"] and model.weight.grad is not None


@pytest.mark.xfail(not TORCH_2_13, strict=True,
                   reason="torch < 2.13 stores x's FP8 values once per _scaled_mm reader on the CPU (two stores "
                   "in one fused kernel)")
def test_an_operand_several_gemms_read_is_stored_once():
    """x's FP4 values, read by two _scaled_mm GEMMs (as q/k/v read theirs on the FP8 path), become one
    buffer: the backend has Inductor realize them (dynamo_backend.prepare_inductor) rather
    than fuse one copy per GEMM into the quantize kernel."""
    from torch._inductor.utils import run_and_get_code

    from fp4compile.runtime.quantize import gemm_operand

    def two_gemms(x, w1, w2):
        xv, one = gemm_operand(x, "vector")[0], torch.ones((), dtype=torch.float32)
        return [torch._scaled_mm(xv, gemm_operand(w, "vector")[0].t(), one, one, out_dtype=torch.bfloat16)
                for w in (w1, w2)]

    x, w1, w2 = (torch.randn(n, 64, dtype=torch.bfloat16) for n in (32, 48, 16))
    _, (code,) = run_and_get_code(torch.compile(two_gemms, backend=fp4compile.backend()), x, w1, w2)
    first_operands = re.findall(r"_scaled_mm\((\w+),", code)
    assert len(first_operands) == 2 and first_operands[0] == first_operands[1], first_operands


def test_cpp_wrapper_settings_reach_the_backward(monkeypatch):
    """The backward graph compiles at the first backward call, inside ``config_patches`` only: the C++
    wrapper's Triton settings must be there (without them torch 2.11 failed the backward with
    "CudaKernelParamCache not populated"), as Inductor derives them. On CUDA the wrapper is on unless the
    options, the process or CUDA graphs say otherwise; on the CPU it is off unless asked for."""
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import get_cpp_wrapper_config
    from torch._subclasses.fake_tensor import FakeTensorMode

    passed = []
    monkeypatch.setattr(dynamo_backend, "compile_fx",
                        lambda gm, example_inputs, config_patches: passed.append(config_patches) or gm.forward)
    monkeypatch.delenv("TORCHINDUCTOR_CPP_WRAPPER", raising=False)
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    cpu = [torch.empty(2, 3)]
    with FakeTensorMode():
        cuda = [torch.empty(2, 3, device="cuda")]

    def wrapper(inputs, **kwargs):
        fp4compile.backend()(gm, inputs, **kwargs)
        return passed[-1].get("cpp_wrapper", False)

    assert wrapper(cuda) and wrapper(cpu, options={"cpp_wrapper": True})
    with inductor_config.patch(cpp_wrapper=True):
        settings = get_cpp_wrapper_config()
    assert passed[-1]["triton.store_cubin"] and settings.items() <= passed[-1].items()
    assert not wrapper(cpu) and not settings.keys() & passed[-1].keys()
    assert not wrapper(cuda, options={"cpp_wrapper": False})
    assert not wrapper(cuda, mode="reduce-overhead") and passed[-1]["triton.cudagraphs"]
    monkeypatch.setenv("TORCHINDUCTOR_CPP_WRAPPER", "0")
    assert not wrapper(cuda)


def _llama_step(config):
    """Loss, gradients and what a one-layer Llama's compiled step keeps for its backward ((dtype, shape,
    bytes) of each saved tensor but the parameters), with 48 tokens (2 x 24), a size no weight has."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch._dynamo.reset()
    torch.manual_seed(0)
    llama = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=24)
    llama._attn_implementation = "sdpa"
    model = LlamaForCausalLM(llama).bfloat16()
    for layer in model.model.layers:
        layer.compile(backend=fp4compile.backend(config))
    ids = torch.randint(0, 128, (2, 24))
    saved = {}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.setdefault(t.untyped_storage().data_ptr(), t),
                                                  lambda t: t):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = [(str(t.dtype), tuple(t.shape), t.untyped_storage().nbytes()) for k, t in saved.items() if k not in params]
    return [loss.detach(), *(p.grad for p in model.parameters())], kept


@pytest.mark.parametrize("recipe", ["rotated", "dge"])
def test_recompute_options_keep_no_fp8_values(recipe):
    """With recompute_activations, a Llama layer's step keeps no activation's FP8 values for the backward
    (it quantizes them again from what it keeps anyway: the norms' inputs and statistics, SwiGLU's inputs,
    attention's output; without a rotation, from the forward's scales: matmul.requantized), no more of
    anything else, and computes the same loss and gradients, bit for bit (with recompute_weights and a
    rotation, from torch 2.13 on: conftest.CPU_CODEGEN_ROUNDS_AS_EAGER); with recompute_weights too, no
    FP8 values at all."""
    (base, base_kept), (lean, lean_kept), (leanest, leanest_kept) = (
        _llama_step(FP4Config.from_recipe_name(recipe, recompute_activations=a, recompute_weights=w))
        for a, w in ((0, 0), (1, 0), (1, 1)))
    # Bit for bit; before torch 2.13 the CPU code does not round to BF16 where eager does (conftest):
    # `dge` recomputes SwiGLU's product without rounding silu, so the down projection's input quantizes to
    # other FP4 values in the backward and its weight gradient (the 9th tensor) differs, by 1.9% with
    # torch 2.11 (usage.md, recompute_activations).
    for other in (lean, leanest):
        differing = [i for i, (a, b) in enumerate(zip(base, other, strict=True)) if not torch.equal(b, a)]
        if CPU_CODEGEN_ROUNDS_AS_EAGER or recipe == "rotated":
            assert not differing
        else:
            assert set(differing) <= {8} and relative_error(other[8], base[8]) < 0.05
    assert not [s for d, s, _ in leanest_kept if d == "torch.float8_e4m3fn"]
    fp8 = lambda kept, activations: sorted(  # noqa: E731
        n for d, s, n in kept if d == "torch.float8_e4m3fn" and (48 in s) == activations)
    assert fp8(base_kept, True) and not fp8(lean_kept, True)
    assert fp8(lean_kept, False) == fp8(base_kept, False)  # the weights' values, kept as before
    others = lambda kept: sum(n for d, _, n in kept if d != "torch.float8_e4m3fn")  # noqa: E731
    assert others(leanest_kept) <= others(lean_kept) <= others(base_kept)


def test_recompute_options_need_the_fp8_backward():
    for recipe in ("paper", "nvidia_nvfp4"):
        with pytest.raises(ValueError, match="recompute_activations=True needs occ=False and backward='fp8'"):
            FP4Config.from_recipe_name(recipe, recompute_activations=True)
    with pytest.raises(ValueError, match="recompute_weights=True needs backward='fp8'"):
        FP4Config.from_recipe_name("quartet2", recompute_weights=True)
    assert FP4Config.from_recipe_name("paper", recompute_weights=True).recompute_weights
