"""The GPU readiness check (benchmarks/gpu_check.py): its guards, its model configs and, marked slow, its
whole dry run on the CPU (every part at tiny shapes, the Triton engine under the interpreter)."""

from __future__ import annotations

import json
import sys
import tarfile

import pytest
import torch

from benchmarks import gpu_check as gc
from vold.cli import main as vold_main
from vold.testing import make_tiny_tokenizer

PARTS = ("machine", "kernel_tests", "kernel_bench", "train_step", "sft_step")


def _read(out):
    report = json.loads((out / "gpu_check.json").read_text())
    return report, (out / "gpu_check.md").read_text()


def test_a_failing_part_does_not_stop_the_rest(tmp_path, monkeypatch):
    """A part that raises, one that outruns its budget and a missing benchmark preset are each recorded; the
    parts after them still run, and the report is written."""

    def broken(ctx, out):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def hangs(ctx, out):
        run = gc.run_guarded([sys.executable, "-c", "import time; time.sleep(60)"], ctx.budgets["train_step"],
                             out / "hang.log")
        return {"status": gc._status(run), **run}

    def fine(ctx, out):
        (out / "note.txt").write_text("ran")
        return {"status": "ok", "value": 3}

    monkeypatch.setitem(gc.PARTS, "machine", broken)
    monkeypatch.setitem(gc.PARTS, "train_step", hangs)
    monkeypatch.setitem(gc.PARTS, "sft_step", fine)
    out = tmp_path / "out"
    report = gc.main(["--output", str(out), "--workdir", str(tmp_path / "work"), "--parts",
                      "machine,kernel_bench,train_step,sft_step", "--kernel-preset", "no_such_preset",
                      "--budget", "train_step=1"])
    saved, md = _read(out)
    assert saved["status"] == report["status"] == "failed"
    parts = saved["parts"]
    assert list(parts) == ["machine", "kernel_bench", "train_step", "sft_step"]
    assert parts["machine"]["status"] == "error" and "illegal memory access" in parts["machine"]["error"]
    assert parts["kernel_bench"]["status"] == "failed" and parts["kernel_bench"]["rc"] == 2
    assert "no --preset no_such_preset" in parts["kernel_bench"]["error"]
    assert parts["train_step"]["status"] == "timeout" and parts["train_step"]["timed_out"]
    assert parts["train_step"]["seconds"] < 45  # killed at its 1 s budget, not after the child's 60 s
    assert parts["sft_step"] == {**parts["sft_step"], "status": "ok", "value": 3, "budget_s": gc.BUDGETS_S["sft_step"]}
    for name, status in (("machine", "error"), ("kernel_bench", "failed"), ("train_step", "timeout"),
                         ("sft_step", "ok")):
        assert f"| {name} | {status} |" in md
    with tarfile.open(out / gc.ARCHIVE) as tar:
        names = set(tar.getnames())
    assert {"kernel_bench/kernels.log", "train_step/hang.log", "sft_step/note.txt"} <= names


def test_arguments():
    args = gc.parse_args(["--dry-run", "--output", "x"])
    assert args.kernel_preset == "quick" and args.engines == gc.DRY_ENGINES and args.kernel_tests_k
    real = gc.parse_args(["--output", "x", "--budget", "kernel_bench=30", "--parts", "kernel_tests,kernel_bench"])
    assert real.kernel_preset == "gpu" and real.engines == gc.ENGINES and real.kernel_tests_k is None
    assert real.budgets["kernel_bench"] == 30 and real.parts == ["kernel_tests", "kernel_bench"]
    assert sum(gc.BUDGETS_S.values()) <= 480  # the 8 minutes on one H200
    for bad in (["--parts", "nope"], ["--budget", "kernel_bench=0"], ["--budget", "x=3"], ["--engines", "cuda"]):
        with pytest.raises(SystemExit):
            gc.parse_args(bad)


def test_output_defaults_to_out(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gc.parse_args([]).output == tmp_path  # the device machine's $OUT folder
    monkeypatch.delenv("OUT")
    assert gc.parse_args([]).output == gc.DEFAULT_OUTPUT


def test_parse_pytest_counts_a_killed_run():
    text = ("collected 12 items / 9 deselected / 3 selected\n\n"
            "tests/test_kernels.py::test_a[triton-plain] PASSED                    [ 33%]\n"
            "tests/test_kernels.py::test_b[triton-bf16] FAILED                     [ 66%]\n"
            "tests/test_kernels.py::test_c[triton] SKIPPED (no triton)             [100%]\n")
    parsed = gc.parse_pytest(text)
    assert parsed["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert parsed["failed_tests"] == ["tests/test_kernels.py::test_b[triton-bf16]"] and parsed["selected"] == 3


@pytest.mark.parametrize("build,cls,billions", [
    (gc.student_config, "Qwen2_5_VLForConditionalGeneration", (3.70, 3.80)),  # Qwen2.5-VL-3B-Instruct: 3.75 B
    (gc.teacher_config, "Qwen3ForCausalLM", (8.15, 8.25)),  # Qwen3-8B: 8.19 B
])
def test_real_configs_have_the_public_models_sizes(build, cls, billions):
    import transformers

    config = build(make_tiny_tokenizer())
    with torch.device("meta"):
        model = getattr(transformers, cls)._from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions[0] < params < billions[1], params
    tiny = build(make_tiny_tokenizer(), tiny=True, vocab_size=gc.TINY_VOCAB)
    assert type(tiny) is type(config)  # the dry run's models: the same architecture


@pytest.mark.slow
def test_dry_run_every_part_ok(tmp_path):
    """``vold gpu-check --dry-run``: every part on the CPU (about 4 minutes on a busy 2-core machine)."""
    out = tmp_path / "out"
    assert vold_main(["gpu-check", "--dry-run", "--output", str(out), "--workdir", str(tmp_path / "work")]) == 0
    report, md = _read(out)
    assert report["dry_run"] and report["status"] == "ok"
    assert list(report["parts"]) == list(PARTS)
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"), part.get("log_tail"))
        assert f"| {name} | ok |" in md
    parts = report["parts"]
    assert parts["machine"]["versions"]["torch"] and "torch_cuda" in parts["machine"]
    for engine in gc.DRY_ENGINES:
        counts = parts["kernel_tests"]["engines"][engine]["counts"]
        assert counts.get("passed", 0) >= 4 and not counts.get("failed") and not counts.get("error"), counts
    assert parts["kernel_bench"]["result"]["rows"] and parts["kernel_bench"]["markdown"]
    rows = parts["train_step"]["rows"]
    assert [r["estimator"] for r in rows] == ["full", "k2"]
    for row in rows:
        assert row["generated_tokens"] > 0 and row["step_seconds"] > 0
        assert row["phases_seconds"]["gen"] > 0 and row["phases_seconds"]["update_actor"] > 0
        assert row["phases_seconds"]["teacher"] > 0  # the colocated teacher scored the rollouts
    assert parts["sft_step"]["step_seconds"] > 0 and parts["sft_step"]["loss"] > 0
    with tarfile.open(out / gc.ARCHIVE) as tar:
        names = set(tar.getnames())
    assert {"kernel_tests/pytest_triton.log", "kernel_bench/kernels.log", "train_step/step_gpu_check.json",
            "sft_step/result.json"} <= names
    assert sorted(p.name for p in out.iterdir()) == sorted(["gpu_check.json", "gpu_check.md", gc.ARCHIVE])
