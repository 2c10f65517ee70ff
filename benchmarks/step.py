"""Trainer step benchmark: tokens/s of one full ``vold train`` step (GRPO + on-policy distillation) and
where its time goes, phase by phase, as verl reports it (``timing_s/*``).

Each estimator row runs the real trainer, :func:`vold.rl.train_rl`, for ``--warmup + --steps`` steps
(no checkpoints, no SFT start) and reads the per-phase seconds it logs in ``metrics.jsonl``
(``time/<phase>``, filled by ``rollout_step`` / ``add_scores`` / ``optimize``, CUDA-synchronised around
each phase; ``vold.rl.PHASES``):

- prompts         prompt batch: chat template, tokenizer, image processor
- gen             generation (rollout): the rollout engine samples G completions per prompt
- reward          reward functions, group advantages, distillation weights
- teacher         teacher forward over the completions (no grad); "full" keeps hidden states, k1/k2/k3 log-probs
- old_log_prob    old-policy log-probs (only when optim.ppo_epochs * optim.minibatches > 1)
- ref             reference log-probs (only when loss.ref_kl_coef != 0)
- update_actor    policy update: forward + backward of every micro-batch, grad clipping, AdamW
- update_weights  the rollout engine's weight sync after each update (a no-op for the HF engine)
- other           the rest of the step (the Experience, metrics): step time minus the phases above

Reported per phase: seconds per step (median over the steps after the warm-up), share of the step time,
and tokens/s where meaningful (median over steps of the per-step rate): generated tokens/s for
generation (completion tokens, EOS included, padding not), scored tokens/s for teacher / old / ref
(the completion tokens that get a log-prob; the forward also runs over the prompt) and for the update
(times optim.ppo_epochs: each token goes through forward + backward that many times). The step row gives
generated tokens/s of the whole step; the JSON also has (prompt + completion) tokens/s, verl's
``perf/throughput`` on one device.

Default: the tiny CPU setting (configs/tiny_cpu.yaml, a random tiny Qwen2.5-VL student and Qwen3 teacher
written to a temporary folder by vold.testing.prepare_tiny_run), 10 steps after 1 warm-up step, the
distillation estimators "full" and "k2". Real models: --config a YAML with model paths (e.g. on a GPU).

On a shared machine each row first waits (at most --quiet-timeout s) until other processes leave the
benchmark's threads their cores (--max-foreign-cpu); the other processes' mean CPU use during each row is
reported beside it (a whole run of train_rl is timed at once: a disturbed step cannot be re-timed).

Outputs in --output (default benchmarks/results/): step_<tag>.json (machine, config, per-step records,
summary) and step_<tag>.md (the table, also printed); <tag> defaults to the device type (cpu / cuda).

Examples:
  python -m benchmarks.step                                   # tiny models on the CPU, 1 thread (< 1 min)
  vold bench step optim.minibatches=2 loss.ref_kl_coef=0.01   # old-policy and reference passes too
  vold bench step --config configs/paper_qwen2_5_vl_3b_qwen3_8b.yaml --steps 3 rollout.max_new_tokens=256
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vold.config import Config, load_config
from vold.kernels.policy_loss import DISTILL_ESTIMATORS
from vold.models import resolve_device
from vold.rl import PHASES, train_rl
from vold.runs import read_jsonl
from vold.testing import prepare_tiny_run, tiny_overrides

from .harness import CpuMonitor, machine_info, modified_files, write_result

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO_ROOT / "configs" / "tiny_cpu.yaml"
OTHER = "other"
LABELS = {
    "prompts": "prompt batch (template, tokenizer, images)",
    "gen": "generation (rollout)",
    "reward": "reward + advantages",
    "teacher": "teacher forward",
    "old_log_prob": "old-policy log-probs",
    "ref": "reference log-probs",
    "update_actor": "policy update (fwd + bwd + optimizer)",
    "update_weights": "rollout weight sync",
    OTHER: "other (bookkeeping)",
}
# phase -> the tokens its tokens/s counts: "generated" or "scored" (completion tokens per step)
TOKENS_OF = {"gen": "generated", "teacher": "scored", "old_log_prob": "scored", "ref": "scored",
             "update_actor": "scored"}
WHEN_OFF = {
    "teacher": "off (loss.distill_coef = 0)",
    "old_log_prob": "off (ppo_epochs * minibatches = 1: on-policy)",
    "ref": "off (loss.ref_kl_coef = 0)",
}


def _log(msg: str) -> None:
    print(f"[step-bench] {msg}", flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vold bench step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="trainer YAML (default: configs/tiny_cpu.yaml with --tiny)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (after the config)")
    p.add_argument("--steps", type=int, default=10, help="measured steps per estimator (default 10)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    p.add_argument("--estimators", default="full,k2",
                   help=f"comma list of loss.distill_estimator values, one row each ({','.join(DISTILL_ESTIMATORS)}; "
                        f"default full,k2)")
    tiny = p.add_mutually_exclusive_group()
    tiny.add_argument("--tiny", dest="tiny", action="store_true", default=None,
                      help="write the tiny models and data (vold.testing.prepare_tiny_run) to the work folder and "
                           "point the config at them (default when --config is not given)")
    tiny.add_argument("--no-tiny", dest="tiny", action="store_false", help="use the config's model and data paths")
    p.add_argument("--threads", type=int,
                   help="torch.set_num_threads for the run (default: 1 with --tiny, whose models gain nothing from "
                        "threads and crawl with 2 on a busy machine; else torch's default)")
    p.add_argument("--max-foreign-cpu", type=float,
                   help="before each row, wait until other processes use at most this many cores (default: the "
                        "cores left after --threads; negative: never wait)")
    p.add_argument("--quiet-timeout", type=float, default=60.0,
                   help="longest wait (s) for that before each row (default 60)")
    p.add_argument("--workdir", type=Path, help="folder for the tiny models and the runs (default: a temporary "
                                                 "folder, removed afterwards); each run's final model is removed "
                                                 "after its row")
    p.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results",
                   help="output directory (default: benchmarks/results/)")
    p.add_argument("--tag", help="file name tag: step_<tag>.json/.md (default: the device type, cpu or cuda)")
    args = p.parse_intermixed_args(argv)  # overrides may come before or after the options
    args.estimators = [e.strip() for e in args.estimators.split(",") if e.strip()]
    bad = [e for e in args.estimators if e not in DISTILL_ESTIMATORS]
    if bad or not args.estimators:
        p.error(f"--estimators: {bad or args.estimators} not in {DISTILL_ESTIMATORS}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.tiny is None:
        args.tiny = args.config is None
    if args.threads is None and args.tiny:
        args.threads = 1
    if args.max_foreign_cpu is None:
        args.max_foreign_cpu = max(0.5, (os.cpu_count() or 1) - (args.threads or torch.get_num_threads()))
    return args


def bench_config(args: argparse.Namespace, estimator: str, out_dir: Path, tiny: dict[str, Path] | None) -> Config:
    """The trainer config of one row: the YAML, the tiny paths, ``sft.enabled=false`` (start from
    model.student; the user's overrides may change it), the user's overrides, then what the benchmark
    needs: the step count, the estimator, a fresh run with no checkpoints, and JSONL metrics every step."""
    config = args.config or TINY_CONFIG
    overrides = ["sft.enabled=false", *(tiny_overrides(tiny, out_dir) if tiny else []), *args.overrides,
                 f"optim.max_steps={args.warmup + args.steps}", f"loss.distill_estimator={estimator}",
                 f"output_dir={out_dir}", "checkpoint.every=0", "checkpoint.resume=none", "overwrite_output_dir=true",
                 "logging.every=1", "logging.jsonl=true", "logging.progress=false", "logging.tensorboard=false",
                 "logging.wandb=false"]
    return load_config(config, overrides)


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def summarise(records: list[dict[str, Any]], cfg: Config, warmup: int) -> dict[str, Any]:
    """Per-phase medians, shares and tokens/s over the measured steps (the records after ``warmup``)."""
    measured = records[warmup:]
    step_s = _median([r["time/step"] for r in measured])
    generated = [r["completion/tokens"] for r in measured]
    prompt = [r["prompt/tokens"] for r in measured]
    tokens = {"generated": generated, "scored": generated}
    epochs = cfg.optim.ppo_epochs
    phases: dict[str, dict[str, Any]] = {}
    for phase in PHASES:
        key = f"time/{phase}"
        active = any(key in r for r in measured)
        seconds = [float(r.get(key, 0.0)) for r in measured]
        row: dict[str, Any] = {"label": LABELS[phase], "active": active, "seconds": _median(seconds),
                               "share": _median(seconds) / step_s if step_s > 0 else 0.0,
                               "tokens": TOKENS_OF.get(phase), "tokens_per_s": None}
        if active and phase in TOKENS_OF:
            scale = epochs if phase == "update_actor" else 1
            rates = [n * scale / t for n, t in zip(tokens[TOKENS_OF[phase]], seconds, strict=True) if t > 0]
            row["tokens_per_s"] = _median(rates) if rates else None
        phases[phase] = row
    rest = [r["time/step"] - sum(r.get(f"time/{p}", 0.0) for p in PHASES) for r in measured]
    phases[OTHER] = {"label": LABELS[OTHER], "active": True, "seconds": max(0.0, _median(rest)),
                     "share": max(0.0, _median(rest)) / step_s if step_s > 0 else 0.0, "tokens": None,
                     "tokens_per_s": None}
    steps = [r["time/step"] for r in measured]
    return {
        "step_seconds": step_s, "step_seconds_min": min(steps), "step_seconds_max": max(steps),
        "generated_tokens_per_step": _median(generated), "prompt_tokens_per_step": _median(prompt),
        "generated_tokens_per_s": _median([n / t for n, t in zip(generated, steps, strict=True)]),
        "total_tokens_per_s": _median([(n + m) / t for n, m, t in zip(generated, prompt, steps, strict=True)]),
        "phases": phases,
    }


def run_estimator(args: argparse.Namespace, estimator: str, work: Path, tiny: dict[str, Path] | None,
                  monitor: CpuMonitor) -> dict[str, Any]:
    """One row: ``train_rl`` for warmup + steps steps, then its logged timings."""
    out_dir = work / f"run_{estimator}"
    cfg = bench_config(args, estimator, out_dir, tiny)
    waited = monitor.wait_quiet(args.max_foreign_cpu, args.quiet_timeout)
    _log(f"{estimator}: {cfg.optim.max_steps} steps of vold train ({args.warmup} warm-up) in {out_dir}"
         + (f" (waited {waited:.1f} s for a quieter machine)" if waited > 0.5 else ""))
    before = monitor.snapshot()
    cuda = resolve_device(cfg.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    train_rl(cfg)
    elapsed = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if cuda else None  # the whole run: models, rollouts, updates
    foreign = monitor.foreign(before, monitor.snapshot())
    records = read_jsonl(out_dir / "rl" / "metrics.jsonl")
    # the run's final model is not needed (only its metrics are): real models would fill the disk row by row
    shutil.rmtree(out_dir / "rl" / "final", ignore_errors=True)
    if len(records) != cfg.optim.max_steps:
        raise RuntimeError(f"{estimator}: expected {cfg.optim.max_steps} metric records, found {len(records)}")
    steps = [{"step": r["step"], "warmup": i < args.warmup,
              **{k: v for k, v in r.items() if k.startswith(("time/", "completion/tokens", "prompt/tokens"))}}
             for i, r in enumerate(records)]
    summary = summarise(records, cfg, args.warmup)
    _log(f"{estimator}: {summary['step_seconds']:.3f} s/step, {summary['generated_tokens_per_s']:.1f} generated "
         f"tokens/s (run {elapsed:.1f} s incl. loading, other processes {foreign:.2f} cores)")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"estimator": estimator, "config": dataclasses.asdict(cfg), "run_seconds": elapsed,
            "foreign_cpu_cores": round(foreign, 3), "waited_for_quiet_s": waited, "steps": steps,
            "peak_memory_allocated_bytes": peak, **summary}


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _display_path(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _fmt_rate(x: float | None, kind: str | None) -> str:
    return "-" if x is None else f"{x:,.0f} {kind}"


def markdown(result: dict[str, Any]) -> str:
    m, rows = result["machine"], result["rows"]
    cfg = rows[0]["config"]
    model, rollout, optim = cfg["model"], cfg["rollout"], cfg["optim"]
    updates = optim["ppo_epochs"] * optim["minibatches"]
    device = m["gpu"] or f"CPU ({m['cpu']}, {_n(m['cpu_count'], 'core')}, {_n(m['torch_threads'], 'torch thread')})"
    lines = [
        f"# Trainer step benchmark ({result['tag']})",
        "",
        f"One `vold train` step (GRPO + on-policy distillation, the real `vold.rl` functions) on "
        f"{result['models']}: {cfg['data']['batch_size']} prompts x G={rollout['num_generations']} completions, "
        f"max_new_tokens={rollout['max_new_tokens']}, {_n(updates, 'update')} per step "
        f"(ppo_epochs={optim['ppo_epochs']}, minibatches={optim['minibatches']}, grad_accum={optim['grad_accum']}), "
        f"ref_kl_coef={cfg['loss']['ref_kl_coef']}, dtype {model['dtype']}"
        f"{', autocast ' + model['autocast'] if model['autocast'] else ''}, rollout engine {rollout['engine']}.",
        f"Median over {_n(result['steps'], 'step')} after {_n(result['warmup'], 'warm-up step')}. {device}; "
        f"torch {m['torch']}; {m['date']}.",
        "",
        "| estimator | phase | s / step | share of step | tokens/s |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        est = row["estimator"]
        for phase, p in row["phases"].items():
            if not p["active"]:
                lines.append(f"| {est} | {p['label']} | - | - | {WHEN_OFF.get(phase, 'off')} |")
                continue
            lines.append(f"| {est} | {p['label']} | {p['seconds']:.4f} | {100 * p['share']:.1f}% | "
                         f"{_fmt_rate(p['tokens_per_s'], p['tokens'])} |")
        lines.append(f"| {est} | **step** | **{row['step_seconds']:.4f}** | 100% | "
                     f"**{row['generated_tokens_per_s']:,.0f} generated** |")
    lines += ["", "Tokens per step (median) and the machine while it ran:", "",
              "| estimator | prompt tokens | generated tokens | (prompt + generated) tokens/s | step s (min-max) | "
              "other processes (cores) | peak GPU memory |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        peak = row.get("peak_memory_allocated_bytes")
        lines.append(f"| {row['estimator']} | {row['prompt_tokens_per_step']:,.0f} | "
                     f"{row['generated_tokens_per_step']:,.0f} | {row['total_tokens_per_s']:,.0f} | "
                     f"{row['step_seconds_min']:.3f}-{row['step_seconds_max']:.3f} | {row['foreign_cpu_cores']:.2f} | "
                     f"{'-' if peak is None else f'{peak / 2**30:.2f} GiB'} |")
    lines += ["", "tokens/s: generated = completion tokens (EOS included) per second of generation; scored = "
              "completion tokens that get a log-prob per second of that pass (x ppo_epochs for the update). "
              "Share: of the median step time; the phases' medians need not add up to exactly 100%.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; write step_<tag>.json and .md; print the table; return the result dictionary."""
    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
    hf_logging.disable_progress_bar()
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    temp = None
    try:
        if args.workdir is None:
            temp = tempfile.TemporaryDirectory(prefix="vold_step_bench_")
            work = Path(temp.name)
        else:
            work = args.workdir
            work.mkdir(parents=True, exist_ok=True)
        tiny = prepare_tiny_run(work / "tiny") if args.tiny else None
        first = bench_config(args, args.estimators[0], work / "probe", tiny)
        device = resolve_device(first.device)
        monitor = CpuMonitor()
        load = os.getloadavg() if hasattr(os, "getloadavg") else None
        _log(f"{len(args.estimators)} row(s) on {device}, {args.warmup} + {args.steps} steps each, "
             f"{torch.get_num_threads()} torch threads, load average {load}")
        rows = [run_estimator(args, estimator, work, tiny, monitor) for estimator in args.estimators]
    finally:
        if args.threads is not None:
            torch.set_num_threads(threads)
        if temp is not None:
            temp.cleanup()
    machine = machine_info(device)
    machine["torch_threads"] = args.threads if args.threads is not None else threads
    machine["load_average_at_start"] = load
    machine["git_modified"] = modified_files()
    models = ("tiny Qwen2.5-VL student + tiny Qwen3 teacher (random weights)" if args.tiny
              else f"{first.model.student} + teacher {first.model.teacher}")
    result = {"tag": args.tag or device.type, "machine": machine, "models": models,
              "config_file": _display_path(args.config or TINY_CONFIG), "overrides": args.overrides, "tiny": args.tiny,
              "steps": args.steps, "warmup": args.warmup, "phases": {**dict(PHASES), OTHER: LABELS[OTHER]},
              "rows": rows}
    text = markdown(result)
    json_path, md_path = write_result(result, text, args.output, f"step_{result['tag']}")
    print(text)
    _log(f"wrote {json_path}, {md_path}")
    return result


if __name__ == "__main__":
    main()
