"""Checkpoints and ``--resume auto``: a run killed with SIGKILL and resumed logs exactly what an
uninterrupted run logs (same seed), and ends with the same weights.

The kill test runs ``python -m vold train`` in a subprocess, waits for its first checkpoint, kills
it (SIGKILL: no cleanup, possibly in the middle of a step, a log line or a checkpoint save), then
resumes it in another subprocess. The uninterrupted reference runs in-process (one torch thread
everywhere, so the numbers are bitwise reproducible on a machine). The killed run cannot end before the kill
lands: a reward of 0 (``HOLD_REWARD``, in every run) blocks it in its last step.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vold.cli import main
from vold.runs import (
    find_checkpoint,
    list_checkpoints,
    lr_factor,
    read_jsonl,
    save_checkpoint,
)
from vold.testing import make_tiny_text_student, make_tiny_tokenizer, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_cpu.yaml")
STEPS = 6
# How long the killed run may take to write its first checkpoint: a guard against a hung run only. It takes ~5 s on
# a quiet machine; at nice 19 under a load of ~10 (2 cores) it took over 120 s, the earlier limit, and the test then
# failed with "assert 1 <= 0" (no step logged when killed).
FIRST_CHECKPOINT_S = 900


# A reward of 0 for every completion (no total, advantage or weight of a run changes), which blocks for good at its
# HOLD_AT-th call in a process whose environment sets HOLD_AT: the killed run waits in its last step's rewards
# until the kill lands. Without it the run could end first: its 5 steps after the first checkpoint took 0.7 s here
# (0.14 s each), so a test process that looked again only after those (descheduled on a loaded machine) found the run
# ended, and os.kill raised ProcessLookupError.
HOLD_AT = "VOLD_TEST_HOLD_AT_CALL"
HOLD_REWARD = f"""
import os
import threading

calls = 0


def zero_or_hold(completions, **_):
    global calls
    calls += 1
    if calls >= int(os.environ.get("{HOLD_AT}", "0")) > 0:
        threading.Event().wait()
    return [0.0] * len(completions)
