"""The training example runs end to end on a CPU and its plot script reads what it wrote."""

import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import plot_runs  # noqa: E402
import train_lm  # noqa: E402


def test_train_lm_smoke_and_plot(tmp_path):
    data = Path(train_lm.__file__).resolve().parents[1] / "fp4compile"
    record = train_lm.main(["--preset", "smoke", "--recipe", "paper", "--tokens", "3072", "--eval-iters", "2",
                            "--data", str(data), "--results", str(tmp_path)])
    log = tmp_path / "smoke-paper-seed0.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["kind"] for r in records][0] == "header" and records[-1]["kind"] == "final"
    assert records[0]["steps"] == 6 and records[0]["corpus_tokens"]["val"] > 0
    steps = [r for r in records if r["kind"] == "step"]
    assert steps[-1]["loss"] < steps[0]["loss"] and record["val_loss"] == records[-1]["val_loss"]
    plot_runs.main([str(log), "--out", str(tmp_path / "loss.png")])
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert "| paper |" in plot_runs.table([plot_runs.read_run(log)])


def test_unknown_recipe_is_refused():
    with pytest.raises(SystemExit):
        train_lm.main(["--recipe", "fp5"])
