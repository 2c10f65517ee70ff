"""The stages end to end through the CLI entry (``vold.cli.main``, in-process) on tiny models:
make-traces -> sft -> train (k2 and full) -> eval, the SFT loss going down on a toy task, and the
traces' filters and determinism. Models and data come from ``vold.testing.prepare_tiny_run``, the
config from ``configs/tiny_cpu.yaml`` with its paths overridden (``vold.testing.tiny_overrides``).
"""

import json
import math
from pathlib import Path

import pytest

from vold.cli import main
from vold.config import load_config
from vold.evaluate import model_folder_name
from vold.runs import read_jsonl
from vold.testing import tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml")
# a reward that varies within a group for random tiny models, so advantages are not all zero
REWARDS = "reward.functions=[accuracy, vold.testing:digit_reward]"


def run(command: str, tiny: dict, out: Path, *overrides: str) -> int:
    return main([command, "--config", CONFIG, *tiny_overrides(tiny, out), *overrides])


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_pipeline_make_traces_sft_train_eval(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    # stage 0: the teacher's traces (no correctness filter: random weights are never right)
    assert run("make-traces", tiny, out) == 0
    traces = read_jsonl(out / "traces" / "traces.jsonl")
    stats = json.loads((out / "traces" / "stats.json").read_text())
    assert stats["prompts"] == 8 and stats["generated"] == 16 and stats["kept"] == len(traces) == 8
    assert all({"prompt", "answer", "trace", "trace_tokens", "correct"} <= row.keys() for row in traces)
    assert all(0 < row["trace_tokens"] <= 16 for row in traces)

    # stage 1: SFT on those traces (sft.train_files defaults to them)
    assert run("sft", tiny, out) == 0
    sft = read_jsonl(out / "sft" / "metrics.jsonl")
    assert [m["step"] for m in sft] == [1, 2, 3, 4]
    assert all(finite(m["train/loss"]) and m["train/tokens"] > 0 for m in sft)
    assert (out / "sft" / "final" / "model.safetensors").is_file()
    assert load_config(out / "sft" / "config.yaml").sft.max_steps == 4  # the resolved config beside the run

    # stage 2, from the SFT model (sft.enabled), with both distillation estimators
    for estimator in ("k2", "full"):
        rl_out = tmp_path / f"rl_{estimator}"
        (rl_out / "sft").parent.mkdir(parents=True, exist_ok=True)
        (rl_out / "sft").symlink_to(out / "sft")
        offload = f"model.teacher_offload={estimator == 'full'}"  # teacher parked on the CPU between phases
        assert run("train", tiny, rl_out, REWARDS, f"loss.distill_estimator={estimator}", offload) == 0
        metrics = read_jsonl(rl_out / "rl" / "metrics.jsonl")
        assert [m["step"] for m in metrics] == [1, 2, 3]
        for m in metrics:
            distill = {"k2": "distill/k2", "full": "distill/reverse_kl"}[estimator]  # says which quantity it is
            for key in ("train/loss", "train/policy_loss", distill, "train/entropy", "train/grad_norm", "reward/mean",
                        "reward/digit_reward", "completion/mean_length", "train/lr"):
                assert finite(m[key]), (estimator, key, m)
            assert m[distill] > 0 and m["distill/weight_mean"] == 1.0  # accuracy is 0: distil everywhere
            assert m["train/ratio"] == pytest.approx(1.0, abs=1e-5)  # one update per batch: on-policy
            assert all("/" in key for key in m if key != "step")  # every metric in a namespace (README, Metrics)
        assert any(m["train/policy_loss"] != 0.0 for m in metrics)  # digit_reward gives non-zero advantages
        samples = read_jsonl(rl_out / "rl" / "samples.jsonl")
        assert len(samples) == 3 * 2 and {"prompt", "completion", "reward", "advantage"} <= samples[0].keys()
        assert sorted(p.name for p in (rl_out / "rl" / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
        assert (rl_out / "rl" / "final" / "model.safetensors").is_file()
        saved = load_config(rl_out / "rl" / "config.yaml")
        assert saved.loss.distill_estimator == estimator and saved.reward.functions[1] == "vold.testing:digit_reward"
    full = read_jsonl(tmp_path / "rl_full" / "rl" / "metrics.jsonl")
    k2 = read_jsonl(tmp_path / "rl_k2" / "rl" / "metrics.jsonl")
    assert full[0]["reward/mean"] == k2[0]["reward/mean"]  # same first rollouts (same seed, same start)
    assert full[0]["distill/reverse_kl"] != k2[0]["distill/k2"]  # exact KL vs its k2 estimate, named apart
    assert "distill/k2" not in full[0] and "distill/reverse_kl" not in k2[0]

    # eval of the trained model
    capsys.readouterr()
    assert run("eval", tiny, out, f"eval.model={tmp_path / 'rl_k2' / 'rl' / 'final'}") == 0
    printed = capsys.readouterr().out
    assert "| benchmark | n | pass@1 (%) | mean@2 (%) | pass@2 (%) |" in printed and "| bench | 4 |" in printed
    evaluated = out / "eval" / model_folder_name(str(tmp_path / "rl_k2" / "rl" / "final"))  # one folder per model
    summary = json.loads((evaluated / "summary.json").read_text())
    assert summary["k"] == 2 and summary["results"]["all"]["n"] == 4
    assert (evaluated / "summary.md").read_text().count("| bench |") == 1
    records = read_jsonl(evaluated / "samples.jsonl")
    assert len(records) == 4 and all(len(r["completions"]) == 2 and r["images"] for r in records)


def test_sft_loss_decreases_on_a_toy_task_and_eval_sees_it(tiny, tmp_path):
    """60 SFT steps on four "... \\boxed{5}" traces: the NLL falls; eval then finds 5 (and only 5)."""
    rows = [{"prompt": f"{a}+{b}=? Answer in \\boxed{{}}.", "answer": "5", "trace": f"{a}+{b}=5. \\boxed{{5}}"}
            for a, b in ((2, 3), (1, 4), (0, 5), (4, 1))]
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = [{"question": "2+3=? Answer in \\boxed{}.", "answer": "5"},
             {"question": "3+3=? Answer in \\boxed{}.", "answer": "6"}]
    (tmp_path / "toybench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bench))
    out = tmp_path / "run"
    assert run("sft", tiny, out, f"sft.train_files=[{tmp_path / 'toy.jsonl'}]", "sft.max_steps=60",
               "sft.lr=1e-2", "sft.batch_size=4", "sft.lr_scheduler=constant", "checkpoint.every=0") == 0
    losses = [m["train/loss"] for m in read_jsonl(out / "sft" / "metrics.jsonl")]
    assert len(losses) == 60 and losses[-1] < 0.15 * losses[0], losses
    assert not (out / "sft" / "checkpoints").exists()  # checkpoint.every=0

    assert run("eval", tiny, out, f"eval.model={out / 'sft' / 'final'}", f"eval.files=[{tmp_path / 'toybench.jsonl'}]",
               "data.prompt_column=question", "eval.temperature=0.3", "eval.num_samples=4",
               "eval.max_new_tokens=24") == 0
    records = read_jsonl(out / "eval" / model_folder_name(str(out / "sft" / "final")) / "samples.jsonl")
    assert records[0]["prompt"] == "2+3=? Answer in \\boxed{}."  # read from the 'question' column
    assert records[0]["mean@k"] > 0 and records[1]["mean@k"] == 0  # it learnt to answer 5, always
    assert "5" in records[0]["predictions"]


def test_make_traces_filters_and_determinism(tiny, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run("make-traces", tiny, a, "traces.keep_per_prompt=2") == 0
    assert run("make-traces", tiny, b, "traces.keep_per_prompt=2") == 0
    text = (a / "traces" / "traces.jsonl").read_text()
    assert text == (b / "traces" / "traces.jsonl").read_text() and text.count("\n") == 16  # same seed, same file
    assert run("make-traces", tiny, b, "traces.keep_per_prompt=2", "seed=1", "--overwrite") == 0
    assert (b / "traces" / "traces.jsonl").read_text() != text

    # correctness filter (random teacher: nothing is right), length filter, truncation
    assert run("make-traces", tiny, a, "traces.filter_correct=true", "--overwrite") == 0
    stats = json.loads((a / "traces" / "stats.json").read_text())
    assert stats["kept"] == 0 and stats["dropped_incorrect"] == 16 and (a / "traces" / "traces.jsonl").read_text() == ""
    assert run("make-traces", tiny, a, "traces.max_tokens=10", "traces.keep_per_prompt=2", "--overwrite") == 0
    stats = json.loads((a / "traces" / "stats.json").read_text())
    kept = read_jsonl(a / "traces" / "traces.jsonl")
    assert stats["dropped_length"] > 0 and stats["kept"] == len(kept) == 16 - stats["dropped_length"]
    assert all(r["trace_tokens"] <= 10 for r in kept)
    assert run("make-traces", tiny, a, "traces.drop_truncated=true", "traces.keep_per_prompt=2", "--overwrite") == 0
    stats = json.loads((a / "traces" / "stats.json").read_text())
    assert stats["dropped_truncated"] > 0 and stats["kept"] == 16 - stats["dropped_truncated"]


def test_python_dash_m_and_cli_usage(tiny, tmp_path, capsys):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "vold", "--help"], capture_output=True, text=True, check=True)
    assert all(name in done.stdout for name in ("make-traces", "sft", "train", "eval", "bench"))
    with pytest.raises(SystemExit):
        main(["train", "--config", CONFIG, "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown config key 'optim.lrr'"):
        run("train", tiny, tmp_path, "optim.lrr=1")


def test_optional_loggers_skip_cleanly(tiny, tmp_path, monkeypatch):
    """TensorBoard and wandb asked for but not installed: a warning each, the run goes on; tqdm bars work."""
    import importlib.util
    import sys

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.warns(UserWarning) as caught:
        assert run("train", tiny, tmp_path, "sft.enabled=false", "optim.max_steps=1", "logging.tensorboard=true",
                   "logging.wandb=true", "logging.progress=true") == 0
    messages = " ".join(str(w.message) for w in caught)
    assert "tensorboard package is not installed" in messages and "wandb is not installed" in messages
    assert len(read_jsonl(tmp_path / "rl" / "metrics.jsonl")) == 1 and not (tmp_path / "rl" / "tensorboard").exists()


def test_sft_gradient_checkpointing_and_grad_accum_change_nothing(tiny, tmp_path):
    """Recomputing activations in the backward pass, or splitting a step into micro-batches, gives the same run."""
    assert run("make-traces", tiny, tmp_path) == 0
    common = ["sft.max_steps=2", "checkpoint.every=0", f"sft.train_files=[{tmp_path / 'traces' / 'traces.jsonl'}]"]
    runs = {"plain": ["sft.batch_size=4"], "checkpointing": ["sft.batch_size=4", "model.gradient_checkpointing=true"],
            "accumulation": ["sft.batch_size=2", "sft.grad_accum=2"]}
    losses = {}
    for name, overrides in runs.items():
        assert run("sft", tiny, tmp_path / name, *common, *overrides) == 0
        losses[name] = [m["train/loss"] for m in read_jsonl(tmp_path / name / "sft" / "metrics.jsonl")]
    assert losses["checkpointing"] == pytest.approx(losses["plain"], rel=1e-6)
    assert losses["accumulation"] == pytest.approx(losses["plain"], rel=1e-5)


def test_train_options_reference_kl_ppo_epochs_dr_grpo(tiny, tmp_path):
    """The non-paper switches run too: a reference KL (frozen copy of the start model), k3, several PPO
    epochs and minibatches (old log-probs), Dr. GRPO advantages and normalisation, gradient accumulation."""
    assert run("train", tiny, tmp_path, REWARDS, "sft.enabled=false", "optim.max_steps=2", "loss.ref_kl_coef=0.05",
               "loss.distill_estimator=k3", "optim.ppo_epochs=2", "optim.minibatches=2", "optim.grad_accum=3",
               "loss.loss_type=dr_grpo", "loss.scale_rewards=none", "checkpoint.every=0") == 0
    metrics = read_jsonl(tmp_path / "rl" / "metrics.jsonl")
    assert len(metrics) == 2 and all(finite(m["train/ref_kl"]) and finite(m["distill/k3"]) for m in metrics)
    assert metrics[0]["train/ref_kl"] > 0  # the later updates of step 1 moved away from the reference
    assert metrics[0]["train/ratio"] != pytest.approx(1.0, abs=1e-7)


def test_example_configs_load():
    paper = load_config(Path(CONFIG).with_name("paper_qwen2_5_vl_3b_qwen3_8b.yaml"))
    assert paper.model.student == "Qwen/Qwen2.5-VL-3B-Instruct" and paper.model.teacher == "Qwen/Qwen3-8B"
    assert paper.rollout.num_generations == 5 and paper.optim.lr == 6e-6
    assert (paper.loss.epsilon_low, paper.loss.epsilon_high, paper.loss.distill_coef) == (0.2, 0.3, 0.1)
    assert paper.loss.distill_estimator == "k2" and paper.loss.distill_on_wrong_only and paper.loss.ref_kl_coef == 0
    tiny = load_config(CONFIG)
    assert tiny.device == "cpu" and tiny.model.dtype == "float32" and tiny.sft.enabled


def test_sft_whose_prompts_fill_max_length_says_so(tiny, tmp_path):
    """sft.max_length below the prompts' length cuts every response to nothing: the run logged loss 0, tokens 0 and
    trained nothing without a word (found by the new-user pass). It now warns, naming sft.max_length."""
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps({"prompt": f"{i}+1=? Answer in \\boxed{{}}.", "answer": str(i + 1),
                                          "trace": f"\\boxed{{{i + 1}}}"}) + "\n" for i in range(4)))
    with pytest.warns(UserWarning, match=r"sft: no response token in 2 steps .*sft.max_length=5"):
        assert run("sft", tiny, tmp_path, f"sft.train_files=[{traces}]", "sft.max_length=5", "sft.max_steps=2",
                   "checkpoint.every=0") == 0
    assert [m["train/tokens"] for m in read_jsonl(tmp_path / "sft" / "metrics.jsonl")] == [0, 0]
