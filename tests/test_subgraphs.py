"""Matmuls inside the subgraphs of higher-order ops: activation checkpointing (tag_activation_checkpoint),
torch.compiler.nested_compile_region (invoke_subgraph), torch.cond, custom autograd.Functions."""

import json
import warnings

import expecttest
import pytest
import torch
import torch.nn as nn
from conftest import assert_complete, readable_code, rewritten
from torch.utils.checkpoint import checkpoint

import fp4compile
import fp4compile.passes
from fp4compile import FP4Config
from fp4compile.passes import fp4_pass
from fp4compile.passes.report import summary_table
from fp4compile.passes.subgraphs import check_complete, matmul_nodes


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class Checkpointed(nn.Module):
    """A block under non-reentrant activation checkpointing (or not), then an output head (found by its
    log_softmax)."""

    def __init__(self, checkpointed=True):
        super().__init__()
        self.block = Block()
        self.lm_head = nn.Linear(32, 16)
        self.checkpointed = checkpointed

    def forward(self, x):
        x = checkpoint(self.block, x, use_reentrant=False) if self.checkpointed else self.block(x)
        return torch.log_softmax(self.lm_head(x), -1)


class RegionBlock(Block):
    @torch.compiler.nested_compile_region
    def forward(self, x):
        return super().forward(x)


class Regions(nn.Module):
    """Two blocks whose forward is a nested_compile_region: Dynamo traces one subgraph and calls it twice."""

    def __init__(self, regional=True):
        super().__init__()
        self.b0, self.b1 = (RegionBlock(), RegionBlock()) if regional else (Block(), Block())

    def forward(self, x):
        return self.b1(self.b0(x))


class Cond(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 32)
        self.w = nn.Parameter(torch.randn(32, 32) / 32**0.5)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda x: self.up(x), lambda x: x @ self.w, (x,))


class Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.t() @ x


class CustomFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 32))

    def forward(self, x):
        return Matmul.apply(x, self.w)


def _step(model, backend, x, dump_dir=None, monkeypatch=None):
    """One forward and backward through torch.compile; (output, {name: grad}, the reports)."""
    if dump_dir is not None:
        monkeypatch.setenv("FP4COMPILE_DUMP_DIR", str(dump_dir))
    torch._dynamo.reset()
    model.zero_grad(set_to_none=True)
    y = torch.compile(model, backend=backend)(x)
    y.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    reports = [json.loads(p.read_text()) for p in sorted(dump_dir.glob("*/report.json"))] if dump_dir else []
    return y.detach(), grads, reports


def _twins(cls):
    """The model with and without the feature that makes the subgraph, with the same weights."""
    a, b = cls(), cls(False)
    b.load_state_dict(a.state_dict())
    return a, b


def _sites(reports):
    return {s["module"]: s for r in reports for s in r["sites"]}


