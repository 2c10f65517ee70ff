"""GPU readiness check: the whole GPU side of vold in one prepared run (< 8 min on one H200).

    python -m benchmarks.gpu_check [--output DIR]            # on a CUDA machine
    python -m benchmarks.gpu_check --dry-run [--output DIR]  # every part on the CPU at tiny shapes
    vold gpu-check [...]                                     # the same, from a checkout

Parts, in order, each in its own subprocess with its own time budget (``--budget part=seconds``), so a
crash, a CUDA error or a hang in one is recorded and the next one still runs:

- ``machine``       GPU name, memory, compute capability, driver, CUDA, and the versions of torch, triton,
                    transformers, trl, liger-kernel, ... (``nvidia-smi`` and ``benchmarks.kernels.machine_info``).
- ``kernel_tests``  correctness on the device: ``pytest tests/test_kernels.py tests/test_numerics.py`` (whole
                    files, so new tests join by themselves) with ``VOLD_TEST_DEVICE=cuda``, once per engine (``triton``,
                    ``torch``, ``torch_compile``; ``VOLD_TEST_IMPLS``), fp32 and bf16 (the file's own cases),
                    against the float64 reference (tests/conftest.py makes CUDA the default device).
- ``kernel_bench``  ``python -m benchmarks.kernels --preset gpu``: the kernel benchmark at N in {4k, 16k, 64k},
                    V = 151936, H = 2048 / 3584, bf16, against Liger, TRL's chunked kernels, naive and the
                    cuBLAS floor (that module's own table is copied into the report).
- ``train_step``    one ``vold train`` step (``benchmarks.step``, the trainer step benchmark) on randomly
                    initialised models of the real shapes, built in code from the Qwen2.5-VL-3B-Instruct
                    (student) and Qwen3-8B (teacher) configs (:func:`student_config`, :func:`teacher_config`;
                    nothing is downloaded): configs/paper_qwen2_5_vl_3b_qwen3_8b.yaml with bf16 weights
                    (student and teacher, both on the same GPU), HF generate and sdpa, 8 prompts x 5
                    rollouts x 512 new tokens, ``loss.distill_estimator`` full and k2: seconds per phase and
                    the peak GPU memory of each row (one step each, so the first-call warm-up counts in it).
- ``sft_step``      one ``vold sft`` step of the same student (8 rows, 512-token responses): seconds, peak memory.

``--dry-run`` runs the same parts on the CPU at tiny shapes: a few kernel tests per engine (Triton under
``TRITON_INTERPRET=1``), ``--preset quick`` of the kernel benchmark, and tiny models of the same two
architectures (2 prompts x 2 rollouts x 4 tokens); benchmarks/test_gpu_check.py runs it in the suite.

Outputs in ``--output`` (default benchmarks/results/gpu_check/, or ``$OUT`` on the device machine): three files,
``gpu_check.json`` (machine, every part's status, seconds, budget and results), ``gpu_check.md`` (the report)
and ``gpu_check_files.tar.gz`` (each part's log and own outputs), rewritten after every part so that a run
killed half-way still leaves what it did. Models and runs go to ``--workdir`` (default: a temporary folder,
on /dev/shm when it has room) and are removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "results" / "gpu_check"
PAPER_CONFIG = REPO_ROOT / "configs" / "paper_qwen2_5_vl_3b_qwen3_8b.yaml"
# the kernel tests against the float64 reference (whole files, so new tests join by themselves); test_numerics.py
# (overflow and near-convergence cases) where this checkout has it
KERNEL_TEST_FILES = tuple(f for f in ("tests/test_kernels.py", "tests/test_numerics.py") if (REPO_ROOT / f).is_file())
ENGINES = ("triton", "torch", "torch_compile")
# the dry run's kernel tests: a few cases per engine (fp32 and bf16 of each public function)
DRY_KERNEL_TESTS = ("(test_logprobs_fp32 and plain) or (test_divergence_bf16 and reverse) or "
                    "(test_vold_loss_fp32 and grpo_token) or (test_vold_loss_bf16 and grpo_full)")
DRY_ENGINES = ("triton", "torch")  # torch_compile's inductor C++ builds take minutes on a small CPU

# seconds per part on one H200 (sum 480 = 8 min); the dry run's are generous (a busy 2-core CPU)
BUDGETS_S = {"machine": 15, "kernel_tests": 130, "kernel_bench": 100, "train_step": 190, "sft_step": 45}
DRY_BUDGETS_S = {"machine": 60, "kernel_tests": 600, "kernel_bench": 600, "train_step": 600, "sft_step": 300}
# share of kernel_tests' budget per engine (triton and torch_compile compile; torch does not)
ENGINE_SHARE = {"triton": 0.45, "torch": 0.15, "torch_compile": 0.4}
# the real run's subset per engine (None: the whole file). torch_compile compiles a graph per option set
# (inductor, cold cache on a fresh machine: seconds each), so it takes every bf16 case and three fp32 ones.
ENGINE_K = {"torch_compile": "bf16 or (fp32 and (plain or default_reverse or everything))"}
PACKAGES = ("torch", "triton", "transformers", "trl", "liger-kernel", "accelerate", "hypothesis", "pytest",
            "pytest-benchmark", "math-verify", "pydantic", "numpy", "safetensors", "tokenizers", "pillow",
            "flash-attn", "vllm", "deepspeed")
ARCHIVE = "gpu_check_files.tar.gz"
ARCHIVE_FILE_CAP = 8 * 2**20  # files larger than this stay out of the archive ($OUT returns <= 16 MiB a file)
TAIL_CHARS = 3000


def _log(msg: str) -> None:
    print(f"[gpu-check] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------
# The models of the train and SFT steps: the public configs' numbers, written in code
# ---------------------------------------------------------------------------------------------------

def student_config(tokenizer: Any, *, tiny: bool = False, vocab_size: int = 151936) -> Any:
    """A ``Qwen2_5_VLConfig`` with Qwen/Qwen2.5-VL-3B-Instruct's architecture (its config.json: text 36 layers,
    hidden 2048, MLP 11008, 16 heads / 2 KV heads, M-RoPE sections 16/24/24, tied embeddings, 151936 rows; vision
    32 blocks of width 1280, MLP 3420, 16 heads, patch 14, merge 2, window 112, full attention in 7/15/23/31),
    with ``tokenizer``'s special-token ids. ``tiny``: the same architecture at 2 layers of width 32."""
    from transformers import Qwen2_5_VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    special = {"bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if tiny:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                      fullatt_block_indexes=[1])
    else:
        text = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                    num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                      fullatt_block_indexes=[7, 15, 23, 31])
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, max_position_embeddings=128000, rms_norm_eps=1e-6,
                         rope_theta=1000000.0, tie_word_embeddings=True, **text, **special),
        vision_config=dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           tokens_per_second=2, **vision),
        tie_word_embeddings=True, **ids, **special,
    )


