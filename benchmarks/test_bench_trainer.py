"""The training-step benchmark (benchmarks/trainer.py) at tiny shapes.

What is asserted is what makes the rows comparable, never timing: on the same models and rollouts,
vold train's update, VoldGRPOTrainer and TRL's GRPOTrainer + chunked reverse KL compute the same loss
(GRPO + 0.1 x reverse KL) and, after one optimizer step each, the same loss again (so their updates
agree too); TRL's DistillationTrainer computes the KL term alone. The end-to-end run checks the outputs,
the memory cap (an over-cap point fails alone, as "oom", and the system is skipped at longer lengths).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from benchmarks import trainer as bt


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads (and the machine is shared); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = bt.Settings(**bt.QUICK)


def two_steps(system: str, s: bt.Settings, length: int) -> list[float]:
    with tempfile.TemporaryDirectory() as work:
        step, info = bt.build_step(system, s, length, Path(work))
        assert info["student_params"] == info["teacher_params"] > 0
        return [step(), step()]


def test_the_systems_compute_the_same_objective() -> None:
    length = 16
    losses = {system: two_steps(system, TINY, length) for system in bt.SYSTEMS}
    vold = losses["vold_train"]
    assert all(abs(x) > 1e-3 for x in vold)
    for system in ("vold_trl", "trl_grpo"):
        for got, want in zip(losses[system], vold, strict=True):
            assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (system, losses)
    # on-policy (ratio 1) with equal lengths, GRPO's dapo term is -mean(A): the rest is 0.1 x KL, which is
    # what the DistillationTrainer row computes alone (first step: same weights)
    mean_advantage = float(bt.make_rollouts(TINY, length)["advantages"].mean())
    kl = (vold[0] + mean_advantage) / TINY.distill_coef
    assert kl > 0 and abs(losses["trl_distill"][0] - kl) <= 1e-4 * kl, (losses, kl)


def test_the_systems_agree_on_ragged_completions(monkeypatch) -> None:
    """The same with completions of different lengths (the benchmark's own are all full): the rows' token
    normalisation (dapo: the batch's unmasked tokens) and the KL's mask agree where equal lengths cannot tell."""
    make = bt.make_rollouts

    def ragged(s: bt.Settings, length: int) -> dict[str, torch.Tensor]:
        batch = make(s, length)
        batch["completion_mask"][0, length // 4:] = 0  # row 0 ended early (right padding after it)
        return batch

    monkeypatch.setattr(bt, "make_rollouts", ragged)
    s = bt.Settings(**{**bt.QUICK, "batch": 3})
    losses = {system: two_steps(system, s, 16) for system in ("vold_train", "vold_trl", "trl_grpo")}
    vold = losses["vold_train"]
    for system in ("vold_trl", "trl_grpo"):
        for got, want in zip(losses[system], vold, strict=True):
            assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (system, losses)
    # and the ragged mask matters: the full-mask batch gives another loss
    monkeypatch.setattr(bt, "make_rollouts", make)
    assert abs(two_steps("vold_train", s, 16)[0] - vold[0]) > 1e-4


def test_k2_rows_agree() -> None:
    s = bt.Settings(**{**bt.QUICK, "estimator": "k2"})
    a, b = two_steps("vold_train", s, 16), two_steps("vold_trl", s, 16)
    for got, want in zip(b, a, strict=True):
        assert abs(got - want) <= 1e-5 * max(1.0, abs(want))


def test_arguments() -> None:
    s = bt.settings_from_args(bt.parse_args(["--quick", "--lengths", "8,4", "--mem-cap-gb", "2"]))
    assert s.lengths == (8, 4) and s.vocab == 4096 and s.mem_cap_bytes == 2 * bt.GIB
    full = bt.settings_from_args(bt.parse_args([]))
    assert full.vocab == bt.QWEN25_VOCAB and full.lengths == bt.DEFAULT_LENGTHS and full.mem_cap_bytes == 8 * bt.GIB
    k2 = bt.settings_from_args(bt.parse_args(["--estimator", "k2"]))
    assert k2.systems == ("vold_train", "vold_trl")  # TRL's rows have no k2 path
    for argv in (["--lengths", "0"], ["--systems", "vold,trl"], ["--estimator", "k9"],
                 ["--lengths", "16,32,16"], ["--systems", "vold_train,vold_train"]):  # a repeat ran twice
        with pytest.raises(SystemExit):
            bt.parse_args(argv)
    with pytest.raises(SystemExit, match="--hidden"):
        bt.settings_from_args(bt.parse_args(["--hidden", "30"]))
    with pytest.raises(SystemExit, match="--estimator k2"):
        bt.settings_from_args(bt.parse_args(["--estimator", "k2", "--systems", "trl_grpo"]))
    with pytest.raises(ValueError, match="estimator"):
        bt.build_step("trl_distill", bt.Settings(**{**bt.QUICK, "estimator": "k2"}), 8, Path("."))


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path: Path) -> None:
    result = bt.main(["--quick", "--lengths", "16", "--threads", "1", "--output", str(tmp_path)])
    saved = json.loads((tmp_path / "trainer_quick.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert (tmp_path / "trainer_quick.md").read_text().startswith("# Training-step benchmark (quick)")
    assert (tmp_path / "trainer_quick.png").stat().st_size > 0
    rows = {r["system"]: r for r in saved["rows"]}
    assert set(rows) == set(bt.SYSTEMS)
    for row in rows.values():
        assert row["status"] == "ok" and row["fits"] and row["time_s"] > 0, row
        assert 0 < row["peak_extra_bytes"] <= row["peak_bytes"] < bt.QUICK["mem_cap_bytes"]
        assert row["address_space_limit_bytes"] > bt.QUICK["mem_cap_bytes"]
    assert rows["trl_grpo"]["losses"][0] == pytest.approx(rows["vold_train"]["losses"][0], rel=1e-5)
    assert saved["longest_fit"] == {system: 16 for system in bt.SYSTEMS}


@pytest.mark.slow
def test_a_point_over_the_cap_fails_alone() -> None:
    # Qwen2.5's vocabulary at H=256: two models (~0.6 GiB) + AdamW state + gradients, over a 1 GiB cap
    s = bt.Settings(**{**bt.QUICK, "vocab": bt.QWEN25_VOCAB, "hidden": 256, "lengths": (8, 16),
                       "systems": ("vold_train",), "mem_cap_bytes": bt.GIB, "threads": 1})
    rows = bt.sweep(s)
    assert rows[0]["status"] == "over cap" and not rows[0]["fits"], rows[0]
    assert bt.GIB < rows[0]["rss_at_stop_bytes"] < 2 * bt.GIB
    assert rows[1]["status"] == "skipped (failed at T=8)" and not rows[1]["fits"]
    assert bt.longest_fit(rows, "vold_train") is None


def test_point_budget_stops_a_slow_system_and_partial_results_are_written(monkeypatch, tmp_path: Path) -> None:
    # run_point stubbed out: trl_grpo's point at T=32 "takes" 100 s, so it is not run at T=64; every
    # other point is instant. The results file exists after every point, marked partial until the end.
    clock = {"now": 0.0}
    seen: list[bool] = []

    def fake_run_point(system: str, length: int, s: bt.Settings) -> dict:
        clock["now"] += 100.0 if (system, length) == ("trl_grpo", 32) else 1.0
        if (tmp_path / "trainer_t.json").exists():
            seen.append(json.loads((tmp_path / "trainer_t.json").read_text())["complete"])
        return {"status": "ok", "time_s": 0.5, "peak_bytes": bt.GIB, "losses": [1.0]}

    monkeypatch.setattr(bt, "run_point", fake_run_point)
    monkeypatch.setattr(bt.time, "perf_counter", lambda: clock["now"])
    result = bt.main(["--quick", "--lengths", "16,32,64", "--systems", "vold_train,trl_grpo", "--point-budget-s",
                      "50", "--output", str(tmp_path), "--tag", "t", "--no-plot"])
    status = {(r["system"], r["length"]): r["status"] for r in result["rows"]}
    assert status[("trl_grpo", 32)] == "ok"
    assert status[("trl_grpo", 64)] == "skipped (not run: T=32 took 100 s > --point-budget-s 50)"
    assert status[("vold_train", 64)] == "ok"
    assert seen and not any(seen)  # partial files while running
    saved = json.loads((tmp_path / "trainer_t.json").read_text())
    assert saved["complete"] is True and len(saved["rows"]) == 6
    text = (tmp_path / "trainer_t.md").read_text()
    assert ">= 32 (longer not run)" in text and "Partial" not in text
    with pytest.raises(SystemExit, match="--batch must be >= 2 with vold_trl,trl_grpo"):
        bt.settings_from_args(bt.parse_args(["--batch", "1"]))
    assert bt.settings_from_args(bt.parse_args(["--batch", "1", "--systems", "vold_train,trl_distill"])).batch == 1
    with pytest.raises(SystemExit, match="--point-budget-s"):
        bt.settings_from_args(bt.parse_args(["--point-budget-s", "0"]))
    # nan / inf / negative were accepted (nan ran the sweep with no budget and wrote NaN into the JSON;
    # --mem-cap-gb nan / inf ended in a ValueError / OverflowError traceback; --threads 0 was silently torch's)
    for flag, value in (("--point-budget-s", "nan"), ("--point-budget-s", "-3"), ("--point-budget-s", "inf"),
                        ("--mem-cap-gb", "nan"), ("--mem-cap-gb", "inf"), ("--child-timeout", "0"),
                        ("--child-timeout", "nan"), ("--threads", "0")):
        with pytest.raises(SystemExit, match=flag):
            bt.settings_from_args(bt.parse_args([flag, value]))