"""


def train_args(tiny: dict, out: Path, hold: Path) -> list[str]:
    # several updates per step (ppo epochs, minibatches: old log-probs, shuffling), a lr schedule, Adam state,
    # a reward with non-zero advantages: everything a resume has to restore shows in the metrics
    return ["train", "--config", CONFIG, *tiny_overrides(tiny, out), "sft.enabled=false", f"optim.max_steps={STEPS}",
            "optim.ppo_epochs=2", "optim.minibatches=2", "optim.lr_scheduler=cosine", "optim.warmup_steps=2",
            "rollout.max_new_tokens=24", f"reward.functions=[accuracy, vold.testing:digit_reward, {hold}:zero_or_hold]",
            "checkpoint.every=1", "checkpoint.keep_last=2"]


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_sigkill_then_resume_auto_matches_an_uninterrupted_run(tiny, tmp_path):
    reference, killed, hold = tmp_path / "reference", tmp_path / "killed", tmp_path / "hold_reward.py"
    hold.write_text(HOLD_REWARD)
    assert HOLD_AT not in os.environ
    assert main(train_args(tiny, reference, hold)) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "vold", *train_args(tiny, killed, hold)]
    # its output goes to a file: a pipe nobody reads while the test waits would block the run once 64 KiB are written
    log = tmp_path / "killed.log"
    with open(log, "wb") as out:
        # one reward call per step: the killed run holds in step STEPS (the resumed one, without HOLD_AT, does not)
        process = subprocess.Popen(command, env={**env, HOLD_AT: str(STEPS)}, stdout=out, stderr=subprocess.STDOUT,
                                   cwd=tmp_path)
    first = killed / "rl" / "checkpoints" / "step_000001"
    started = time.monotonic()
    while not first.is_dir() and process.poll() is None and time.monotonic() - started < FIRST_CHECKPOINT_S:
        time.sleep(0.002)
    waited = time.monotonic() - started
    process.kill()  # SIGKILL; nothing if the run has ended (it was reaped by poll: os.kill would raise)
    process.wait()
    output = log.read_text(errors="replace")
    assert process.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{output}"
    assert first.is_dir(), f"no first checkpoint {waited:.0f} s after the start:\n{output}"
    assert not (killed / "rl" / "final").exists()
    done = len(read_jsonl(killed / "rl" / "metrics.jsonl")) if (killed / "rl" / "metrics.jsonl").exists() else 0
    assert 1 <= done < STEPS, done
    latest = find_checkpoint(killed / "rl", "auto")
    print(f"killed after {done} logged steps; resuming from {latest.name}")

    resumed = subprocess.run([*command, "--resume", "auto"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {latest}" in resumed.stdout

    expected = without_timings(read_jsonl(reference / "rl" / "metrics.jsonl"))
    got = without_timings(read_jsonl(killed / "rl" / "metrics.jsonl"))
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert got == expected  # exact: every metric of every step, before and after the kill
    assert read_jsonl(killed / "rl" / "samples.jsonl") == read_jsonl(reference / "rl" / "samples.jsonl")
    assert_same_weights(killed / "rl" / "final", reference / "rl" / "final")
    assert len(list_checkpoints(killed / "rl")) == 2  # keep_last


def test_sft_resume_from_a_middle_checkpoint_reproduces_the_run(tiny, tmp_path):
    """Rewind a finished SFT run to its step-2 checkpoint (a stale .tmp save beside it) and resume."""
    args = ["sft", "--config", CONFIG, *tiny_overrides(tiny, tmp_path), "sft.max_steps=5", "sft.grad_accum=2",
            "sft.batch_size=2", "sft.warmup_steps=1", "checkpoint.every=1", "checkpoint.keep_last=10"]
    assert main(["make-traces", *args[1:]]) == 0
    assert main(args) == 0
    run = tmp_path / "sft"
    expected = without_timings(read_jsonl(run / "metrics.jsonl"))
    (run / "reference").mkdir()
    os.replace(run / "final", run / "reference" / "final")
    for path in list_checkpoints(run)[2:]:
        path.rename(path.with_name(path.name + ".tmp"))  # as if killed while saving them
    assert find_checkpoint(run, "auto").name == "step_000002"

    assert main([*args, "--resume", "auto"]) == 0
    assert without_timings(read_jsonl(run / "metrics.jsonl")) == expected
    assert_same_weights(run / "final", run / "reference" / "final")

    # a fresh start in a folder holding a run is refused unless asked for (overwrite_output_dir): fresh logs ...
    with pytest.raises(ValueError, match=f"{run} already holds a run .*--resume auto.*overwrite_output_dir=true"):
        main([*args, "sft.max_steps=1"])
    # asking for both (continue and start over) is refused, naming both (resume used to win silently)
    with pytest.raises(ValueError, match="--resume auto .* and overwrite_output_dir=true .* contradict"):
        main([*args, "--resume", "auto", "overwrite_output_dir=true"])
    assert main([*args, "--resume", "none", "overwrite_output_dir=true", "sft.max_steps=1"]) == 0
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1]
    # ... and only its own checkpoints: the abandoned run's steps 2-5 would be what resume=auto picks
    assert [p.name for p in list_checkpoints(run)] == ["step_000001"]


def test_checkpoint_folders(tmp_path):
    model, tokenizer = make_tiny_text_student(make_tiny_tokenizer()), make_tiny_tokenizer()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, tokenizer, {"x": step}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    (tmp_path / "checkpoints" / "step_000004.tmp").mkdir()  # an interrupted save
    (tmp_path / "checkpoints" / "step_000005").mkdir()  # no state.pt: not a checkpoint
    assert find_checkpoint(tmp_path, "auto").name == "step_000003"
    assert find_checkpoint(tmp_path, "none") is None
    assert find_checkpoint(tmp_path / "empty", "auto") is None
    explicit = tmp_path / "checkpoints" / "step_000002"
    assert find_checkpoint(tmp_path, str(explicit)) == explicit
    with pytest.raises(FileNotFoundError, match="checkpoint.resume=.*no state.pt"):
        find_checkpoint(tmp_path, str(tmp_path / "nowhere"))
    # a checkpoint of another run folder (another stage's: `vold train --resume <sft>/checkpoints/step_N` continued
    # an RL run "at step N" from SFT's optimizer, step, data position and log sizes; found by the new-user pass)
    other = tmp_path / "other"
    save_checkpoint(other, 4, model, tokenizer, {"x": "sft"}, keep_last=2)
    with pytest.raises(ValueError, match="is not a checkpoint of this run .*model.student"):
        find_checkpoint(tmp_path, str(other / "checkpoints" / "step_000004"))
    assert find_checkpoint(other, str(other / "checkpoints" / "step_000004")).name == "step_000004"
    assert (explicit / "model" / "tokenizer.json").is_file() and (explicit / "model" / "config.json").is_file()

    # a fresh start (resume=none) or a rewind in the same folder: keep_last used to prune the new run's
    # checkpoints (older steps) and keep the abandoned run's later ones, which resume=auto then picked
    save_checkpoint(tmp_path, 1, model, tokenizer, {"x": "new run"}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001"]
    save_checkpoint(tmp_path, 2, model, tokenizer, {"x": "new run"}, keep_last=2)
    assert find_checkpoint(tmp_path, "auto").name == "step_000002"


def test_lr_schedule():
    factors = [lr_factor(s, kind="cosine", warmup=2, total=6) for s in range(7)]
    assert factors[:3] == [0.5, 1.0, 1.0] and factors[4] == pytest.approx(0.5) and factors[6] == pytest.approx(0.0)
    assert [lr_factor(s, kind="linear", warmup=0, total=4, min_ratio=0.2) for s in (0, 2, 4, 9)] == pytest.approx(
        [1.0, 0.6, 0.2, 0.2])
    assert lr_factor(100, kind="constant", warmup=3, total=4) == 1.0
    with pytest.raises(ValueError, match="lr_scheduler='step'"):
        lr_factor(0, kind="step", warmup=0, total=1)


def test_final_model_is_written_as_a_whole(tmp_path, monkeypatch):
    """Stage.close wrote final/ in place: a kill while saving left a config.json beside missing or half-written
    weights, which the next stage (sft/final -> vold train) or vold eval then loaded; files of an earlier final stayed
    (found by the new-user pass). save_final writes final.tmp, then renames it."""
    from vold.runs import save_final

    model, tokenizer = make_tiny_text_student(make_tiny_tokenizer()), make_tiny_tokenizer()
    final = tmp_path / "final"
    save_final(model, tokenizer, final)
    (final / "stale.bin").write_text("an earlier model's file")
    before = sorted(p.name for p in final.iterdir())
    save_final(model, tokenizer, final)
    assert sorted(p.name for p in final.iterdir()) == [n for n in before if n != "stale.bin"]
    assert not final.with_name("final.tmp").exists()

    def killed(self, path, *args, **kwargs):  # the process dies after the config, before the weights
        (Path(path) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model), "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        save_final(model, tokenizer, final)
    assert sorted(p.name for p in final.iterdir()) == [n for n in before if n != "stale.bin"]  # the earlier one
    monkeypatch.undo()
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(type(model), "save_pretrained", killed)
        save_final(model, tokenizer, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
