"""Report and include/exclude names come from the root model, whatever was compiled (the whole model, each
block, a block with a graph break, a @train_step function, a wrapped model); output heads are found by
structure and kept in high precision."""

import gc
import json
import warnings
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from conftest import rewritten

import fp4compile
from fp4compile import FP4Config
from fp4compile.passes import fp4_pass, names
from fp4compile.passes.report import summary_table

transformers = pytest.importorskip("transformers")


def _reports(folder) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*/report.json"))]


class Capture:
    """A backend running the FP4 pass only (no AOTAutograd: faster), keeping its reports; the rewritten
    graph runs eagerly, FP4 sites included."""

    def __init__(self, **config):
        self.config, self.reports = FP4Config.from_recipe_name("paper", **config), []

    def __call__(self, gm, example_inputs):
        self.reports.append(fp4_pass(gm, example_inputs, self.config))
        return gm


def _statuses(reports) -> dict[str, str]:
    """Module -> status over every site of every graph, each site also under the blocks its graph serves."""
    out = {}
    for r in reports:
        for s in r["sites"]:
            if s["weights"][1] is None:
                continue
            out[s["module"]] = s["status"]
            for traced, served in r["serves"].items():
                if s["module"].startswith(traced + "."):
                    for other in served:
                        out[other + s["module"][len(traced):]] = s["status"]
    return out


def _llama(layers=3):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


def _tokens():
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def test_regional_compile_excludes_one_layer_by_its_full_name(tmp_path):
    """Each block compiled (torchtitan's way): exclude=("model.layers.1.*",) keeps exactly layer 1 in high
    precision, its outputs equal to the eager layer's, and the other layers (one graph) are FP4."""
    torch._dynamo.reset()
    model = _llama()
    backend = fp4compile.backend(FP4Config.from_recipe_name("paper", dump_dir=str(tmp_path), exclude=("model.layers.1.*",)), inner="aot_eager")
    calls = {}
    for i, layer in enumerate(model.model.layers):
        model.model.layers[i] = torch.compile(layer, backend=backend)
        model.model.layers[i].register_forward_hook(
            lambda m, args, kwargs, out, i=i: calls.setdefault(i, (args, kwargs, out)) and None, with_kwargs=True)
    tokens = _tokens()
    model(tokens, labels=tokens, use_cache=False).loss.backward()

    reports = _reports(tmp_path)
    assert len(reports) == 2  # layers 0 and 2 share a graph; layer 1's selection differs: its own graph
    assert {tuple(v) for r in reports for v in r["serves"].values()} == {("model.layers.0", "model.layers.2")}
    assert any("serves model.layers.0, model.layers.2 (traced in model.layers.0)" in summary_table(r) for r in reports)
    statuses = _statuses(reports)
    for i in range(3):
        for linear in LAYER_LINEARS:
            assert statuses[f"model.layers.{i}.{linear}"] == ("skipped" if i == 1 else "fp4")
    skipped = [s for r in reports for s in r["sites"] if s["status"] == "skipped" and s["weights"][1]]
    assert {s["reason"] for s in skipped} == {f"module 'model.layers.1.{n}' matched by config.exclude" for n in LAYER_LINEARS}
    assert {s["weights"][1] for s in skipped} == {f"model.layers.1.{n}.weight" for n in LAYER_LINEARS}
    for i, (args, kwargs, out) in calls.items():
        eager = model.model.layers[i]._orig_mod(*args, **kwargs)
        error = (out - eager).abs().max().item()
        assert (error < 1e-5) if i == 1 else (error > 1e-2), (i, error)


def test_whole_model_and_in_place_block_compile_give_the_same_names():
    statuses = {}
    for how in ("whole", "blocks"):
        torch._dynamo.reset()
        model = _llama(layers=2)
        backend = Capture(exclude=("model.layers.1.mlp.*",))
        if how == "whole":
            compiled = torch.compile(model, backend=backend)
        else:
            for layer in model.model.layers:
                layer.compile(backend=backend)
            compiled = model
        tokens = _tokens()
        with torch.no_grad():  # the names need only the forward graph
            compiled(tokens, labels=tokens, use_cache=False)
        statuses[how] = {m: s for m, s in _statuses(backend.reports).items() if ".layers." in m}
    assert statuses["whole"] == statuses["blocks"]
    assert {m for m, s in statuses["whole"].items() if s == "skipped"} == {
        f"model.layers.1.{n}" for n in LAYER_LINEARS if n.startswith("mlp.")}
    assert len(statuses["whole"]) == 2 * len(LAYER_LINEARS)


class BreakingBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        h = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(h)


