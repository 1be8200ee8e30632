"""The training example runs end to end on a CPU and its plot script reads what it wrote; the benchmark
that runs on a CPU (bench_saved.py) does too."""

import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import plot_runs  # noqa: E402
import train_lm  # noqa: E402


@pytest.mark.parametrize("recipe", ["bf16", "paper"])
def test_train_lm_smoke_and_plot(tmp_path, recipe):
    data = Path(train_lm.__file__).resolve().parents[1] / "fp4compile"
    record = train_lm.main(["--preset", "smoke", "--recipe", recipe, "--tokens", "3072", "--eval-iters", "2",
                            "--data", str(data), "--results", str(tmp_path)])
    log = tmp_path / f"smoke-{recipe}-seed0.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["kind"] for r in records][0] == "header" and records[-1]["kind"] == "final"
    assert records[0]["steps"] == 6 and records[0]["corpus_tokens"]["val"] > 0
    steps = [r for r in records if r["kind"] == "step"]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["val_loss"]) for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"] and record["val_loss"] == records[-1]["val_loss"]
    plot_runs.main([str(log), "--out", str(tmp_path / "loss.png")])
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert f"| {recipe} | 0 |" in plot_runs.table([plot_runs.read_run(log)])


def test_data_split_is_deterministic_and_disjoint(tmp_path):
    """Files go whole to one side, by a hash of their name: the same split every time, no file in both."""
    for i in range(200):
        (tmp_path / f"f{i}.txt").write_bytes(f"<{i}>".encode())
    train, val = train_lm.load_corpus(str(tmp_path), val_percent=20)
    again = train_lm.load_corpus(str(tmp_path), val_percent=20)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    pieces = [set(bytes(t.tolist()).decode().split()) for t in (train, val)]
    assert pieces[0].isdisjoint(pieces[1]) and len(pieces[0]) + len(pieces[1]) == 200
    assert 10 < len(pieces[1]) < 70


def test_unknown_recipe_is_refused():
    with pytest.raises(SystemExit):
        train_lm.main(["--recipe", "fp5"])


@pytest.mark.parametrize("extra", [["--fp8-comm", "--optim", "fp8adamw"], ["--fsdp", "--fp8-comm"]],
                         ids=["ddp_fp8", "fsdp2_fp8"])
def test_train_lm_under_torchrun(tmp_path, extra):
    """Two gloo processes through torchrun: DDP with the FP8 all-reduce hook and FP8 AdamW, and FSDP2 with
    the FP8 reduce-scatter."""
    import subprocess

    data = Path(train_lm.__file__).resolve().parents[1] / "fp4compile"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(EXAMPLES / "train_lm.py"),
           "--preset", "smoke", "--recipe", "paper", "--tokens", "8192", "--eval-iters", "1", "--data", str(data),
           "--results", str(tmp_path), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "smoke-paper-seed0.jsonl").read_text().splitlines()]
    assert records[0]["world"] == 2 and records[0]["tokens"] == 8192
    steps = [r for r in records if r["kind"] == "step"]
    assert all(math.isfinite(r["loss"]) for r in steps) and steps[-1]["loss"] < steps[0]["loss"]


def test_bench_saved_fp4_saves_less_than_bf16(tmp_path, monkeypatch):
    # At bench_llama.py's 8 tokens per hidden unit, FP4's 1-byte activations must undercut BF16's even
    # with the logits' FP32 tensors dominating at this size (1.00x when sites re-quantized shared inputs).
    # The script runs in this process, so it compiles as the suite does (conftest.py).
    script = EXAMPLES.parent / "benchmarks" / "bench_saved.py"
    out = tmp_path / "saved.json"
    monkeypatch.syspath_prepend(str(script.parent))
    monkeypatch.setattr(sys, "argv", [str(script), "--variants", "bf16_inductor,fp4_occ_off", "--hidden", "64",
                                      "--intermediate", "176", "--layers", "1", "--heads", "2", "--batch", "2",
                                      "--seq", "256", "--device", "cpu", "--out", str(out)])
    runpy.run_path(str(script), run_name="__main__")
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["fp4_occ_off"]["float8_e4m3fn MiB"] > 0
    assert rows["fp4_occ_off"]["saved MiB"] < 0.98 * rows["bf16_inductor"]["saved MiB"]


def test_gemm_error_ranks_the_recipes(tmp_path):
    # The table docs/usage.md quotes, at a small shape: rotation and OCC both cut direct casting's error
    # on outlier channels, OCC's exact compensation further.
    root = EXAMPLES.parent
    out = tmp_path / "gemm_error.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "gemm_error.py"), "--shape", "256", "1024", "128",
                    "--out", str(out)], check=True, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True)
    rows = {r["activation"]: r for r in json.loads(out.read_text())["results"]}
    channels = rows["channels"]
    assert channels["paper"] < channels["rotated"] < channels["direct_cast"] / 2, channels
    assert all(0 < r["bf16"] < 0.01 for r in rows.values()), rows


def test_blocks_at_peak_replays_a_memory_trace():
    # bench_*.py --peak-trace: which blocks are live when the traced ones peak, and where each came from.
    sys.path.insert(0, str(EXAMPLES.parent / "benchmarks"))
    from common import blocks_at_peak

    mib = 2**20
    generated = [{"filename": "/tmp/torchinductor_u/ab/cab.py", "line": 1, "name": "call"}]
    model = [{"filename": "/x/model.py", "line": 3, "name": "forward"}]
    events = [
        {"action": "free_completed", "addr": 9, "size": 8 * mib},  # allocated before the trace: ignored
        {"action": "alloc", "addr": 1, "size": 1 * mib, "frames": generated},
        {"action": "alloc", "addr": 2, "size": 3 * mib, "frames": model},
        {"action": "free_requested", "addr": 1, "size": 1 * mib},
        {"action": "free_completed", "addr": 1, "size": 1 * mib},
        {"action": "alloc", "addr": 3, "size": 2 * mib, "frames": generated},
        {"action": "free_completed", "addr": 2, "size": 3 * mib},
        {"action": "alloc", "addr": 4, "size": 1 * mib, "frames": model},
    ]
    peak = blocks_at_peak(events)
    assert (peak["peak_mib"], peak["blocks"]) == (5, 2)
    assert [(b["MiB"], b["allocated at"]) for b in peak["top"]] == [(3, "model.py:3"), (2, "cab.py:1")]
