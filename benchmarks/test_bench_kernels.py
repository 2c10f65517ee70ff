"""pytest-benchmark cases at a small shape (N=256, V=4096, H=64) and sanity checks of the harness.

Benchmarks measure, tests assert: nothing here asserts on timing. What is asserted is that every
implementation gives finite results and that vold_torch, Liger and the naive baseline compute the
same loss (and gradients) on the harness's inputs, so that the timings compare like with like.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import kernels as bk
from benchmarks.harness import failure
from vold.kernels import reference

SHAPE = bk.Shape(n=256, h=64, v=4096)
# Four sequences of 64 tokens, the last quarter of each masked out: the masked mean is exercised.
SETTINGS = bk.Settings(device="cpu", dtype="fp32", seq_len=64, mask_fraction=0.75, memory=False,
                       max_foreign_cpu=None)


@pytest.fixture(scope="module")
def inputs() -> bk.Inputs:
    return bk.make_inputs(SHAPE, SETTINGS, teacher_logprobs=True)


def run_once(impl: str, estimator: str, inp: bk.Inputs) -> tuple[float | None, list[torch.Tensor]]:
    """Loss and (dX, dW) of one forward + backward."""
    inp.zero_grads()
    out = bk.build_step(impl, estimator, inp, SETTINGS)()
    grads = [g.detach().clone() for g in (inp.s_hidden.grad, inp.s_weight.grad) if g is not None]
    inp.zero_grads()
    return (None if out is None else float(out)), grads


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """``max|a - b| <= tol * max|b|``."""
    err = float((actual.double() - expected.double()).abs().max())
    assert err <= tol * float(expected.double().abs().max()), f"max abs error {err:.3e}"


@pytest.mark.parametrize("impl", ["naive", "vold_torch", "liger", "gemm_floor"])
def test_bench_full(benchmark, inputs: bk.Inputs, impl: str) -> None:
    step = bk.build_step(impl, "full", inputs, SETTINGS)
    benchmark.extra_info.update(n=SHAPE.n, h=SHAPE.h, v=SHAPE.v, estimator="full")
    out = benchmark.pedantic(step, setup=inputs.zero_grads, rounds=5, warmup_rounds=1, iterations=1)
    if impl == "gemm_floor":
        assert out is None
        return
    assert math.isfinite(float(out))
    for grad in (inputs.s_hidden.grad, inputs.s_weight.grad):
        assert grad is not None and bool(torch.isfinite(grad).all())
    inputs.zero_grads()


@pytest.mark.parametrize("estimator", ["full", "k2"])
def test_vold_torch_loss_matches_naive(inputs: bk.Inputs, estimator: str) -> None:
    naive_loss, naive_grads = run_once("naive", estimator, inputs)
    vold_loss, vold_grads = run_once("vold_torch", estimator, inputs)
    assert math.isfinite(naive_loss) and math.isfinite(vold_loss)
    assert abs(vold_loss - naive_loss) <= 1e-4 * abs(naive_loss)
    for got, want in zip(vold_grads, naive_grads, strict=True):
        assert_close_rel(got, want, 1e-3)


def test_liger_combination_matches_naive(inputs: bk.Inputs) -> None:
    naive_loss, naive_grads = run_once("naive", "full", inputs)
    liger_loss, liger_grads = run_once("liger", "full", inputs)
    assert abs(liger_loss - naive_loss) <= 1e-4 * abs(naive_loss)
    for got, want in zip(liger_grads, naive_grads, strict=True):
        assert_close_rel(got, want, 1e-3)


@pytest.mark.parametrize("estimator", ["full", "k2"])
def test_naive_matches_the_float64_test_reference(inputs: bk.Inputs, estimator: str) -> None:
    """The naive row (the oracle in the working precision) against the oracle in float64."""
    teacher = (dict(teacher_hidden=inputs.t_hidden, teacher_weight=inputs.t_weight) if estimator == "full"
               else dict(teacher_logprobs=inputs.teacher_logprobs))
    with torch.no_grad():
        ref, _ = reference.ref_vold_loss(
            inputs.s_hidden, inputs.s_weight, inputs.targets, inputs.advantages, inputs.old_logprobs, inputs.mask,
            **teacher, loss_type=bk.LOSS_TYPE, epsilon_low=bk.EPSILON_LOW, epsilon_high=bk.EPSILON_HIGH,
            distill_coef=bk.DISTILL_COEF, distill_estimator=estimator,
        )
    naive_loss, _ = run_once("naive", estimator, inputs)
    assert abs(naive_loss - float(ref)) <= 1e-5 * max(1.0, abs(float(ref)))


def test_gemm_floor_uses_a_chunk_no_larger_than_n() -> None:
    for n, v in ((100, 4096), (4096, 32768), (16384, 151936)):
        chunk = bk.vold_chunk_size(n, v, torch.device("cpu"), None)
        assert 1 <= chunk <= n
    assert bk.vold_chunk_size(4096, 32768, torch.device("cpu"), 512) == 512


def test_naive_is_skipped_above_the_memory_cap() -> None:
    settings = bk.Settings(impls=("gemm_floor", "naive"), estimators=("full",), repeats=1, memory=False,
                           naive_cap_bytes=1, seq_len=64, max_foreign_cpu=None)
    rows = {r["impl"]: r for r in bk.run_shape(SHAPE, settings)}
    assert rows["naive"]["status"] == "skipped (memory)"
    assert rows["gemm_floor"]["status"] == "ok" and rows["gemm_floor"]["ratio_floor"] == 1.0


@pytest.mark.slow
def test_cli_end_to_end_with_memory_children(tmp_path: Path) -> None:
    result = bk.main(["--shapes", "256x64x4096", "--impls", "gemm_floor,vold_torch,naive", "--estimators", "full",
                      "--repeats", "1", "--seq-len", "64", "--output", str(tmp_path), "--no-plots", "--tag", "t",
                      "--max-foreign-cpu", "-1"])
    saved = json.loads((tmp_path / "kernels_t.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert (tmp_path / "kernels_t.md").read_text().startswith("# vold kernel benchmark: t")
    for row in saved["rows"]:
        assert row["status"] == "ok" and row["mem_status"] == "ok", row
        assert row["peak_extra_bytes"] > 0 and row["time_s"] > 0
    assert saved["machine"]["cpu"] and saved["machine"]["torch"] == torch.__version__


@pytest.mark.slow
def test_help_runs() -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--help"], capture_output=True, text=True,
                          cwd=bk.REPO_ROOT, timeout=120)
    assert proc.returncode == 0 and "--preset" in proc.stdout


@pytest.mark.parametrize("estimator", ["full", "k2"])
def test_trl_candidate_computes_the_same_loss_as_vold(inputs: bk.Inputs, estimator: str) -> None:
    """TRL's chunked kernels, assembled as the benchmark's "trl" row does, give vold's loss (fp32, 1e-5) and
    gradients: the rows compare the same objective."""
    vold_loss, vold_grads = run_once("vold_torch", estimator, inputs)
    trl_loss, trl_grads = run_once("trl", estimator, inputs)
    assert math.isfinite(vold_loss) and vold_loss != 0.0
    assert abs(trl_loss - vold_loss) <= 1e-5 * max(1.0, abs(vold_loss)), (trl_loss, vold_loss)
    for got, want in zip(trl_grads, vold_grads, strict=True):
        assert_close_rel(got, want, 1e-4)


def test_trl_teacher_logprobs_match_the_inputs(inputs: bk.Inputs) -> None:
    """k2's teacher log-probs (made by the harness) are what TRL's ChunkedLogProbFunction gives under no_grad."""
    ht = inputs.t_hidden.shape[-1]
    with torch.no_grad():
        got = bk.trl_logprobs(inputs.t_hidden.reshape(-1, ht), inputs.t_weight, inputs.targets.reshape(-1))
    assert_close_rel(got, inputs.teacher_logprobs.reshape(-1), 1e-5)


@pytest.mark.parametrize("estimator", ["logp", "logp_grad"])
def test_logprob_pass_rows_agree(inputs: bk.Inputs, estimator: str) -> None:
    """vold's fused_linear_logprobs and TRL's ChunkedLogProbFunction rows: same masked mean, same gradients
    (none under no_grad); the GEMM floor runs without a loss."""
    vold_value, vold_grads = run_once("vold_torch", estimator, inputs)
    trl_value, trl_grads = run_once("trl", estimator, inputs)
    assert math.isfinite(vold_value) and abs(trl_value - vold_value) <= 1e-5 * abs(vold_value)
    assert len(vold_grads) == len(trl_grads) == (0 if estimator == "logp" else 2)
    for got, want in zip(trl_grads, vold_grads, strict=True):
        assert_close_rel(got, want, 1e-4)
    assert run_once("gemm_floor", estimator, inputs) == (None, [])


def test_rows_of_every_estimator() -> None:
    """Liger has the exact loss only; naive the two losses; vold, TRL and the floor every row."""
    keys = bk.row_keys(bk.Settings(impls=("gemm_floor", "vold_torch", "trl", "liger", "naive"),
                                   estimators=bk.ESTIMATORS))
    assert ("liger", "full") in keys and ("liger", "k2") not in keys and ("naive", "logp") not in keys
    for est in bk.ESTIMATORS:
        assert {("vold_torch", est), ("trl", est), ("gemm_floor", est)} <= set(keys)


def test_gpu_preset_is_cuda_only() -> None:
    preset = bk.PRESETS["gpu"]["cuda"]
    assert {(s.n, s.h, s.v) for s in preset["shapes"]} == {(n, h, 151936) for n in (4096, 16384, 65536)
                                                            for h in (2048, 3584)}
    assert preset["dtype"] == "bf16" and "trl" in preset["impls"] and "vold_triton" in preset["impls"]
    args = bk.parse_args(["--preset", "gpu", "--device", "cpu"])
    with pytest.raises(SystemExit, match="gpu"):
        bk.settings_and_shapes(args)


def test_a_row_out_of_memory_is_recorded_and_the_others_run(inputs: bk.Inputs) -> None:
    def out_of_memory() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    steps = {("trl", "full"): out_of_memory,
             ("vold_torch", "full"): bk.build_step("vold_torch", "full", inputs, SETTINGS)}
    timing = bk.time_rows(steps, inputs, dataclasses.replace(SETTINGS, repeats=1))
    assert timing["trl", "full"]["status"] == "oom" and "time_s" not in timing["trl", "full"]
    assert "status" not in timing["vold_torch", "full"] and timing["vold_torch", "full"]["time_s"] > 0


def test_failures_are_classified() -> None:
    assert failure(MemoryError()) == "oom"
    assert failure(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")) == "oom"
    assert failure(ValueError("bad\nsecond line")) == "error: ValueError: bad"