class Stack(nn.Module):
    def __init__(self, block=BreakingBlock, n=3):
        super().__init__()
        self.layers = nn.ModuleList(block() for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("how", ["whole", "blocks"])
def test_graph_break_inside_a_block_keeps_full_names(how):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Stack()
    backend = Capture(exclude=("layers.1.*",))
    if how == "whole":
        compiled = torch.compile(model, backend=backend)
    else:
        for layer in model.layers:
            layer.compile(backend=backend)
        compiled = model
    compiled(torch.randn(8, 32))
    assert _statuses(backend.reports) == {
        f"layers.{i}.{n}": "skipped" if i == 1 else "fp4" for i in range(3) for n in "ab"}
    if how == "blocks":  # block.forward runs eagerly: layer 1 compiled is exactly it, layer 0 is not
        h = torch.randn(8, 32)
        torch.testing.assert_close(model.layers[1](h), model.layers[1].forward(h), rtol=0, atol=1e-6)
        assert (model.layers[0](h) - model.layers[0].forward(h)).abs().max() > 1e-2


def test_train_step_names_a_model_and_its_teacher(tmp_path):
    torch._dynamo.reset()
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    teacher = nn.Sequential(nn.Linear(32, 16))
    opt = torch.optim.SGD(student.parameters(), lr=0.1)

    @fp4compile.train_step(config=FP4Config.from_recipe_name("paper", dump_dir=str(tmp_path), exclude=("2",)))
    def step(x):
        with torch.no_grad():
            target = teacher(x)
        loss = F.mse_loss(student(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    step(torch.randn(8, 32))
    sites = [s for r in _reports(tmp_path) for s in r["sites"] if s["weights"][1]]
    got = sorted((s["root"], s["module"], s["weights"][1], s["status"]) for s in sites)
    assert got == [("student", "0", "0.weight", "fp4"), ("student", "2", "2.weight", "skipped"),
                   ("teacher", "0", "0.weight", "fp4")]
    assert all(s["module_resolved"] for s in sites)


def test_wrapper_prefixes_are_stripped():
    """DDP's ``module.``, torch.compile's ``_orig_mod.``, FSDP1's and activation checkpointing's wrapper
    attributes are not part of a name. DDP runs on a gloo group of one process."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    class FSDP1Like(nn.Module):  # FSDP1's wrapper holds the module as _fsdp_wrapped_module
        def __init__(self, module):
            super().__init__()
            self._fsdp_wrapped_module = module

    inner = nn.Linear(4, 4)
    root = nn.Sequential(FSDP1Like(nn.Sequential(checkpoint_wrapper(inner))), torch.compile(nn.Linear(4, 4)))
    assert names.parameter_name(inner.weight) == "0.0.weight"
    assert names.parameter_name(root[1]._orig_mod.bias) == "1.bias"

    torch._dynamo.reset()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = Stack(n=2)
        ddp = nn.parallel.DistributedDataParallel(model)
        assert names.parameter_name(model.layers[1].a.weight) == "layers.1.a.weight"
        backend = Capture(exclude=("layers.1.b",))
        torch.compile(ddp, backend=backend)(torch.randn(4, 32))
    finally:
        dist.destroy_process_group()
    assert _statuses(backend.reports) == {
        "layers.0.a": "fp4", "layers.0.b": "fp4", "layers.1.a": "fp4", "layers.1.b": "skipped"}


def test_unresolved_names_are_reported_and_warn_once_per_pattern(monkeypatch):
    monkeypatch.setattr(names, "_frame_scope", lambda: None)
    monkeypatch.setattr(names, "_warned", set())
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report, _ = rewritten(model, torch.randn(4, 16), config=FP4Config.from_recipe_name("paper", exclude=("1", "x.*")))
    assert [s["module_resolved"] for s in report["sites"]] == [False] * 3
    assert [s["status"] for s in report["sites"]] == ["fp4", "skipped", "fp4"]
    messages = [str(w.message) for w in caught if "could not be named" in str(w.message)]
    assert len(messages) == 2 and "'1'" in messages[0] and "'x.*'" in messages[1], messages


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        for fc in self.fcs:
            x = fc(x)
        return x


def test_per_block_selections_near_the_recompile_limit_warn_with_the_fix():
    """Block i excludes its own fcs.i: four selections, so four compiles of the shared code; with a
    recompile limit of 4 Dynamo would soon run blocks eagerly, and fp4compile says so, naming the fix."""
    torch._dynamo.reset()
    model = Stack(Wide, n=4)
    backend = Capture(exclude=tuple(f"layers.{i}.fcs.{i}" for i in range(4)))
    for layer in model.layers:
        layer.compile(backend=backend)
    with torch._dynamo.config.patch(recompile_limit=4), pytest.warns(UserWarning, match="recompile_limit = 12"):
        model(torch.randn(2, 16))
    reports = backend.reports
    assert len(reports) == 4 and all(r["serves"] == {} for r in reports)
    assert _statuses(reports) == {f"layers.{i}.fcs.{j}": "skipped" if i == j else "fp4" for i in range(4) for j in range(4)}


class OwnGetattr(Stack):
    def __getattr__(self, name):  # as diffusers' ModelMixin and PEFT's models define it
        return super().__getattr__(name)


def test_a_model_class_with_its_own_getattr_is_named_in_full():
    """Such a class makes Dynamo reach submodules through __dict__['_modules'] (its paths read
    L['self'].__dict__['_modules']['layers'].0.fcs.1): the names and exclude patterns are the model's own."""
    torch._dynamo.reset()
    backend = Capture(exclude=("layers.0.fcs.1",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "could not be named"
        torch.compile(OwnGetattr(Wide, n=2), backend=backend)(torch.randn(2, 16))
    sites = [(s["module"], s["module_resolved"], s["status"]) for r in backend.reports for s in r["sites"]]
    assert sites == [(f"layers.{i}.fcs.{j}", True, "skipped" if (i, j) == (0, 1) else "fp4")
                     for i in range(2) for j in range(4)]


def test_whisper_proj_out_tied_to_the_embedding_stays_high_precision():
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
        max_source_positions=8, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )
    model = transformers.WhisperForConditionalGeneration(config)
    labels = torch.randint(3, 128, (2, 5))
    backend = Capture()
    torch.compile(model, backend=backend)(input_features=torch.randn(2, 8, 16), labels=labels)
    sites = {s["module"]: s for r in backend.reports for s in r["sites"] if s["weights"][1]}
    assert sites["proj_out"]["status"] == "skipped"
    assert sites["proj_out"]["reason"].startswith(
        "output head (weight tied to the input embedding model.decoder.embed_tokens.weight): kept in high precision")
    assert sites["model.decoder.layers.0.fc1"]["status"] == "fp4"


class Classifier(nn.Module):
    def __init__(self, embed=False, scale=lambda logits, x: logits):
        super().__init__()
        self.embed = nn.Embedding(10, 16) if embed else None
        self.body, self.out = nn.Linear(16, 16), nn.Linear(16, 10)
        self.scale = scale

    def forward(self, x, y=None):
        if self.embed is not None:
            x = self.embed(x)
        logits = self.scale(self.out(torch.relu(self.body(x))), x)
        return logits if y is None else F.cross_entropy(logits.float().view(-1, 10), y.view(-1))


def test_a_linear_feeding_cross_entropy_is_an_output_head():
    x, y = torch.randn(4, 16), torch.randint(0, 10, (4,))
    report, _ = rewritten(Classifier(), x, y)
    assert [s["status"] for s in report["sites"]] == ["fp4", "skipped"]
    assert report["sites"][1]["reason"].startswith("output head (its output feeds cross_entropy)")
    report, _ = rewritten(Classifier(), x, y, config=FP4Config.from_recipe_name("paper", quantize_output_heads=True))
    assert [s["status"] for s in report["sites"]] == ["fp4", "fp4"]
    # Without the loss in the graph: an untied head, shaped like the input embedding, whose logits leave it.
    report, _ = rewritten(Classifier(embed=True), torch.randint(0, 10, (4,)))
    assert [s["status"] for s in report["sites"]] == ["fp4", "skipped"]
    assert "weight shaped like the input embedding embed.weight [10, 16]" in report["sites"][1]["reason"]
    report, _ = rewritten(Classifier(), x)  # no embedding, no loss: a plain Linear
    assert [s["status"] for s in report["sites"]] == ["fp4", "fp4"]


@pytest.mark.parametrize("scale", [lambda logits, x: logits / 8.0,  # Granite
                                   lambda logits, x: 0.5 * logits,  # Cohere
                                   lambda logits, x: torch.tanh(logits / 30.0) * 30.0,  # Gemma 2's soft-capping
                                   lambda logits, x: logits.mul(2).tanh().div(2)],
                         ids=["divided", "multiplied", "soft_capped", "methods"])
def test_scaled_and_soft_capped_logits_still_make_an_output_head(scale):
    report, _ = rewritten(Classifier(scale=scale), torch.randn(4, 16), torch.randint(0, 10, (4,)))
    assert [s["status"] for s in report["sites"]] == ["fp4", "skipped"]
    assert report["sites"][1]["reason"].startswith("output head (its output feeds cross_entropy)")


def test_logits_combined_with_another_tensor_are_not_followed():
    report, _ = rewritten(Classifier(scale=lambda logits, x: logits * x[:, :10]), torch.randn(4, 16),
                          torch.randint(0, 10, (4,)))
    assert [s["status"] for s in report["sites"]] == ["fp4", "fp4"]


def test_a_compiled_model_is_freed_once_let_go():
    """The name index holds no model alive: after the user drops a model and resets Dynamo, its parameters
    are freed (a kept model held a whole second model's memory through the next one's training)."""
    model = Stack(n=2)
    compiled = torch.compile(model, backend=fp4compile.backend(inner="aot_eager"))
    compiled(torch.randn(4, 32)).sum().backward()
    assert names.parameter_name(model.layers[1].a.weight) == "layers.1.a.weight"
    weight = weakref.ref(model.layers[0].a.weight)
    del model, compiled
    torch._dynamo.reset()
    gc.collect()
    assert weight() is None
    other = Stack(n=1)  # the index is rebuilt for objects it has not seen
    assert names.parameter_name(other.layers[0].b.weight) == "layers.0.b.weight"
