"""Mixture-of-experts models from transformers (configs only, no download) with backend="fp4": every
expert weight is an FP4 site reported by its parameter's FQN, routers stay in high precision, and a few
training steps lower the loss."""

import expecttest
import pytest
import torch
from conftest import TORCH_2_12, rewritten, train_causal_lm

import fp4compile
from fp4compile import FP4Config
from fp4compile.passes.report import summary_table

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def _qwen3_moe(implementation):
    config = transformers.Qwen3MoeConfig(**COMMON, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                         head_dim=16)
    config._experts_implementation = implementation
    return transformers.Qwen3MoeForCausalLM(config)


def _mixtral(implementation):
    config = transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
    config._experts_implementation = implementation
    return transformers.MixtralForCausalLM(config)


def _deepseek_v3(implementation):
    # Its router adds a bias to the sigmoid scores before torch.topk; layer 0 dense, layer 1 MoE.
    config = transformers.DeepseekV3Config(**{**COMMON, "num_hidden_layers": 2}, moe_intermediate_size=32,
                                           n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
                                           kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16,
                                           qk_nope_head_dim=8, n_group=1, topk_group=1, first_k_dense_replace=1)
    config._experts_implementation = implementation
    return transformers.DeepseekV3ForCausalLM(config)


def _train(model, tmp_path, monkeypatch, dtype=torch.float32, steps=6):
    """AdamW steps on one fixed batch through the fp4 backend (on aot_eager: Inductor's numerics, and
    minutes less compile time on a CPU; tests/test_grouped.py compiles the grouped op with Inductor):
    (losses, the sites of every report)."""
    monkeypatch.setenv("FP4COMPILE_DUMP_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = model.to(dtype)
    tokens = torch.randint(0, model.config.vocab_size, (2, 16))
    losses, reports = train_causal_lm(model, fp4compile.backend(inner="aot_eager"), tokens, tmp_path, steps)
    return losses, [s for r in reports for s in r["sites"]]


def _assert_experts_fp4_and_routers_skipped(model, sites, op):
    experts = {n for n, p in model.named_parameters() if p.dim() == 3}
    routers = {n for n, m in model.named_modules() if n.endswith("mlp.gate")}
    assert experts and routers
    by_weight = {w: s for s in sites for w in s["weights"] if w}
    for name in experts:
        assert by_weight[name]["status"] == "fp4" and by_weight[name]["op"] == op, by_weight[name]
    for name in routers:
        site = by_weight[name + ".weight"]
        assert site["status"] == "skipped" and "router" in site["reason"], site


def _assert_trains(losses):
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize(("build", "implementation", "dtype", "op"), [
    (_qwen3_moe, "grouped_mm", torch.float32, "grouped_mm"),  # transformers' grouped_mm_fallback op
    (_qwen3_moe, "grouped_mm", torch.bfloat16, "grouped_mm"),  # torch._grouped_mm (BF16 weights)
    (_qwen3_moe, "batched_mm", torch.float32, "bmm"),  # bmm over w[expert_ids]
    (_mixtral, "grouped_mm", torch.float32, "grouped_mm"),
    (_mixtral, "batched_mm", torch.float32, "bmm"),
    pytest.param(_deepseek_v3, "grouped_mm", torch.float32, "grouped_mm", marks=pytest.mark.xfail(
        not TORCH_2_12, strict=True, reason="Dynamo before torch 2.12 fails to trace transformers' DeepSeek-V3 "
        "attention (a fake-tensor broadcast in scaled_dot_product_attention), before any backend runs")),
])
def test_experts_are_fp4_and_routers_stay_high_precision(build, implementation, dtype, op, tmp_path, monkeypatch):
    model = build(implementation)
    losses, sites = _train(model, tmp_path, monkeypatch, dtype)
    _assert_experts_fp4_and_routers_skipped(model, sites, op)
    _assert_trains(losses)


class Router(torch.nn.Module):
    """A router by structure, not by name: scores through a cast and a sigmoid into torch.topk."""

    def __init__(self):
        super().__init__()
        self.score = torch.nn.Linear(32, 8, bias=False)
        self.proj = torch.nn.Linear(32, 32, bias=False)

    def forward(self, x):
        picked = torch.topk(torch.sigmoid(self.score(x).float()), 2, dim=-1).indices
        return self.proj(x) * picked.sum(-1, keepdim=True)


@pytest.mark.parametrize("quantize_routers", [False, True])
def test_routers_are_found_by_structure(quantize_routers):
    report, _ = rewritten(Router(), torch.randn(16, 32), config=FP4Config.from_recipe_name("paper", quantize_routers=quantize_routers))
    sites = {s["module"]: s for s in report["sites"]}
    assert sites["proj"]["status"] == "fp4"
    if quantize_routers:
        assert sites["score"]["status"] == "fp4"
    else:
        assert sites["score"]["status"] == "skipped" and "quantize_routers=True" in sites["score"]["reason"]


class GatheredExperts(torch.nn.Module):
    """Expert weights picked per token (index, index_select) or per expert (an int), as batched_mm and
    eager experts do."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 16, 32))
        self.table = torch.nn.Parameter(torch.randn(4, 32))  # rows of a 2-D table are activations
        self.proj = torch.nn.Linear(32, 16, bias=False)

    def forward(self, x, ids):
        a = torch.bmm(self.w[ids], x.unsqueeze(-1)).squeeze(-1)
        b = torch.bmm(x.unsqueeze(1), self.w.index_select(0, ids).mT).squeeze(1)
        c = torch.nn.functional.linear(x, self.w[2])
        return a + b + c + self.proj(self.table[ids])


def test_gathered_expert_weights_are_weight_sites():
    report, _ = rewritten(GatheredExperts(), torch.randn(8, 32), torch.randint(0, 4, (8,)))
    sites = report["sites"]
    assert [s["status"] for s in sites] == ["fp4"] * 4
    assert [s["weights"] for s in sites] == [["w", None], [None, "w"], [None, "w"], [None, "proj.weight"]]


class TinyMoE(torch.nn.Module):
    """transformers' grouped_mm experts in a few lines: a router, tokens sorted by expert, two grouped GEMMs."""

    def __init__(self, d=32, hidden=16, experts=4, top_k=2):
        super().__init__()
        self.gate = torch.nn.Linear(d, experts, bias=False)
        self.gate_up_proj = torch.nn.Parameter(torch.randn(experts, 2 * hidden, d) / d**0.5)
        self.down_proj = torch.nn.Parameter(torch.randn(experts, d, hidden) / hidden**0.5)
        self.top_k = top_k

    def forward(self, x):
        weights, ids = torch.topk(torch.softmax(self.gate(x), -1, dtype=torch.float32), self.top_k, dim=-1)
        ids, perm = torch.sort(ids.reshape(-1))
        counts = torch.histc(ids.float(), bins=self.gate_up_proj.shape[0], min=0, max=self.gate_up_proj.shape[0] - 1)
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        gate, up = torch._grouped_mm(x[perm // self.top_k], self.gate_up_proj.transpose(-2, -1), offs=offs).chunk(2, -1)
        y = torch._grouped_mm(torch.nn.functional.silu(gate) * up, self.down_proj.transpose(-2, -1), offs=offs)
        return (y * weights.reshape(-1)[perm, None].to(y.dtype)).sum(0)


class TestGoldenMoE(expecttest.TestCase):
    def test_grouped_experts_rewritten_router_kept(self):
        report, code = rewritten(TinyMoE().bfloat16(), torch.randn(8, 32, dtype=torch.bfloat16))
        self.assertExpectedInline(code, """\
linear = torch._C._nn.linear(l_x_, l_self_modules_gate_parameters_weight_, None)
softmax = torch.softmax(linear, -1, dtype = torch.float32)
topk = torch.topk(softmax, 2, dim = -1)
weights = topk[0]
ids = topk[1]
reshape = ids.reshape(-1)
sort = torch.sort(reshape)
ids_1 = sort[0]
perm = sort[1]
float_1 = ids_1.float()
counts = torch.histc(float_1, bins = 4, min = 0, max = 3)
offs = torch.cumsum(counts, 0, dtype = torch.int32)
floordiv = perm // 2
getitem_4 = l_x_[floordiv]
transpose = l_self_parameters_gate_up_proj_.transpose(-2, -1)
_grouped_mm = fp4compile_fp4_grouped_mm(getitem_4, transpose, offs = offs)
chunk = _grouped_mm.chunk(2, -1)
gate = chunk[0]
up = chunk[1]
silu = torch.nn.functional.silu(gate)
mul = silu * up
transpose_1 = l_self_parameters_down_proj_.transpose(-2, -1)
y = fp4compile_fp4_grouped_mm_1(mul, transpose_1, offs = offs)
reshape_1 = weights.reshape(-1)
getitem_7 = reshape_1[(perm, None)]
to = getitem_7.to(torch.bfloat16)
mul_1 = y * to
sum_1 = mul_1.sum(0)
return (sum_1,)""")
        self.assertExpectedInline(summary_table(report), """\
fp4compile graph_0_0: 2 fp4, 1 skipped
node         op          module  shapes                  weight  status   gemm      reason
linear       linear      gate    [8, 32] x [4, 32]       B       skipped  -         MoE router (its output picks experts through torch.topk): kept in high precision, as FP8/FP4 MoE recipes do; set quantize_routers=True to quantize it
_grouped_mm  grouped_mm  None    [16, 32] x [4, 32, 32]  B       fp4      emulated  torch._scaled_grouped_mm runs on CUDA sm_90 and sm_100 only, not cpu
y            grouped_mm  None    [16, 16] x [4, 16, 32]  B       fp4      emulated  torch._scaled_grouped_mm runs on CUDA sm_90 and sm_100 only, not cpu""")


@pytest.mark.parametrize("recipe", ["mxfp4", "nvfp4", "nvidia_nvfp4"])
def test_other_formats_skip_experts_with_a_reason(recipe):
    report, _ = rewritten(TinyMoE().bfloat16(), torch.randn(8, 32, dtype=torch.bfloat16),
                          config=FP4Config.from_recipe_name(recipe))
    grouped = [s for s in report["sites"] if s["op"] == "grouped_mm"]
    assert len(grouped) == 2
    for site in grouped:
        assert site["status"] == "skipped" and "only format='vector' with backward='fp8'" in site["reason"], site
