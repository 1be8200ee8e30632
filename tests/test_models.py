"""Real models built from configs (no weights downloaded) train with backend="fp4"."""

import json

import pytest
import torch
from conftest import train_causal_lm

transformers = pytest.importorskip("transformers")


def _train(model, vocab, tmp_path):
    """A few AdamW steps on one fixed batch through torch.compile(backend="fp4"); the losses and the reports."""
    torch.manual_seed(0)
    return train_causal_lm(model, "fp4", torch.randint(0, vocab, (2, 32)), tmp_path)


def _module_sites(reports):
    return {s["module"]: s for r in reports for s in r["sites"] if s["op"] in ("linear", "addmm")}


def _assert_trains(losses):
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.1, losses


def test_llama(tmp_path, monkeypatch):
    monkeypatch.setenv("FP4COMPILE_DUMP_DIR", str(tmp_path))
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config)
    losses, reports = _train(model, config.vocab_size, tmp_path)
    _assert_trains(losses)
    sites = _module_sites(reports)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears <= set(sites), linears - set(sites)
    for name in linears:
        if name == "lm_head":  # untied: an output head because its logits feed cross_entropy
            assert sites[name]["status"] == "skipped" and "output head (its output feeds cross_entropy)" in sites[name]["reason"]
        else:
            assert sites[name]["status"] == "fp4", sites[name]


def test_gpt2_conv1d(tmp_path, monkeypatch):
    monkeypatch.setenv("FP4COMPILE_DUMP_DIR", str(tmp_path))
    config = transformers.GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(config)
    losses, reports = _train(model, config.vocab_size, tmp_path)
    _assert_trains(losses)
    sites = _module_sites(reports)
    conv1d = {n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    assert conv1d and conv1d <= set(sites), conv1d - set(sites)
    assert all(sites[n]["status"] == "fp4" and sites[n]["op"] == "addmm" for n in conv1d)
    # GPT-2 ties lm_head to the embedding: an output head, kept in high precision by default.
    assert sites["lm_head"]["status"] == "skipped" and "weight tied to the input embedding transformer.wte.weight" in sites["lm_head"]["reason"]


def test_hf_trainer(tmp_path, monkeypatch):
    """The HF Trainer route of usage.md: model.compile(backend="fp4") before the Trainer is built (the
    Trainer's torch_compile_backend goes through accelerate, which takes only its own backend names)."""
    pytest.importorskip("accelerate")
    dumps = tmp_path / "dumps"
    monkeypatch.setenv("FP4COMPILE_DUMP_DIR", str(dumps))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config)
    model.compile(backend="fp4")
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (8, 16))]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
        save_strategy="no", report_to=[], use_cpu=True, logging_steps=1, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    sites = _module_sites([json.loads(p.read_text()) for p in sorted(dumps.glob("*/report.json"))])
    assert sites["model.layers.0.mlp.up_proj"]["status"] == "fp4"
    assert sites["lm_head"]["status"] == "skipped"
