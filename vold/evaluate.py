"""``vold eval``: accuracy on JSONL benchmarks (an image path or none, a question, an answer).

Each file is one benchmark (named after the file). For each question the model samples
k = ``eval.num_samples`` completions at ``eval.temperature``; a completion is correct when its last
``\\boxed{}`` equals the answer (``math_equal``). With c correct out of k:

    pass@1 = 1[first completion correct]   one sample's accuracy
    mean@k = c / k                          the k-sample estimate of pass@1 (less noisy)
    pass@k = 1[c > 0]

averaged over the questions of each benchmark and over all of them. Writes, in ``eval.output_dir``
(default ``{output_dir}/eval/{model}``, one folder per model: :func:`output_dir`): ``samples.jsonl``
(every completion, its extracted answer and verdict), ``summary.json`` and ``summary.md`` (the table,
also printed). An empty benchmark file is an error naming the file.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from vold.config import Config, save_config
from vold.data import build_prompt_batch, is_multimodal, load_examples, require_rows
from vold.models import autocast, check_model_path, resolve_device, student_from_config
from vold.rewards import accuracy_reward, extract_boxed
from vold.rollout import make_rollout_engine
from vold.runs import print_start, progress_bar, run_dir, seed_everything

COLUMNS = ("n", "pass@1", "mean@k", "pass@k", "mean_length", "truncated")


def summarize(records: list[dict[str, Any]]) -> dict[str, float]:
    """The table row of a list of per-question records."""
    n = len(records)
    if n == 0:
        return dict.fromkeys(COLUMNS, 0.0)
    return {
        "n": n,
        "pass@1": sum(r["correct"][0] for r in records) / n,
        "mean@k": sum(r["mean@k"] for r in records) / n,
        "pass@k": sum(any(r["correct"]) for r in records) / n,
        "mean_length": sum(sum(r["lengths"]) / len(r["lengths"]) for r in records) / n,
        "truncated": sum(r["truncated"] / len(r["lengths"]) for r in records) / n,
    }


def markdown_table(summary: dict[str, dict[str, float]], k: int) -> str:
    header = ["benchmark", "n", "pass@1 (%)", f"mean@{k} (%)", f"pass@{k} (%)", "mean length", "truncated"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in summary.items():
        cells = [name, str(int(row["n"])), *(f"{100 * row[c]:.1f}" for c in ("pass@1", "mean@k", "pass@k")),
                 f"{row['mean_length']:.1f}", f"{100 * row['truncated']:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def model_folder_name(model: str) -> str:
    """A folder name for a model path or hub id, the hub cache's way: ``runs/x/rl/final`` -> ``runs--x--rl--final``,
    ``Qwen/Qwen2.5-VL-3B-Instruct`` -> ``Qwen--Qwen2.5-VL-3B-Instruct``."""
    parts = [p for p in Path(model).expanduser().parts if p not in ("/", ".", "..", "~")]
    return "--".join(parts) or "model"


def output_dir(cfg: Config) -> Path:
    """``eval.output_dir``, default ``{output_dir}/eval/{model_folder_name(model)}``: one folder per evaluated
    model, so evaluating a second model does not overwrite the first one's results."""
    if cfg.eval.output_dir:
        return Path(cfg.eval.output_dir)
    return run_dir(cfg, "eval") / model_folder_name(cfg.eval.model or cfg.model.student)