# The string is Inductor with the default config (exact OCC quantiles at this size); the control runs
# AOTAutograd's eager kernels with OCC's quantiles from a stratified sample (64 of the 2048 entries).
# On CUDA sm_89+ the activations' FP4 operands and dY's FP8 operands come from fp4compile's Triton ops.
@pytest.mark.parametrize("backend, device", [
    ("fp4", "cpu"),
    ("aot_eager", "cpu"),
    pytest.param("fp4", "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
def test_checkpointed_block_is_quantized_and_recomputes_the_same_values(backend, device, tmp_path, monkeypatch):
    fp4 = backend if backend == "fp4" else fp4compile.backend(FP4Config.from_recipe_name("paper", occ_sample=64), inner=backend)
    model, plain = (m.to(device) for m in _twins(Checkpointed))
    x = torch.randn(64, 32, device=device)
    _, grads, reports = _step(model, fp4, x, tmp_path / "ckpt", monkeypatch)
    _, want, plain_reports = _step(plain, fp4, x, tmp_path / "plain", monkeypatch)
    _, high, _ = _step(plain, "aot_eager", x)
    assert_complete(reports)
    sites = _sites(reports)
    assert {m: (s["subgraph"], s["status"], s["weights"]) for m, s in sites.items()} == {
        "block.up": ("wrap_body_0", "fp4", [None, "block.up.weight"]),
        "block.down": ("wrap_body_0", "fp4", [None, "block.down.weight"]),
        "lm_head": (None, "skipped", [None, "lm_head.weight"]),
    }
    assert {m: s["status"] for m, s in sites.items()} == {m: s["status"] for m, s in _sites(plain_reports).items()}
    [after] = (tmp_path / "ckpt").glob("*/after.py")  # the dump shows the rewritten subgraph
    assert "class wrap_body_0" in after.read_text() and "fp4compile_fp4_linear_1(" in after.read_text()
    # The backward recomputes the block's forward, FP4 quantization and OCC thresholds included: the
    # gradients are the non-checkpointed run's, bit for bit on eager kernels and to FP32 rounding of
    # differently fused kernels under Inductor; the FP4 error itself is orders of magnitude larger.
    for name, g in grads.items():
        scale = want[name].abs().max()
        assert (g - want[name]).abs().max() <= (0 if backend == "aot_eager" else 1e-6 * scale), name
        assert (g - high[name]).abs().max() > 1e-3 * scale, name


def test_checkpointed_rotated_block_recomputes_the_same_rotation(tmp_path, monkeypatch):
    """The rotated recipe under activation checkpointing (Inductor, with its pass that recomputes weights'
    rotations): the recomputed forward rotates with the same fixed signs, so the gradients are the
    non-checkpointed run's up to FP32 rounding of differently fused kernels."""
    fp4 = fp4compile.backend(FP4Config.from_recipe_name("rotated", rotation=32))
    model, plain = _twins(Checkpointed)
    x = torch.randn(64, 32)
    _, grads, reports = _step(model, fp4, x, tmp_path / "ckpt", monkeypatch)
    _, want, _ = _step(plain, fp4, x, tmp_path / "plain", monkeypatch)
    assert {s["module"]: s["status"] for r in reports for s in r["sites"]} == {
        "block.up": "fp4", "block.down": "fp4", "lm_head": "skipped"}
    for name, g in grads.items():
        assert (g - want[name]).abs().max() <= 1e-6 * want[name].abs().max(), name


def test_checkpointed_backward_recomputes_the_quantization():
    """AOTAutograd's partitioner recomputes the checkpointed block in the backward graph, the FP4 twins'
    OCC thresholds (kthvalue) included; without checkpointing the backward only reads saved tensors."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def count_kthvalue(model):
        counts = {}

        def backend(gm, example_inputs):
            fp4_pass(gm, example_inputs, FP4Config.from_recipe_name("paper"))

            def compiler(name):
                def compile(g, _):
                    counts[name] = g.code.count("kthvalue")
                    return make_boxed_func(g)

                return compile

            return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"))(gm, example_inputs)

        torch._dynamo.reset()
        torch.compile(model, backend=backend)(torch.randn(64, 32)).sum().backward()
        return counts

    checkpointed, plain = count_kthvalue(Checkpointed()), count_kthvalue(Checkpointed(False))
    assert checkpointed["forward"] == plain["forward"] > 0
    assert plain["backward"] == 0 and checkpointed["backward"] == checkpointed["forward"]


def test_include_exclude_and_nested_checkpoints():
    """Module filters apply inside subgraphs; a checkpoint inside a checkpoint is a subgraph's subgraph
    whose weights are followed back through both HOPs."""

    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.outer = nn.Linear(32, 32)
            self.inner = Block()

        def forward(self, x):
            return checkpoint(lambda x: checkpoint(self.inner, self.outer(x), use_reentrant=False), x, use_reentrant=False)

    report, _ = rewritten(Nested(), torch.randn(4, 32), config=FP4Config.from_recipe_name("paper", exclude=("inner.down",)))
    got = [(s["subgraph"], s["module"], s["weights"][1], s["status"], s["reason"]) for s in report["sites"]]
    assert got == [
        ("wrap_body_1", "outer", "outer.weight", "fp4", None),
        ("wrap_body_1.wrap_body_0", "inner.up", "inner.up.weight", "fp4", None),
        ("wrap_body_1.wrap_body_0", "inner.down", "inner.down.weight", "skipped", "module 'inner.down' matched by config.exclude"),
    ]


def _tiny_llama(checkpointed: bool):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).train()
    if checkpointed:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # renamed activation_checkpointing_enable in 5.x
            model.gradient_checkpointing_enable()
    return model


def test_llama_gradient_checkpointing(tmp_path, monkeypatch):
    # The `kernels` package, when installed, wraps attention's forward in a context-variable update that
    # Dynamo refuses inside a checkpoint (a graph break: the layers would run eagerly, unquantized).
    # Skipping that side effect in the recomputation is harmless: it is undone before the layer returns.
    tokens = torch.randint(0, 128, (2, 32))
    backend = fp4compile.backend(FP4Config.from_recipe_name("paper"), inner="aot_eager")
    runs = []
    for checkpointed in (True, False):
        model = _tiny_llama(checkpointed)
        monkeypatch.setenv("FP4COMPILE_DUMP_DIR", str(tmp_path / str(checkpointed)))
        torch._dynamo.reset()
        # The `kernels` package, when installed, wraps attention's forward in a context-variable update
        # that Dynamo refuses inside a checkpoint (a graph break: the layers would run eagerly,
        # unquantized). Not replaying it in the recomputation is harmless: it is undone before returning.
        with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
            torch.compile(model, backend=backend)(input_ids=tokens, labels=tokens).loss.backward()
        reports = [json.loads(p.read_text()) for p in sorted((tmp_path / str(checkpointed)).glob("*/report.json"))]
        assert_complete(reports)
        runs.append(({n: p.grad for n, p in model.named_parameters()}, _sites(reports)))
    (grads, sites), (want, plain_sites) = runs
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears <= set(sites)
    # Other matmuls (transformers 5.17's rotary embedding: inv_freq @ positions) are activation matmuls,
    # reported as skipped in both runs.
    others = {n: s["status"] for n, s in sites.items() if n not in linears}
    assert others == {n: s["status"] for n, s in plain_sites.items() if n not in linears}
    assert set(others.values()) <= {"skipped"}, others
    for name in linears:
        assert sites[name]["status"] == ("skipped" if name == "lm_head" else "fp4"), sites[name]
        assert sites[name]["subgraph"] == (None if name == "lm_head" else f"wrap_body_{name.split('.')[2]}")
        assert sites[name]["weights"][1] == plain_sites[name]["weights"][1] == f"{name}.weight"
    for name, g in grads.items():
        assert torch.equal(g, want[name]), name


def test_a_graph_break_inside_a_checkpoint_is_warned_of():
    """A side effect inside a checkpointed region makes Dynamo break the graph and run the region eagerly,
    in high precision, where no report sees it: the backend warns, naming Dynamo's flag."""

    class Block(nn.Module):
        def __init__(self, side_effect: bool):
            super().__init__()
            self.before, self.inner, self.after = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
            self.side_effect, self.calls = side_effect, 0

        def body(self, x):
            if self.side_effect:
                self.calls += 1
            return self.inner(x)

        def forward(self, x):
            return self.after(checkpoint(self.body, self.before(x), use_reentrant=False))

    backend = fp4compile.backend(FP4Config(), inner="aot_eager")
    for side_effect in (False, True):
        torch._dynamo.reset()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.compile(Block(side_effect), backend=backend)(torch.randn(4, 32)).sum().backward()
        warned = [str(w.message) for w in caught if "activation-checkpointed region" in str(w.message)]
        assert len(warned) == side_effect, warned
    assert "skip_fwd_side_effects_in_bwd_under_checkpoint = True" in warned[0]


def test_nested_compile_region_calls_one_rewritten_subgraph(tmp_path, monkeypatch):
    backend = fp4compile.backend(FP4Config.from_recipe_name("paper"), inner="aot_eager")
    model, plain = _twins(Regions)
    x = torch.randn(16, 32, requires_grad=True)  # without, Dynamo inlines the regions
    y, grads, reports = _step(model, backend, x, tmp_path / "region", monkeypatch)
    want_y, want, _ = _step(plain, backend, x, tmp_path / "plain", monkeypatch)
    assert_complete(reports)
    # One subgraph serves both blocks: its sites are named after the first call's module and weights.
    assert [(s["subgraph"], s["module"], s["weights"][1], s["status"]) for r in reports for s in r["sites"]] == [
        ("subgraph_0", "b0.up", "b0.up.weight", "fp4"),
        ("subgraph_0", "b0.down", "b0.down.weight", "fp4"),
    ]
    assert torch.equal(y, want_y)
    for name, g in grads.items():
        assert torch.equal(g, want[name]), name


@torch.compiler.nested_compile_region
def _project(x, w):
    return x @ w.t()


def test_region_called_with_a_weight_and_an_activation_in_one_place_is_skipped():
    """One rewrite serves every call of a subgraph: when the calls disagree on which operand is a weight
    (DGE on it, OCC on the other), the subgraph keeps its matmul and says why."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(32, 32))

        def forward(self, x, v):
            return _project(_project(x, self.w), v)

    report, _ = rewritten(Mixed(), torch.randn(4, 32, requires_grad=True), torch.randn(32, 32, requires_grad=True))
    [site] = report["sites"]
    assert site["subgraph"] == "subgraph_0" and site["status"] == "skipped"
    assert "called with a parameter and an activation in the same place (invoke_subgraph, invoke_subgraph_1)" in site["reason"]


def test_cond_branches_are_reported_as_skipped(tmp_path, monkeypatch):
    """torch.cond's backward needs both branches' gradients in one memory layout; FP4 gradients of a
    transposed weight do not keep it, so the branches keep their matmuls, each reported with the reason."""
    model = Cond()
    x = torch.randn(8, 32)
    y, _, reports = _step(model, fp4compile.backend(FP4Config.from_recipe_name("paper"), inner="aot_eager"), x, tmp_path, monkeypatch)
    assert_complete(reports)
    sites = [s for r in reports for s in r["sites"]]
    assert [(s["subgraph"], s["op"], s["status"]) for s in sites] == [
        ("cond_true_0", "linear", "skipped"),
        ("cond_false_0", "matmul", "skipped"),
    ]
    assert all("inside torch.cond" in s["reason"] for s in sites)
    torch.testing.assert_close(y, model(x), rtol=1e-6, atol=1e-6)
    assert fp4compile.coverage(model) == {"fp4": [], "skipped": ["w", "up.weight"], "not_a_weight": [], "unseen": []}


def test_checkpoint_wrapper():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    report, _ = rewritten(nn.Sequential(checkpoint_wrapper(Block())), torch.randn(4, 32))
    assert [(s["subgraph"], s["status"]) for s in report["sites"]] == [("wrap_body_0", "fp4")] * 2
    assert all(s["weights"][1] for s in report["sites"])


def test_custom_autograd_function_bodies_are_reported_as_skipped():
    """... and coverage counts the weight the function takes as "skipped" (a matmul weight in high
    precision), not "not_a_weight"."""
    model = CustomFunction()
    report, _ = rewritten(model, torch.randn(4, 32, requires_grad=True))
    sites = report["sites"]
    assert {s["subgraph"] for s in sites} == {"fwd_body_0", "bwd_body_0"} and len(sites) == 3
    assert all(s["status"] == "skipped" and "custom autograd.Function" in s["reason"] for s in sites)
    assert fp4compile.coverage(model) == {"fp4": [], "skipped": ["w"], "not_a_weight": [], "unseen": []}


def test_guard_catches_a_matmul_missing_from_the_report(monkeypatch):
    """A pass that misses a subgraph fails loudly, naming the matmuls it left out."""
    report, _ = rewritten(Checkpointed(), torch.randn(4, 32))
    expected = {("wrap_body_0", "linear"), ("wrap_body_0", "linear_1"), (None, "linear")}
    check_complete(expected, report)
    report["sites"] = [s for s in report["sites"] if s["subgraph"] is None]
    with pytest.raises(RuntimeError, match=r"internal error.*\('wrap_body_0', 'linear'\)"):
        check_complete(expected, report)

    # The same through the pass: a walk that yields only the root graph.
    walk = fp4compile.passes.subgraphs
    monkeypatch.setattr(fp4compile.passes, "subgraphs", lambda gm, params: walk(gm, params)[:1])
    with pytest.raises(Exception, match=r"internal error.*wrap_body_0"):
        rewritten(Checkpointed(), torch.randn(4, 32))


def test_matmul_nodes_reads_find_sites_tables(monkeypatch):
    """The guard counts what find_sites' tables list, so an op added there is checked too."""
    from fp4compile.passes.find_sites import FUNCTION_OPS

    gm = torch.fx.symbolic_trace(lambda x: torch.relu(x) + 1)
    assert matmul_nodes(gm) == set()
    monkeypatch.setitem(FUNCTION_OPS, torch.relu, "relu")
    assert matmul_nodes(gm) == {(None, "relu")}


class TestGoldenSubgraphs(expecttest.TestCase):
    def test_checkpointed_block(self):
        captured = {}

        def capture(gm, example_inputs):
            captured["report"] = fp4_pass(gm, example_inputs, FP4Config.from_recipe_name("paper"))
            captured["root"], captured["body"] = readable_code(gm), readable_code(gm.wrap_body_0)
            return gm

        torch._dynamo.reset()
        torch.compile(Checkpointed(), backend=capture, fullgraph=True)(torch.randn(4, 32))
        self.assertExpectedInline(captured["root"], """\
wrap_body_0 = self.wrap_body_0
tag_activation_checkpoint = torch.ops.higher_order.tag_activation_checkpoint(wrap_body_0, l_x_, l_self_modules_block_modules_up_parameters_weight_, l_self_modules_block_modules_up_parameters_bias_, l_self_modules_block_modules_down_parameters_weight_, l_self_modules_block_modules_down_parameters_bias_, use_reentrant = False)
x = tag_activation_checkpoint[0]
linear = torch._C._nn.linear(x, l_self_modules_lm_head_parameters_weight_, l_self_modules_lm_head_parameters_bias_)
log_softmax = torch.log_softmax(linear, -1)
return (log_softmax,)""")
        self.assertExpectedInline(captured["body"], """\
linear = fp4compile_fp4_linear(l_x_, l_self_modules_block_modules_up_parameters_weight_, l_self_modules_block_modules_up_parameters_bias_)
relu = torch.relu(linear)
linear_1 = fp4compile_fp4_linear_1(relu, l_self_modules_block_modules_down_parameters_weight_, l_self_modules_block_modules_down_parameters_bias_)
return (linear_1,)""")
        self.assertExpectedInline(summary_table(captured["report"]), """\
fp4compile graph_0_0: 2 fp4, 1 skipped
node                  op      module      shapes              weight  status   gemm      reason
linear                linear  lm_head     [4, 32] x [16, 32]  B       skipped  -         output head (its output feeds log_softmax): kept in high precision; FP4Config(quantize_output_heads=True) quantizes it
wrap_body_0.linear    linear  block.up    [4, 32] x [64, 32]  B       fp4      emulated  device 'cpu' has no FP8 tensor cores (CUDA sm_89+ needed)
wrap_body_0.linear_1  linear  block.down  [4, 64] x [32, 64]  B       fp4      emulated  device 'cpu' has no FP8 tensor cores (CUDA sm_89+ needed)""")


def test_coverage_names_the_weights_no_graph_had():
    """fp4compile.coverage lists a model's weight matrices by what the backend did with them: a Linear
    inside a checkpointed region that Dynamo ran eagerly (a side effect broke the graph) is "unseen", as
    are an LSTM's (Dynamo does not compile it), the other Linear "fp4"; embeddings are not listed."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.before, self.inner = nn.Embedding(16, 32), nn.Linear(32, 32), nn.Linear(32, 32)
            self.rnn, self.calls = nn.LSTM(32, 32), 0

        def body(self, x):
            self.calls += 1
            return self.inner(x)

        def forward(self, ids):
            x = checkpoint(self.body, self.before(self.embed(ids)), use_reentrant=False)
            return self.rnn(x)[0].sum()

    model = Model()
    weights = ["before.weight", "inner.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0"]
    assert fp4compile.coverage(model) == {"fp4": [], "skipped": [], "not_a_weight": [], "unseen": weights}
    compiled = torch.compile(model, backend=fp4compile.backend(FP4Config(), inner="aot_eager"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled(torch.randint(0, 16, (2, 8))).backward()
    want = {"fp4": weights[:1], "skipped": [], "not_a_weight": [], "unseen": weights[1:]}
    assert fp4compile.coverage(model) == fp4compile.coverage(compiled) == want  # without "_orig_mod."
