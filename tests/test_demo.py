"""``vold demo``: the toy task, and ``vold demo --quick`` end to end through the CLI (teacher, perception
student, traces, SFT, the five RL arms and SOPHIA, evals, table, figures), then a second run that takes both models
from the cache. The numbers are only checked for sanity (accuracies in [0, 1], a teacher clearly above
the majority answer), never for a ranking of the arms."""

import json
import math

import numpy as np
import pytest

from vold.cli import main
from vold.demo.arms import ARMS, TRAINED_ARMS
from vold.demo.config import LM_KEYS, PERCEPTION_KEYS, TEACHER_KEYS, cache_key, make_config
from vold.demo.models import align_vision, save_student
from vold.demo.report import premises, premises_markdown
from vold.demo.task import Problem, all_problems, fact_rows, render, split_problems
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
    facts = fact_rows()  # the student LM's pre-training: every operation that is a step of some problem, answered
    lines = [line for row in facts for line in row["response"].split("\n")]
    assert len(facts) == 1125 and len(lines) == 5 * 1125 and {"4*2=8", "81+9=90"} <= set(lines)
    assert all(eval(line.replace("=", "==")) for line in lines) and len(set(lines)) == 1125
    assert all(q.solution().count("\n") == 3 for q in problems[:5])
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
    # the text pre-trained student LM is shared by the seeds; its settings change the perception students too
    more_lm = make_config(False, ["lm_steps=1"])
    assert cache_key(full, LM_KEYS, "lm") != cache_key(more_lm, LM_KEYS, "lm")
    assert cache_key(full, PERCEPTION_KEYS, "perception") != cache_key(more_lm, PERCEPTION_KEYS, "perception")
    assert cache_key(full, LM_KEYS, "lm") == cache_key(make_config(False, ["perception_steps=1"]), LM_KEYS, "lm")
    assert make_config(False, ["arms=c_sft_grpo,e_vold_k2"]).arms == ["c_sft_grpo", "e_vold_k2"]
    with pytest.raises(ValueError, match="unknown arms"):
        make_config(False, ["arms=c_sft"])
    with pytest.raises(ValueError, match="rl_problems must be in"):
        make_config(False, ["rl_problems=2001"])


def test_premises_from_run_numbers():
    """P1-P4 from the arms' numbers and the training curves: values, thresholds, and where they hold."""
    arm = lambda text, reads: {"text": text, "reads_image": reads}  # noqa: E731
    run = lambda reward, kl: {"reward": reward, "distill_kl": kl}  # noqa: E731
    data = {"arms": {"a_base": arm([0.2, 0.3], [1.0, 0.96]), "b_sft": arm([0.5, 0.4], [0.9, 0.88])},
            "curves": {"c_sft_grpo": [run([0.25] * 20 + [0.5] * 20, []), run([0.5] * 40, [])],
                       "e_vold_k2": [run([], [2.0] * 20 + [1.0] * 20)] * 2,
                       "e_vold_full": [run([], [1.0] * 20 + [0.95] * 20)] * 2}}
    found = premises(data)
    assert found["P1"]["value"] == pytest.approx(0.98) and found["P1"]["holds"]
    assert found["P2"]["value"] == pytest.approx(0.89) and not found["P2"]["holds"]
    assert found["P3"]["value"] == pytest.approx(0.2) and found["P3"]["holds"]
    p4 = found["P4"]
    assert p4["value"] == pytest.approx(0.125) and p4["reward_rise_per_seed"] == pytest.approx([0.25, 0.0])
    assert p4["distill"]["e_vold_k2"]["value"] == pytest.approx(0.5) and p4["distill"]["e_vold_k2"]["holds"]
    assert not p4["distill"]["e_vold_full"]["holds"] and not p4["holds"]  # the reward rose, the full D_t did not fall
    data["curves"]["e_vold_full"] = data["curves"]["e_vold_k2"]
    assert premises(data)["P4"]["holds"]
    data["curves"] = {}  # arms that did not run: no value, not held
    assert premises(data)["P4"] == {**premises(data)["P4"], "value": None, "holds": False}
    assert "| P2 |" in premises_markdown(found) and "| 89.0 | ≥ 90 | no |" in premises_markdown(found)