def evaluate(cfg: Config) -> dict[str, dict[str, float]]:
    """Run the evaluation; returns ``{benchmark: row, ..., "all": row}`` (accuracies in [0, 1])."""
    ec, data = cfg.eval, cfg.data
    files = ec.files or data.eval_files
    if not files:
        raise ValueError("no benchmark: set eval.files (or data.eval_files)")
    # every check on the user's input comes before the output folder is written
    benchmarks = {}
    for path in files:
        examples = load_examples(path, image_root=data.image_root, check_images=data.check_images,
                                 prompt_column=data.prompt_column, answer_column=data.answer_column)
        name = Path(path).stem
        if name in benchmarks:
            raise ValueError(f"two benchmark files are named {name!r}: rename one")
        benchmarks[name] = examples[:ec.max_examples] if ec.max_examples is not None else examples
        require_rows(benchmarks[name], path, 1, "vold eval (an empty benchmark has no accuracy)")
    model_path = ec.model or cfg.model.student
    check_model_path(model_path, "eval.model" if ec.model else "model.student",
                     local_files_only=cfg.model.local_files_only)
    out = output_dir(cfg)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    print_start("eval", start_from=model_path, run=out, examples=sum(len(e) for e in benchmarks.values()),
                files=files, extra={"samples per question": ec.num_samples})
    # nothing is trained here: no gradient checkpointing (it turns the KV cache off in the model config), and no
    # model.freeze_*/frozen/trainable (their checks concern training: a text-only eval.model under a VLM config)
    model, processor = student_from_config(replace(cfg.model, gradient_checkpointing=False), device, path=model_path,
                                           freeze=False)
    model.eval()
    if not is_multimodal(processor) and any(e.images for ex in benchmarks.values() for e in ex):
        raise ValueError(f"the benchmark has images but {model_path} is a text-only model")
    # the output folder only once the device, the model and the benchmark's fit are checked
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    engine = make_rollout_engine(cfg.rollout, model, processor, model_path=model_path,
                                 dtype=cfg.model.autocast or cfg.model.dtype, seed=cfg.seed,
                                 vocab_size=cfg.model.vocab_size)
    engine.update_weights(model)  # vLLM's sleep level 2 drops the weights it loaded as soon as it is built
    k, max_new_tokens = ec.num_samples, ec.max_new_tokens or cfg.rollout.max_new_tokens

    records: dict[str, list[dict[str, Any]]] = {name: [] for name in benchmarks}
    bar = progress_bar(sum(len(e) for e in benchmarks.values()), desc="eval", enabled=cfg.logging.progress)
    calls = 0
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for name, examples in benchmarks.items():
            for start in range(0, len(examples), data.eval_batch_size):
                chunk = examples[start:start + data.eval_batch_size]
                batch = build_prompt_batch(chunk, processor, system_prompt=data.system_prompt)
                with torch.no_grad(), autocast(device, cfg.model.autocast):
                    rollout = engine.generate(batch, k, max_new_tokens, temperature=ec.temperature, top_p=ec.top_p,
                                              seed=cfg.seed + calls)
                calls += 1
                correct = accuracy_reward(rollout.texts, [e.answer for e in chunk for _ in range(k)])
                for i, example in enumerate(chunk):
                    rows = range(i * k, (i + 1) * k)
                    verdicts = [correct[j] == 1.0 for j in rows]
                    record = {
                        "benchmark": name, "index": start + i, "prompt": example.prompt, "answer": example.answer,
                        "images": [ref if isinstance(ref, str) else "<bytes>" for ref in example.images],
                        "completions": [rollout.texts[j] for j in rows],
                        "predictions": [extract_boxed(rollout.texts[j]) for j in rows], "correct": verdicts,
                        "lengths": [int(rollout.lengths[j]) for j in rows],
                        "truncated": int(sum(not bool(rollout.finished[j]) for j in rows)),
                        "mean@k": sum(verdicts) / k,
                    }
                    records[name].append(record)
                    f.write(json.dumps(record) + "\n")
                bar.update(len(chunk))
    bar.close()

    summary = {name: summarize(rows) for name, rows in records.items()}
    summary["all"] = summarize([r for rows in records.values() for r in rows])
    table = markdown_table(summary, k)
    (out / "summary.md").write_text(f"model: {model_path}\n\n{table}", encoding="utf-8")
    (out / "summary.json").write_text(json.dumps({"model": model_path, "k": k, "results": summary}, indent=2) + "\n",
                                      encoding="utf-8")
    print(f"eval: {model_path} (k={k}, temperature={ec.temperature})\n{table}", end="")
    return summary