def teacher_config(tokenizer: Any, *, tiny: bool = False, vocab_size: int = 151936) -> Any:
    """A ``Qwen3Config`` with Qwen/Qwen3-8B's architecture (its config.json: 36 layers, hidden 4096, MLP 12288,
    32 heads / 8 KV heads of dim 128, rope theta 1e6, untied head of 151936 rows), with ``tokenizer``'s
    special-token ids. ``tiny``: the same architecture at 2 layers of width 48."""
    from transformers import Qwen3Config

    special = {"bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    size = (dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=12) if tiny else
            dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128))
    return Qwen3Config(vocab_size=vocab_size, max_position_embeddings=40960, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, tie_word_embeddings=False, **size, **special)


TINY_VOCAB = 512  # the dry run's heads: more rows than the tokenizer's 107 tokens, like the real run's 151936


def write_models(root: Path, *, tiny: bool, device: str) -> dict[str, Path]:
    """Random student and teacher of :func:`student_config` / :func:`teacher_config` (initialised on ``device``,
    saved in bf16, or fp32 when ``tiny``), with vold's offline character tokenizer and processor
    (``vold.tiny``: no tokenizer is downloaded, so generated ids past its 107 tokens decode to nothing)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3ForCausalLM

    from vold.tiny import make_tiny_processor, make_tiny_tokenizer

    done = root / "complete.json"
    paths = {"student": root / "student", "teacher": root / "teacher"}
    if done.is_file() and json.loads(done.read_text()) == {"tiny": tiny}:
        return paths
    shutil.rmtree(root, ignore_errors=True)
    tokenizer = make_tiny_tokenizer()
    vocab = TINY_VOCAB if tiny else 151936
    dtype = torch.float32 if tiny else torch.bfloat16
    for name, cls, config in (
        ("student", Qwen2_5_VLForConditionalGeneration, student_config(tokenizer, tiny=tiny, vocab_size=vocab)),
        ("teacher", Qwen3ForCausalLM, teacher_config(tokenizer, tiny=tiny, vocab_size=vocab)),
    ):
        started = time.perf_counter()
        torch.manual_seed(0 if name == "student" else 1)
        with torch.device(device):
            model = cls._from_config(config, dtype=dtype)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(paths[name])
        (make_tiny_processor(tokenizer) if name == "student" else tokenizer).save_pretrained(paths[name])
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        _log(f"{name}: {params / 1e9:.3f} B parameters, written in {time.perf_counter() - started:.1f} s")
    done.write_text(json.dumps({"tiny": tiny}))
    return paths


def write_sft_data(path: Path, rows: int, response_chars: int) -> Path:
    """``rows`` text prompts with a ``trace`` of ``response_chars`` characters (= tokens for the char tokenizer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            body = f"Step {i}: 12 + {i} = {12 + i}. " * (response_chars // 16 + 1)
            f.write(json.dumps({"prompt": f"What is 12 + {i}? Answer in \\boxed{{}}.", "answer": str(12 + i),
                                "trace": body[: max(response_chars - 12, 1)] + f"\\boxed{{{12 + i}}}"}) + "\n")
    return path


@dataclass
class StepSetting:
    """The shapes of the train and SFT steps (real: the issue's; dry: tiny)."""

    device: str
    prompts: int
    rollouts: int
    new_tokens: int
    grad_accum: int
    sft_rows: int
    sft_response: int
    threads: int | None
    overrides: list[str] = field(default_factory=list)


def step_setting(dry_run: bool) -> StepSetting:
    if dry_run:
        # fp32 on the CPU (no bf16 autocast there), one thread (tiny models crawl with two on a busy machine)
        return StepSetting("cpu", 2, 2, 4, 1, 2, 24, 1,
                           ["model.dtype=float32", "model.autocast=null", "model.teacher_dtype=float32",
                            "model.gradient_checkpointing=false"])
    # bf16 weights (the paper's recipe keeps fp32 master weights under bf16 autocast: twice the student's
    # memory, load and save time, which the 8-minute budget has no room for)
    return StepSetting("cuda", 8, 5, 512, 2, 8, 512, None,
                       ["model.dtype=bfloat16", "model.autocast=null", "model.teacher_dtype=bfloat16"])


def trainer_overrides(s: StepSetting, models: dict[str, Path], data: dict[str, Path], out: Path) -> list[str]:
    """Overrides of configs/paper_qwen2_5_vl_3b_qwen3_8b.yaml for the train and SFT steps."""
    return [f"model.student={models['student']}", f"model.teacher={models['teacher']}",
            "model.local_files_only=true", "model.attn_implementation=sdpa", "model.vocab_size=null",
            "model.min_pixels=784", "model.max_pixels=3136",
            f"data.train_files=[{data['train']}]", f"data.eval_files=[{data['bench']}]",
            f"data.batch_size={s.prompts}", "rollout.engine=hf", f"rollout.num_generations={s.rollouts}",
            f"rollout.max_new_tokens={s.new_tokens}", f"optim.grad_accum={s.grad_accum}",
            "logging.tensorboard=false", "logging.progress=false", f"device={s.device}", f"output_dir={out}",
            *s.overrides]


def _cuda_peak() -> tuple[Callable[[], None], Callable[[], int | None]]:
    import torch

    if not torch.cuda.is_available():
        return (lambda: None), (lambda: None)
    return torch.cuda.reset_peak_memory_stats, torch.cuda.max_memory_allocated


def _prepare(work: Path, s: StepSetting, dry_run: bool) -> tuple[dict[str, Path], dict[str, Path]]:
    from vold.tiny import write_tiny_dataset

    models = write_models(work / "models", tiny=dry_run, device=s.device)
    data_dir = work / "data"
    data = {"train": write_tiny_dataset(data_dir, max(8, s.prompts), images=True, seed=1, filename="train.jsonl"),
            "bench": write_tiny_dataset(data_dir, 4, images=True, seed=2, filename="bench.jsonl")}
    return models, data


def child_train_step(out: Path, work: Path, dry_run: bool) -> dict[str, Any]:
    """One ``vold train`` step per estimator through ``benchmarks.step`` (its per-phase timings)."""
    from benchmarks import step as step_bench

    s = step_setting(dry_run)
    models, data = _prepare(work, s, dry_run)
    argv = ["--config", str(PAPER_CONFIG), "--no-tiny", "--steps", "1", "--warmup", "0", "--estimators", "full,k2",
            "--output", str(out), "--workdir", str(work / "step"), "--tag", "gpu_check", "--max-foreign-cpu", "-1",
            *(["--threads", str(s.threads)] if s.threads else []),
            *trainer_overrides(s, models, data, work / "step_unused")]
    result = step_bench.main(argv)
    rows = [{"estimator": r["estimator"], "step_seconds": r["step_seconds"],
             "peak_memory_allocated_bytes": r.get("peak_memory_allocated_bytes"),
             "generated_tokens": r["generated_tokens_per_step"], "prompt_tokens": r["prompt_tokens_per_step"],
             "phases_seconds": {name: p["seconds"] for name, p in r["phases"].items() if p["active"]},
             "run_seconds": r["run_seconds"]} for r in result["rows"]]
    return {"prompts": s.prompts, "rollouts": s.rollouts, "max_new_tokens": s.new_tokens, "rows": rows,
            "markdown": (out / "step_gpu_check.md").read_text()}


def child_sft_step(out: Path, work: Path, dry_run: bool) -> dict[str, Any]:
    """One ``vold sft`` step (the real ``vold.sft.train_sft``) of the same student."""
    from transformers.utils import logging as hf_logging

    from vold.config import load_config
    from vold.runs import read_jsonl
    from vold.sft import train_sft

    hf_logging.disable_progress_bar()
    s = step_setting(dry_run)
    models, data = _prepare(work, s, dry_run)
    traces = write_sft_data(work / "data" / "traces.jsonl", s.sft_rows, s.sft_response)
    run_dir = work / "sft_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [*trainer_overrides(s, models, data, run_dir), f"sft.train_files=[{traces}]", "sft.max_steps=1",
                 f"sft.batch_size={s.sft_rows}", "sft.grad_accum=1", f"sft.max_length={s.sft_response + 256}",
                 "sft.warmup_steps=0", "checkpoint.every=0", "checkpoint.resume=none", "logging.jsonl=true",
                 "logging.every=1"]
    cfg = load_config(PAPER_CONFIG, overrides)
    import torch

    threads = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    reset, peak = _cuda_peak()
    reset()
    started = time.perf_counter()
    try:
        train_sft(cfg)
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - started
    records = read_jsonl(run_dir / "sft" / "metrics.jsonl")
    shutil.rmtree(run_dir, ignore_errors=True)  # the final model (15 GB at the real shapes) is not needed
    if len(records) != 1:
        raise RuntimeError(f"expected 1 sft metrics record, found {len(records)}")
    record = records[0]
    return {"rows": s.sft_rows, "response_tokens": s.sft_response, "step_seconds": record["time/step"],
            "run_seconds": elapsed, "loss": record.get("train/loss"), "peak_memory_allocated_bytes": peak()}


def child_machine(out: Path, work: Path, dry_run: bool) -> dict[str, Any]:
    """The machine: GPU, driver, CUDA, library versions (and benchmarks.kernels' machine_info when it imports)."""
    import torch

    info: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable,
                            "versions": {name: _version(name) for name in PACKAGES},
                            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                            "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_bytes=props.total_memory,
                    compute_capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                    cudnn=torch.backends.cudnn.version())
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        info["driver"] = smi.stdout.split(",")[1].strip() if smi.returncode == 0 and "," in smi.stdout else None
    except (OSError, subprocess.SubprocessError) as error:
        info["nvidia_smi"], info["driver"] = f"not available: {error}", None
    try:
        from benchmarks.kernels import machine_info

        info["machine_info"] = machine_info(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    except Exception as error:  # noqa: BLE001 - the module is optional here (being restructured, say)
        info["machine_info"] = f"benchmarks.kernels.machine_info failed: {type(error).__name__}: {error}"
    if not dry_run and not torch.cuda.is_available():
        raise RuntimeError(f"torch.cuda.is_available() is False (torch {torch.__version__}, built for CUDA "
                           f"{torch.version.cuda}): run with --dry-run on a machine without a GPU")
    return info


CHILDREN: dict[str, Callable[[Path, Path, bool], dict[str, Any]]] = {
    "machine": child_machine, "train_step": child_train_step, "sft_step": child_sft_step,
}


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------
# Guarded subprocesses
# ---------------------------------------------------------------------------------------------------

def run_guarded(cmd: Sequence[str], budget_s: float, log: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` (from the repository root, its own process group) with stdout + stderr into ``log``; kill
    the whole group after ``budget_s``. Returns ``rc``, ``timed_out``, ``seconds`` and the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(list(cmd), cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        timed_out = False
        try:
            rc = proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = proc.returncode
    text = log.read_text(encoding="utf-8", errors="replace")
    return {"rc": rc, "timed_out": timed_out, "seconds": round(time.perf_counter() - started, 3),
            "log_tail": text[-TAIL_CHARS:]}


def _env(**changes: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


_PYTEST_LINE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.MULTILINE)


def parse_pytest(text: str) -> dict[str, Any]:
    """Counts per outcome and the failed test ids from ``pytest -v`` output (a killed run counts what it did)."""
    counts: dict[str, int] = {}
    failed: list[str] = []
    for test, outcome in _PYTEST_LINE.findall(text):
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
        if outcome in ("FAILED", "ERROR"):
            failed.append(test)
    collected = re.search(r"collected (\d+) items?(?: / (\d+) deselected)?(?: / (\d+) selected)?", text)
    return {"counts": counts, "failed_tests": failed,
            "selected": (int(collected.group(3) or int(collected.group(1)) - int(collected.group(2) or 0))
                         if collected else None)}


def _status(run: dict[str, Any]) -> str:
    if run["timed_out"]:
        return "timeout"
    return "ok" if run["rc"] == 0 else "failed"


# ---------------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------------

@dataclass
class Context:
    dry_run: bool
    work: Path
    parts_dir: Path
    budgets: dict[str, float]
    kernel_preset: str
    kernel_test_files: tuple[str, ...]
    engines: tuple[str, ...]
    kernel_tests_k: str | None


def part_kernel_tests(ctx: Context, out: Path) -> dict[str, Any]:
    """pytest on the kernel test files, once per engine, on the device (``VOLD_TEST_DEVICE``)."""
    device = "cpu" if ctx.dry_run else "cuda"
    shares = {e: ENGINE_SHARE.get(e, 1.0) for e in ctx.engines}
    total = sum(shares.values())
    engines: dict[str, Any] = {}
    for engine in ctx.engines:
        budget = ctx.budgets["kernel_tests"] * shares[engine] / total
        k = ctx.kernel_tests_k if ctx.kernel_tests_k is not None or ctx.dry_run else ENGINE_K.get(engine)
        cmd = [sys.executable, "-m", "pytest", *ctx.kernel_test_files, "-v", "-p", "no:cacheprovider", "--tb=short",
               "--color=no", "-o", "addopts=", *(["-k", k] if k else [])]
        # on the CPU the Triton engine runs under the interpreter; on CUDA the compiled kernels are tested
        env = _env(VOLD_TEST_DEVICE=device, VOLD_TEST_IMPLS=engine,
                   TRITON_INTERPRET="1" if ctx.dry_run else None)
        _log(f"kernel_tests[{engine}]: {' '.join(cmd[2:])} (VOLD_TEST_DEVICE={device}, {budget:.0f} s)")
        run = run_guarded(cmd, budget, out / f"pytest_{engine}.log", env)
        parsed = parse_pytest((out / f"pytest_{engine}.log").read_text(encoding="utf-8", errors="replace"))
        status = _status(run)
        if status == "ok" and not parsed["counts"].get("passed"):
            status = "failed"  # nothing ran (all skipped or deselected): not a pass
        # rc 1: tests failed; other non-zero codes (2 interrupted, 4 usage, 5 none collected, < 0 a signal)
        engines[engine] = {"status": status, "budget_s": round(budget, 1), "command": " ".join(cmd[2:]), "k": k,
                           "env": {"VOLD_TEST_DEVICE": device, "VOLD_TEST_IMPLS": engine}, **parsed,
                           **{k: run[k] for k in ("rc", "seconds", "timed_out")},
                           **({"log_tail": run["log_tail"]} if status != "ok" else {})}
        _log(f"kernel_tests[{engine}]: {status} {parsed['counts']} in {run['seconds']:.1f} s")
    worst = next((s for s in ("error", "failed", "timeout") if any(e["status"] == s for e in engines.values())), "ok")
    return {"status": worst, "files": list(ctx.kernel_test_files), "engines": engines}


def part_kernel_bench(ctx: Context, out: Path) -> dict[str, Any]:
    """``python -m benchmarks.kernels --preset <gpu | quick> --output <part folder>``: its JSON and table."""
    cmd = [sys.executable, "-m", "benchmarks.kernels", "--preset", ctx.kernel_preset, "--output", str(out)]
    _log(f"kernel_bench: {' '.join(cmd[2:])} ({ctx.budgets['kernel_bench']:.0f} s)")
    run = run_guarded(cmd, ctx.budgets["kernel_bench"], out / "kernels.log", _env())
    result: dict[str, Any] = {"status": _status(run), "command": " ".join(cmd[2:]),
                              **{k: run[k] for k in ("rc", "seconds", "timed_out")}}
    if run["rc"] == 2 and "invalid choice" in run["log_tail"] and "--preset" in run["log_tail"]:
        result["error"] = (f"benchmarks.kernels has no --preset {ctx.kernel_preset} in this checkout "
                           f"(python -m benchmarks.kernels --help lists its presets)")
    found = sorted(out.glob("kernels_*.json")) or sorted(out.glob("*.json"))  # the module's own naming
    if found:
        try:
            result["result"] = json.loads(found[0].read_text())
        except json.JSONDecodeError as error:
            result["result_error"] = f"{found[0].name}: {error}"
        md = found[0].with_suffix(".md")
        if md.is_file():
            result["markdown"] = md.read_text()
    elif result["status"] == "ok":
        result["status"], result["error"] = "failed", f"benchmarks.kernels wrote no JSON to {out}"
    if result["status"] != "ok":
        result["log_tail"] = run["log_tail"]
    return result


def _part_child(name: str) -> Callable[[Context, Path], dict[str, Any]]:
    """A part that runs ``CHILDREN[name]`` in ``python -m benchmarks.gpu_check --child name``."""

    def part(ctx: Context, out: Path) -> dict[str, Any]:
        result_file = out / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--child", name, "--output", str(out),
               "--workdir", str(ctx.work), *(["--dry-run"] if ctx.dry_run else [])]
        _log(f"{name}: child process ({ctx.budgets[name]:.0f} s)")
        run = run_guarded(cmd, ctx.budgets[name], out / f"{name}.log", _env())
        result: dict[str, Any] = {"status": _status(run), **{k: run[k] for k in ("rc", "seconds", "timed_out")}}
        if result_file.is_file():
            result.update(json.loads(result_file.read_text()))
        elif result["status"] == "ok":
            result["status"], result["error"] = "failed", f"the child wrote no {result_file.name}"
        if result["status"] != "ok":
            result["log_tail"] = run["log_tail"]
        return result

    part.__doc__ = CHILDREN[name].__doc__
    return part


PARTS: dict[str, Callable[[Context, Path], dict[str, Any]]] = {
    "machine": _part_child("machine"),
    "kernel_tests": part_kernel_tests,
    "kernel_bench": part_kernel_bench,
    "train_step": _part_child("train_step"),
    "sft_step": _part_child("sft_step"),
}


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------

def _gib(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**30:.2f} GiB"


def markdown(report: dict[str, Any]) -> str:
    parts = report["parts"]
    machine = parts.get("machine", {})
    versions = machine.get("versions", {})
    lines = [f"# vold GPU check{' (dry run, CPU)' if report['dry_run'] else ''}", "",
             f"{report['started']} - overall **{report['status']}** in {report['seconds']:.0f} s "
             f"(budget {sum(report['budgets_s'].values()):.0f} s).", ""]
    if machine.get("status") == "ok":
        lines.append(f"Machine: {machine.get('gpu') or 'no GPU'}"
                     + (f" ({_gib(machine.get('gpu_memory_bytes'))}, sm {machine.get('compute_capability')})"
                        if machine.get("gpu") else "")
                     + f"; driver {machine.get('driver')}; CUDA {machine.get('torch_cuda')}; Python "
                     f"{machine.get('python')}; " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".")
        lines.append("")
    lines += ["| part | status | seconds | budget s | summary |", "|---|---|---:|---:|---|"]
    for name, p in parts.items():
        lines.append(f"| {name} | {p['status']} | {p.get('seconds', 0):.1f} | {p.get('budget_s', 0):.0f} | "
                     f"{_summary(name, p)} |")
    tests = parts.get("kernel_tests", {})
    if tests.get("engines"):
        lines += ["", f"## Kernel tests on the device ({', '.join(tests['files'])})", "",
                  "| engine | tests (-k) | status | passed | failed | skipped | seconds | failed tests |",
                  "|---|---|---|---:|---:|---:|---:|---|"]
        for engine, e in tests["engines"].items():
            c = e.get("counts", {})
            lines.append(f"| {engine} | {e.get('k') or 'all'} | {e['status']} | {c.get('passed', 0)} | "
                         f"{c.get('failed', 0) + c.get('error', 0)} | {c.get('skipped', 0)} | "
                         f"{e.get('seconds', 0):.1f} | "
                         f"{', '.join(t.split('::')[-1] for t in e.get('failed_tests', [])[:8]) or '-'} |")
    for name in ("kernel_bench", "train_step"):
        if parts.get(name, {}).get("markdown"):
            lines += ["", f"## {name}", ""]  # the module's own report, its headings one level down
            lines += [("##" + ln if ln.startswith("#") else ln) for ln in parts[name]["markdown"].strip().splitlines()]
    failing = {n: p for n, p in parts.items() if p["status"] != "ok" and (p.get("error") or p.get("log_tail"))}
    for name, p in failing.items():
        lines += ["", f"## {name}: {p['status']}", ""]
        if p.get("error"):
            lines += [str(p["error"]), ""]
        if p.get("log_tail"):
            lines += ["```", p["log_tail"].strip()[-1500:], "```"]
    lines += ["", f"Files: {ARCHIVE} (each part's log and outputs); gpu_check.json (everything above).", ""]
    return "\n".join(lines)


def _summary(name: str, p: dict[str, Any]) -> str:
    if p["status"] == "skipped":
        return p.get("reason", "")
    if name == "machine":
        return f"{p.get('gpu') or 'CPU'}, torch {p.get('versions', {}).get('torch')}"
    if name == "kernel_tests" and p.get("engines"):
        return "; ".join(f"{e}: {v.get('counts', {}).get('passed', 0)} passed, "
                         f"{v.get('counts', {}).get('failed', 0) + v.get('counts', {}).get('error', 0)} failed"
                         for e, v in p["engines"].items())
    if name == "kernel_bench":
        return p.get("error") or p.get("command", "")
    if name == "train_step" and p.get("rows"):
        return "; ".join(f"{r['estimator']}: {r['step_seconds']:.2f} s/step, peak "
                         f"{_gib(r.get('peak_memory_allocated_bytes'))}" for r in p["rows"])
    if name == "sft_step" and "step_seconds" in p:
        return f"{p['step_seconds']:.2f} s/step, peak {_gib(p.get('peak_memory_allocated_bytes'))}"
    return str(p.get("error", ""))[:200]


def write_report(report: dict[str, Any], output: Path, parts_dir: Path) -> None:
    """gpu_check.json, gpu_check.md and the archive of the parts' folders (files over the cap left out)."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (output / "gpu_check.md").write_text(markdown(report))
    with tarfile.open(output / ARCHIVE, "w:gz") as tar:
        for path in sorted(parts_dir.rglob("*")):
            if path.is_file() and path.stat().st_size <= ARCHIVE_FILE_CAP:
                tar.add(path, arcname=str(path.relative_to(parts_dir)))


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every part on the CPU at tiny shapes")
    p.add_argument("--output", type=Path, default=None,
                   help="folder for gpu_check.json/.md and the archive (default: $OUT when set, else "
                        "benchmarks/results/gpu_check/)")
    p.add_argument("--workdir", type=Path, help="models and runs (default: a temporary folder, removed afterwards)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma list of parts to run (default: all: {','.join(PARTS)})")
    p.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS",
                   help="a part's time budget (repeatable); defaults: "
                        + ", ".join(f"{k}={v}" for k, v in BUDGETS_S.items()))
    p.add_argument("--engines",
                   help=f"kernel_tests engines (default: {','.join(ENGINES)}; dry run {','.join(DRY_ENGINES)})")
    p.add_argument("--kernel-preset", help="benchmarks.kernels preset (default: gpu; dry run quick)")
    p.add_argument("-k", dest="kernel_tests_k",
                   help="pytest -k for kernel_tests, every engine (default: the whole file, torch_compile a subset: "
                        "ENGINE_K; dry run a few cases)")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.parts = [x for x in (y.strip() for y in args.parts.split(",")) if x]
    bad = [x for x in args.parts if x not in PARTS]
    if bad or not args.parts:
        p.error(f"--parts: {bad or args.parts} not in {tuple(PARTS)}")
    budgets = dict(DRY_BUDGETS_S if args.dry_run else BUDGETS_S)
    for item in args.budget:
        name, _, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if name not in budgets or seconds <= 0:
            p.error(f"--budget {item!r}: expected PART=SECONDS with PART in {tuple(budgets)} and SECONDS > 0")
        budgets[name] = seconds
    args.budgets = budgets
    engines = args.engines.split(",") if args.engines else list(DRY_ENGINES if args.dry_run else ENGINES)
    if [e for e in engines if e not in ENGINES] or not engines:
        p.error(f"--engines: {engines} must be a comma list of {ENGINES}")
    args.engines = tuple(engines)
    args.kernel_preset = args.kernel_preset or ("quick" if args.dry_run else "gpu")
    if args.kernel_tests_k is None and args.dry_run:
        args.kernel_tests_k = DRY_KERNEL_TESTS
    if args.output is None:
        args.output = Path(os.environ["OUT"]) if os.environ.get("OUT") and args.child is None else DEFAULT_OUTPUT
    return args


def _default_workdir(dry_run: bool) -> tempfile.TemporaryDirectory:
    """/dev/shm when it has room for the real run's models (about 24 GB in bf16, 15 GB more for the SFT save)."""
    shm = Path("/dev/shm")
    room = shutil.disk_usage(shm).free if shm.is_dir() else 0
    where = str(shm) if not dry_run and room > 60 * 2**30 else None
    return tempfile.TemporaryDirectory(prefix="vold_gpu_check_", dir=where)


def run_child(args: argparse.Namespace) -> int:
    """``--child NAME``: run ``CHILDREN[NAME]`` in this process and write ``result.json`` to ``--output``."""
    args.output.mkdir(parents=True, exist_ok=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vold_gpu_check_"))
    result = CHILDREN[args.child](args.output, work, args.dry_run)
    (args.output / "result.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the parts; write the report after each one; return it (``status``: ok when every part is ok)."""
    args = parse_args(argv)
    if args.child:
        raise SystemExit(run_child(args))
    temp = None
    if args.workdir is None:
        temp = _default_workdir(args.dry_run)
        work = Path(temp.name)
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
    parts_dir = work / "parts"
    ctx = Context(args.dry_run, work, parts_dir, args.budgets, args.kernel_preset, KERNEL_TEST_FILES, args.engines,
                  args.kernel_tests_k)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "tool": "python -m benchmarks.gpu_check", "argv": list(sys.argv[1:] if argv is None else argv),
        "dry_run": args.dry_run, "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "budgets_s": {k: v for k, v in args.budgets.items() if k in args.parts}, "status": "running", "seconds": 0.0,
        "parts": {},
    }
    _log(f"{'dry run (CPU)' if args.dry_run else 'GPU'}: parts {', '.join(args.parts)}; output {args.output}; "
         f"work {work}")
    try:
        for name in PARTS:
            if name not in args.parts:
                continue
            out = parts_dir / name
            out.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            try:
                result = PARTS[name](ctx, out)
            except Exception as error:  # noqa: BLE001 - a broken part is recorded, the next one still runs
                result = {"status": "error", "error": f"{type(error).__name__}: {error}",
                          "log_tail": traceback.format_exc()[-TAIL_CHARS:]}
            result["seconds"] = round(time.perf_counter() - t0, 3)
            result["budget_s"] = args.budgets[name]
            report["parts"][name] = result
            report["seconds"] = round(time.perf_counter() - started, 3)
            _log(f"{name}: {result['status']} in {result['seconds']:.1f} s")
            write_report(report, args.output, parts_dir)
        statuses = [p["status"] for p in report["parts"].values()]
        report["status"] = "ok" if all(s == "ok" for s in statuses) else "failed"
        report["seconds"] = round(time.perf_counter() - started, 3)
        write_report(report, args.output, parts_dir)
    finally:
        if temp is not None:
            temp.cleanup()
    _log(f"{report['status']} in {report['seconds']:.0f} s: wrote {args.output / 'gpu_check.json'}, "
         f"{args.output / 'gpu_check.md'}, {args.output / ARCHIVE}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["status"] == "ok" else 1)
