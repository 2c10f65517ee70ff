"""The trainer step benchmark (benchmarks/step.py) end to end through ``vold bench step``, at its smallest:
tiny models, 1 prompt x 2 completions of <= 4 tokens, 1 warm-up + 2 measured steps per estimator, with
two minibatches and a reference KL so that every phase runs. Nothing here asserts on timing: only that
the outputs exist, every phase is reported with a non-negative time, and the phases fit in the step.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import step as bs
from vold.cli import main
from vold.rl import PHASES

SLACK_S = 1e-3  # float rounding of the logged times


def test_step_benchmark_smallest(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "results"
    argv = ["bench", "step", "--steps", "2", "--warmup", "1", "--threads", "1", "--output", str(out),
            "--workdir", str(tmp_path / "work"), "--tag", "test", "--max-foreign-cpu", "-1",
            "data.batch_size=1", "rollout.num_generations=2",
            "rollout.max_new_tokens=4", "optim.minibatches=2", "loss.ref_kl_coef=0.01"]
    assert main(argv) == 0
    assert torch.get_num_threads() == threads  # --threads is undone afterwards
    json_path, md_path = out / "step_test.json", out / "step_test.md"
    assert json_path.is_file() and md_path.is_file()
    result = json.loads(json_path.read_text())
    assert result["machine"]["torch"] == torch.__version__ and result["machine"]["cpu_count"]
    assert result["steps"] == 2 and result["warmup"] == 1
    assert [row["estimator"] for row in result["rows"]] == ["full", "k2"]
    table = md_path.read_text()
    assert "| estimator | phase | s / step | share of step | tokens/s |" in table
    assert table in capsys.readouterr().out  # the table is printed too
    for row in result["rows"]:
        assert row["config"]["loss"]["distill_estimator"] == row["estimator"]
        assert row["config"]["optim"]["max_steps"] == 3
        assert set(row["phases"]) == {*PHASES, bs.OTHER}
        for name, phase in row["phases"].items():
            assert phase["active"], name  # every phase runs in this setting
            assert phase["seconds"] >= 0.0 and phase["share"] >= 0.0, name
            assert f"| {row['estimator']} | {phase['label']} |" in table
        for name in ("gen", "teacher", "old_log_prob", "ref", "update_actor"):
            assert row["phases"][name]["tokens_per_s"] is None or row["phases"][name]["tokens_per_s"] > 0
        assert row["step_seconds"] > 0 and row["generated_tokens_per_step"] > 0
        total = sum(p["seconds"] for name, p in row["phases"].items() if name != bs.OTHER)
        assert total <= row["step_seconds"] + SLACK_S
        assert len(row["steps"]) == 3 and [s["warmup"] for s in row["steps"]] == [True, False, False]
        for record in row["steps"]:  # each step: the phases are disjoint parts of it
            phases = [record[f"time/{name}"] for name in PHASES]
            assert min(phases) >= 0.0 and sum(phases) <= record["time/step"] + SLACK_S


def test_step_benchmark_arguments():
    args = bs.parse_args(["--steps", "3", "loss.distill_coef=0.2", "--estimators", "k2"])
    assert args.tiny and args.steps == 3 and args.estimators == ["k2"] and args.overrides == ["loss.distill_coef=0.2"]
    assert args.threads == 1  # tiny models: one thread unless told otherwise
    own = bs.parse_args(["--config", "x.yaml"])
    assert not own.tiny and own.threads is None  # a config of one's own: its own model paths, torch's threads
    with pytest.raises(SystemExit):
        bs.parse_args(["--estimators", "k9"])
