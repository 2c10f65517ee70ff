"""``vold demo``: the toy task, and ``vold demo --quick`` end to end through the CLI (teacher, perception
student, traces, SFT, the five RL arms and SOPHIA, evals, table, figures), then a second run that takes both models
from the cache. The numbers are only checked for sanity (accuracies in [0, 1], a teacher clearly above
the majority answer), never for a ranking of the arms."""

import json
import math

import numpy as np
import pytest

from vold.cli import main
from vold.demo.config import PERCEPTION_KEYS, TEACHER_KEYS, cache_key, make_config
from vold.demo.pipeline import ARMS, TRAINED_ARMS
from vold.demo.task import Problem, all_problems, render, split_problems
from vold.rewards import accuracy_reward
from vold.runs import distill_metric

pytestmark = pytest.mark.usefixtures("one_thread")


def test_task_solutions_renders_and_splits():
    problems = all_problems()
    assert len(problems) == 5647 and len(set(problems)) == len(problems)
    p = Problem(3, "+", 4, "*", 2)
    assert p.answer == 11 and p.solution() == "3+4*2\n4*2=8\n3+8=11\n\\boxed{11}" and p.direct() == "3+4*2=\\boxed{11}"
    assert Problem(9, "-", 2, "-", 3).solution() == "9-2-3\n9-2=7\n7-3=4\n\\boxed{4}"
    for q in problems:  # Python's precedence; no negative intermediate result; at most one product
        assert q.answer == eval(q.text) and all(r >= 0 for *_, r in q.steps()) and q.text.count("*") <= 1
    sample = problems[::113]  # the reward (math-verify) reads the solution's answer, and not the direct one's wrong
    assert accuracy_reward([q.solution() for q in sample], [str(q.answer) for q in sample]) == [1.0] * len(sample)
    assert accuracy_reward([q.direct() for q in sample], [str(q.answer + 1) for q in sample]) == [0.0] * len(sample)
    image = render(p.text)
    assert image.size == (140, 28) and image.mode == "RGB"
    ink = (np.asarray(image) < 128).any(axis=-1)
    assert 0 < ink.mean() < 0.5 and ink[:, :28].any() and not ink[:, 28 * 5:].any()  # ink on white, 5 cells
    sets = split_problems(0, eval=100, perception=200, train=300, teacher=1000)
    assert set(sets["eval"]).isdisjoint(set().union(*(sets[k] for k in ("perception", "train", "teacher"))))
    assert set(sets["perception"]).isdisjoint(sets["train"]) and len(sets["teacher"]) == 1000
    assert split_problems(0, eval=100, perception=200, train=300, teacher=1000) == sets


def test_config_overrides_and_cache_keys():
    quick = make_config(True, ["rl_steps=7", "rl_lr=3e-4"], seeds=2)
    assert (quick.rl_steps, quick.rl_lr, quick.seeds) == (7, 3e-4, 2)
    full = make_config(False)
    assert full.seeds == 3 and full.distill_coef == 0.1 and full.num_generations == 5
    with pytest.raises(ValueError, match="unknown demo setting 'rl_step'"):
        make_config(False, ["rl_step=3"])
    # RL settings do not touch the cached models; the teacher's do
    assert cache_key(full, TEACHER_KEYS, "teacher") == cache_key(make_config(False, ["rl_steps=1"]), TEACHER_KEYS,
                                                                 "teacher")
    assert cache_key(full, TEACHER_KEYS, "teacher") != cache_key(make_config(False, ["teacher_steps=1"]),
                                                                 TEACHER_KEYS, "teacher")
    assert cache_key(full, PERCEPTION_KEYS, "perception") == cache_key(make_config(False, ["teacher_steps=1"]),
                                                                       PERCEPTION_KEYS, "perception")


@pytest.mark.slow
def test_demo_quick_end_to_end_then_cached(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # the figures
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out), "--jobs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| (e) VOLD: SFT + GRPO + distillation (full KL) |" in printed

    results = json.loads((out / "results.json").read_text())
    for key in (arm.key for arm in ARMS):
        for bench in ("image", "text"):
            values = results["arms"][key][bench]
            assert len(values) == 1 and all(0.0 <= v <= 1.0 for v in values), (key, bench, values)
    teacher = results["teacher_text"][0]
    assert teacher > max(0.2, 2 * results["majority_answer"]), teacher  # it learnt the task, well above chance
    assert not results["cached_models"]["teacher"]["cache_hit"]

    # the files a person looks at, and every stage's own run folder
    assert (out / "results.md").read_text().count("| (") == len(ARMS)
    for name in ("figure.png", "plots/accuracy.png", "plots/reward_vs_step.png", "plots/accuracy_vs_step.png",
                 "plots/distill_kl_vs_step.png"):
        assert (out / name).stat().st_size > 10_000, name
    assert (out / "demo.yaml").is_file() and (out / "log.txt").read_text().count("done") > 10
    seed = out / "seed_0"
    assert (seed / "traces" / "traces.jsonl").is_file() and (seed / "sft" / "final" / "config.json").is_file()
    for arm in TRAINED_ARMS:
        run = seed / arm.key / arm.run
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == results["config"]["sophia_steps" if arm.trainer == "sophia" else "rl_steps"]
        if arm.trainer == "rl":
            assert all(0.0 <= m["reward/mean"] <= 1.0 for m in metrics)
            assert all(("train/ref_kl" in m) == arm.images for m in metrics), arm.key  # (f): the k3 reference KL
        else:  # SOPHIA: captions rewarded by the teacher's traces, kept items counted
            assert all(0.0 <= m["caption/reward_mean"] <= 1.0 and 0 <= m["sophia/kept"] <= m["sophia/items"]
                       for m in metrics)
        if arm.estimator:
            distill = distill_metric(arm.estimator)  # distill/k2 or distill/reverse_kl (full): named apart
            assert all(math.isfinite(m[distill]) and m[distill] >= 0 for m in metrics)
        assert (run / "config.yaml").is_file() and (seed / arm.key / "eval" / "summary.json").is_file()
    train_images = [json.loads(line) for line in (out / "data" / "train_image.jsonl").read_text().splitlines()]
    assert all("image" in row and row["prompt"] == "\nSolve." for row in train_images)
    perception = [json.loads(line) for line in (out / "data" / "perception.jsonl").read_text().splitlines()]
    assert any(row["prompt"] == "\nRead." and row["response"] == row["teacher_prompt"].split("\n")[0]
               for row in perception)  # the read prompt: image -> the problem's characters
    image_rows = [json.loads(line) for line in (out / "data" / "image.jsonl").read_text().splitlines()]
    assert all("image" in row and row["teacher_prompt"].endswith("Solve.") for row in image_rows)

    # a second run reuses both cached models (and so is much shorter)
    assert main(["demo", "--quick", "--output", str(out), "--jobs", "1"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert all(model["cache_hit"] for model in again["cached_models"].values())
    assert set(again["cached_models"]) == {"teacher", "seed_0/perception"}
    assert "teacher" not in again["seconds"] and "seed_0/perception" not in again["seconds"]
    assert again["teacher_text"] == results["teacher_text"]  # same model, same eval seed
