"""Stage 0, ``vold make-traces``: the teacher writes reasoning traces on text-only prompts.

JSONL in (``prompt``, ``answer``, optional ``teacher_prompt``; other columns kept) -> JSONL out, one
row per kept trace: the input row plus ``trace`` (the teacher's decoded completion), ``trace_tokens``
(its length in teacher tokens, EOS excluded) and ``correct``. The teacher reads ``teacher_prompt``
when a row has one, else ``prompt``, through its own chat template. Per prompt it samples
``traces.num_samples`` traces; a trace is kept when

    finished with EOS                          (traces.drop_truncated)
    min_tokens <= trace_tokens <= max_tokens   (the length filter)
    math_equal(last \\boxed{} of the trace, answer)  (traces.filter_correct)

up to ``traces.keep_per_prompt`` per prompt, in sampling order. Every trace not kept goes to
``traces/dropped.jsonl`` with its reason (``dropped``: truncated, length, incorrect, over_keep_per_prompt),
and the printed report says how many were dropped for each reason. Batch ``b`` samples with seed
``seed + b``: the same config writes the same file.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from vold.config import Config
from vold.data import Example, build_prompt_batch, load_examples, require_rows
from vold.models import check_model_path, resolve_device, teacher_from_config
from vold.rewards import accuracy_reward
from vold.rollout.hf import HFRolloutEngine
from vold.runs import print_start, progress_bar, run_dir, start_run


def output_file(cfg: Config) -> Path:
    """Where the traces go: ``traces.output_file``, default ``{output_dir}/traces/traces.jsonl``."""
    return Path(cfg.traces.output_file) if cfg.traces.output_file else run_dir(cfg, "traces") / "traces.jsonl"


def check_output_free(cfg: Config) -> None:
    """Refuse to overwrite an earlier make-traces' output (``traces.output_file``, and the run folder's
    ``stats.json`` / ``dropped.jsonl``, with its ``config.yaml``) unless ``overwrite_output_dir``
    (``vold make-traces --overwrite``), as :func:`vold.runs.prepare_run` refuses a run folder that holds a run.
    Raises ValueError naming the paths."""
    path, run = output_file(cfg), run_dir(cfg, "traces")
    if path.is_dir():
        raise ValueError(f"traces.output_file={path} is a folder; name the JSONL file to write")
    earlier = [str(p) for p in (path, run / DROPPED_FILE, run / STATS_FILE) if p.exists()]
    if earlier and (run / "config.yaml").exists():  # alone (a run stopped before its output) it is no result
        earlier.append(str(run / "config.yaml"))
    if earlier and not cfg.overwrite_output_dir:
        raise ValueError(f"make-traces would overwrite {', '.join(earlier)} (traces.output_file, default "
                         f"{{output_dir}}/traces/traces.jsonl): replace them with --overwrite (overwrite_output_dir="
                         f"true), or set another traces.output_file or output_dir")


def teacher_view(example: Example) -> Example:
    """The example as the text-only teacher reads it: its ``teacher_prompt`` (or prompt), no images."""
    if example.images and example.teacher_prompt is None:
        raise ValueError(f"{example.where}: make-traces needs text-only prompts, but this row has an image and no "
                         f"'teacher_prompt' describing it")
    return replace(example, prompt=example.teacher_prompt or example.prompt, images=[])


def trace_row(example: Example, trace: str, tokens: int, correct: bool) -> dict[str, Any]:
    """The output row: the input's columns (image paths kept, for the student's SFT) and the trace."""
    row: dict[str, Any] = {"prompt": example.prompt, "answer": example.answer}
    if example.images:
        if not all(isinstance(ref, str) for ref in example.images):
            raise ValueError(f"{example.where}: images given as bytes cannot be written to JSONL; use file paths")
        row["images"] = list(example.images)
    for key in ("teacher_prompt", "data_source"):
        if getattr(example, key) is not None:
            row[key] = getattr(example, key)
    return {**row, **example.extra, "trace": trace, "trace_tokens": tokens, "correct": correct}


def make_traces(cfg: Config) -> Path:
    """Generate, filter and write the traces; returns the JSONL path (stats in ``stats.json`` beside the run)."""
    tc, data = cfg.traces, cfg.data
    # every check on the user's input comes before the run folder is written
    check_output_free(cfg)
    files = tc.input_files or data.train_files
    if not files:
        raise ValueError("no prompts: set traces.input_files (or data.train_files)")
    examples = load_examples(files, image_root=data.image_root, check_images=False,
                             prompt_column=data.prompt_column, answer_column=data.answer_column)
    examples = examples[:tc.max_examples] if tc.max_examples is not None else examples
    require_rows(examples, files, 1, "make-traces")
    views = [teacher_view(e) for e in examples]
    check_model_path(cfg.model.teacher, "model.teacher", local_files_only=cfg.model.local_files_only)
    device = resolve_device(cfg.device)
    run = start_run(cfg, "traces")
    print_start("make-traces", start_from=cfg.model.teacher, run=run, examples=len(examples), files=files,
                extra={"traces per prompt": f"{tc.num_samples} sampled, at most {tc.keep_per_prompt} kept",
                       "output file": output_file(cfg)})
    teacher, tokenizer = teacher_from_config(cfg.model, device)
    engine = HFRolloutEngine(teacher, tokenizer)
    system_prompt = data.teacher_system_prompt if data.teacher_system_prompt is not None else data.system_prompt

    stats = {"prompts": len(examples), "generated": 0, "kept": 0, "prompts_with_trace": 0, "dropped_truncated": 0,
             "dropped_length": 0, "dropped_incorrect": 0, "dropped_over_keep_per_prompt": 0}
    rows: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []  # every trace not kept, with the reason: traces/dropped.jsonl
    bar = progress_bar(len(examples), desc="make-traces", enabled=cfg.logging.progress)
    for b, start in enumerate(range(0, len(examples), tc.batch_size)):
        chunk, chunk_views = examples[start:start + tc.batch_size], views[start:start + tc.batch_size]
        batch = build_prompt_batch(chunk_views, tokenizer, system_prompt=system_prompt)
        with torch.no_grad():
            rollout = engine.generate(batch, tc.num_samples, tc.max_new_tokens, temperature=tc.temperature,
                                      top_p=tc.top_p, seed=cfg.seed + b)
        answers = [e.answer for e in chunk for _ in range(tc.num_samples)]
        correct = accuracy_reward(rollout.texts, answers)
        lengths = (rollout.lengths - rollout.finished.long()).tolist()  # EOS excluded
        for i, example in enumerate(chunk):
            kept = 0
            for j in range(i * tc.num_samples, (i + 1) * tc.num_samples):
                stats["generated"] += 1
                reason = None
                if tc.drop_truncated and not bool(rollout.finished[j]):
                    reason = "truncated"
                elif lengths[j] < tc.min_tokens or (tc.max_tokens is not None and lengths[j] > tc.max_tokens):
                    reason = "length"
                elif tc.filter_correct and correct[j] != 1.0:
                    reason = "incorrect"
                elif kept < tc.keep_per_prompt:
                    rows.append(trace_row(example, rollout.texts[j], lengths[j], correct[j] == 1.0))
                    kept += 1
                else:
                    reason = "over_keep_per_prompt"
                if reason is not None:
                    stats[f"dropped_{reason}"] = stats.get(f"dropped_{reason}", 0) + 1
                    dropped.append({**trace_row(example, rollout.texts[j], lengths[j], correct[j] == 1.0),
                                    "dropped": reason})
            stats["kept"] += kept
            stats["prompts_with_trace"] += int(kept > 0)
        bar.update(len(chunk))
        bar.set_postfix(kept=stats["kept"])
    bar.close()

    path = output_file(cfg)
    write_jsonl_atomic(path, rows)
    write_jsonl_atomic(run / DROPPED_FILE, dropped)
    (run / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    print(traces_report(stats, path, run / DROPPED_FILE, cfg))
    return path


DROPPED_FILE = "dropped.jsonl"
STATS_FILE = "stats.json"
DROP_REASONS = {  # stats key -> why, and the key that controls it
    "dropped_truncated": "truncated at traces.max_new_tokens (no final answer; traces.drop_truncated)",
    "dropped_length": "outside traces.min_tokens..traces.max_tokens",
    "dropped_incorrect": "without a \\boxed{} answer equal to the row's answer (traces.filter_correct)",
    "dropped_over_keep_per_prompt": "beyond traces.keep_per_prompt for their prompt",
}


def write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def traces_report(stats: dict[str, int], path: Path, dropped: Path, cfg: Config) -> str:
    """What ``make-traces`` prints: kept of generated, why the others were dropped (with the key that decides),
    where they are, and, when nothing was kept, that ``vold sft`` has nothing to train on."""
    lines = [f"make-traces: kept {stats['kept']} of {stats['generated']} traces "
             f"({stats['prompts_with_trace']}/{stats['prompts']} prompts) -> {path}"]
    reasons = [f"  {stats[key]} {why}" for key, why in DROP_REASONS.items() if stats.get(key)]
    if reasons:
        lines += [f"dropped {stats['generated'] - stats['kept']} (each with its reason in {dropped}):", *reasons]
    if stats["kept"] == 0:
        lines.append(f"warning: no trace was kept, so `vold sft` has nothing to train on ({path} is empty); read "
                     f"{dropped}, then raise traces.max_new_tokens / traces.num_samples or relax the filters")
    elif stats["kept"] < cfg.sft.batch_size * cfg.sft.grad_accum:
        lines.append(f"warning: {stats['kept']} traces are fewer than one `vold sft` step "
                     f"(sft.batch_size * sft.grad_accum = {cfg.sft.batch_size * cfg.sft.grad_accum})")
    return "\n".join(lines)