def test_align_vision_maps_glyphs_to_embeddings(tmp_path):
    """The vision tower + projector learn to emit each character's input embedding; the language model is kept."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = save_student(tmp_path / "init", hidden_size=32, layers=1, vision_hidden=16, vision_depth=1)
    stats = align_vision(path, tmp_path / "aligned", steps=30, lr=3e-3, batch=4)
    assert stats["loss_last"] < 0.5 * stats["loss_first"]
    before = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    after = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "aligned")
    assert torch.equal(before.model.language_model.embed_tokens.weight, after.model.language_model.embed_tokens.weight)
    assert not torch.equal(before.model.visual.merger.mlp[0].weight, after.model.visual.merger.mlp[0].weight)


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

    # the premises, computed from the run: the table's numbers, compared with their thresholds
    premises = results["premises"]
    assert list(premises) == ["P1", "P2", "P3", "P4"]
    arms = results["arms"]
    assert premises["P1"]["value"] == pytest.approx(arms["a_base"]["reads_image"][0])
    assert premises["P2"]["value"] == pytest.approx(arms["b_sft"]["reads_image"][0])
    assert premises["P3"]["value"] == pytest.approx(arms["b_sft"]["text"][0] - arms["a_base"]["text"][0])
    assert set(premises["P4"]["distill"]) == {"e_vold_k2", "e_vold_full"}
    for key, threshold in (("P1", 0.95), ("P2", 0.90), ("P3", 0.0), ("P4", 0.05)):
        p = premises[key]
        assert p["threshold"] == threshold and isinstance(p["holds"], bool), (key, p)
        assert p["holds"] == (p["value"] > threshold if key == "P3" else p["value"] >= threshold) or key == "P4"
    assert "| P4 |" in (out / "results.md").read_text()
    # the student's vision was aligned to its text embeddings before its perception stage
    align = json.loads(next((out / "cache").glob("perception-*/align.json")).read_text())
    assert align["loss_last"] < align["loss_first"]

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
    train_images = [json.loads(line) for line in (out / "data" / "rl_image.jsonl").read_text().splitlines()]
    assert len(train_images) == results["config"]["rl_problems"]
    assert all("image" in row and row["prompt"] == "Solve." for row in train_images)
    perception = [json.loads(line) for line in (out / "data" / "perception.jsonl").read_text().splitlines()]
    assert any(row["prompt"] == "Read." and row["response"] == row["teacher_prompt"].split("\n")[0]
               for row in perception)  # the read prompt: image -> the problem's characters
    image_rows = [json.loads(line) for line in (out / "data" / "image.jsonl").read_text().splitlines()]
    assert all("image" in row and row["teacher_prompt"].endswith("Solve.") for row in image_rows)

    # a second run reuses both cached models (and so is much shorter)
    assert main(["demo", "--quick", "--output", str(out), "--jobs", "1"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert all(model["cache_hit"] for model in again["cached_models"].values())
    assert set(again["cached_models"]) == {"teacher", "lm", "seed_0/perception"}
    assert not {"teacher", "lm", "seed_0/perception"} & set(again["seconds"])
    assert again["teacher_text"] == results["teacher_text"]  # same model, same eval seed


def test_demo_help_states_the_real_defaults(monkeypatch):
    """`vold demo --help` said '--jobs ... (default 1)' while the default is one worker per CPU core (at most 4),
    and its description named arms (a)-(e) of the seven (found by the new-user pass)."""
    import argparse
    import os

    from vold.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["demo"]
    helps = {a.dest: a.help for a in sub._actions}
    for cores, jobs in ((1, 1), (2, 2), (16, 4)):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        dc = make_config(False, [], seeds=None, jobs=None, threads=None)
        assert (dc.jobs, dc.threads, dc.seeds) == (jobs, 1, 3)
    assert "default: one per CPU core, at most 4" in helps["jobs"]
    assert "default 1" in helps["threads"] and "default: 3" in helps["seeds"]
    assert f"(a)-({ARMS[-1].key[0]})" in sub.description  # the last arm's letter
