"""``vold demo``: the VOLD ablation at laptop scale, through the trainer's own stages.

Stages (every one is a call of the trainer's public function on a :class:`vold.config.Config`, so
each run folder has its ``config.yaml``, ``metrics.jsonl`` and models exactly as ``vold sft`` /
``vold make-traces`` / ``vold train`` / ``vold eval`` write them):

    data                      problems -> JSONL (+ PNGs): teacher / lm / perception / train / rl (text, images) / eval
    teacher        [cached]   `vold sft` of a random Qwen3 on gold step-by-step solutions
    lm             [cached]   `vold sft` of a random Qwen2.5-VL on text: the primitive operations (text pre-training)
    perception     [cached]   per seed: the lm's vision aligned to its text embeddings (`align_vision`), then
                              `vold sft` (vision frozen) on (image | text) -> direct answers, image -> read
    teacher eval              `vold eval` of the teacher on the held-out problems, as text
    per seed s:
      traces                  `vold make-traces`: the teacher solves the train prompts (text; correct ones kept)
      sft             (b)     `vold sft` of the perception student on those traces (the cold start)
      rl/<arm>        (c-f)   `vold train`: (c) SFT + GRPO, (d) GRPO + distillation from the perception student,
                              (e) SFT + GRPO + distillation, k2 and full (all on text prompts),
                              (f) SFT + GRPO on image prompts with a k3 reference KL (Wei et al.'s recipe)
      sophia/<arm>    (g)     `vold sophia` from the perception student on image prompts: its captions (the read
                              prompt), the teacher's traces from caption + question, ratio-1 update
      eval/<arm>      (a-g)   `vold eval` on the held-out problems as images and as text (+ checkpoints)

Independent stages run in ``jobs`` worker processes (``threads`` torch threads each). The teacher, the
student's text-pre-trained LM and its perception students are cached under ``cache_dir`` by a hash of the
settings that make them. RL and SOPHIA train on the first ``rl_problems`` training prompts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml

from vold.demo.arms import BENCHMARKS, TRAINED_ARMS
from vold.demo.config import LM_KEYS, PERCEPTION_KEYS, TEACHER_KEYS, DemoConfig, as_dict, cache_key, steps_of
from vold.demo.models import MAX_PIXELS, MIN_PIXELS

# ---- configs of the trainer's stages ------------------------------------------------------------------

def base_config(dc: DemoConfig) -> dict[str, Any]:
    """What every stage shares: tiny float32 models on the CPU, no progress bars."""
    return {
        "model": {"dtype": "float32", "gradient_checkpointing": False, "attn_implementation": "sdpa",
                  "local_files_only": True, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS},
        "data": {"eval_batch_size": 64},
        # one generate call per rollout batch (seed + step): per-prompt calls are ~2x slower for these tiny models
        "rollout": {"num_generations": dc.num_generations, "max_new_tokens": dc.max_new_tokens,
                    "seed_per_prompt": False},
        "checkpoint": {"every": 0, "resume": "none"},
        "overwrite_output_dir": True,  # a rerun into the same folder starts over
        "logging": {"progress": False},
        "device": "cpu",
    }


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def frozen_vision() -> dict[str, Any]:
    """``model.*`` keys that freeze the student's vision tower and projector (as VOLD and SOPHIA do), for every
    stage that trains the student after its vision was aligned to the text embeddings."""
    return {"freeze_vision_tower": True, "freeze_projector": True}


def sft_config(dc: DemoConfig, *, model: str, files: list[str], output_dir: Path, steps: int, lr: float,
               batch: int, seed: int, response: str, frozen: bool = True) -> dict[str, Any]:
    return merge(base_config(dc), {
        "model": {"student": model, **(frozen_vision() if frozen else {})},
        "sft": {"train_files": files, "response_column": response, "lr": lr, "batch_size": batch,
                "max_steps": steps, "warmup_steps": min(20, steps // 10), "lr_scheduler": "cosine",
                "min_lr_ratio": 0.1, "max_length": 160},
        "seed": seed, "output_dir": str(output_dir),
    })


def eval_config(dc: DemoConfig, *, model: str, files: list[str], output_dir: Path, seed: int) -> dict[str, Any]:
    return merge(base_config(dc), {
        "model": {"student": model},
        "eval": {"model": model, "files": files, "num_samples": dc.eval_samples, "temperature": dc.eval_temperature,
                 "top_p": dc.eval_top_p, "max_new_tokens": dc.max_new_tokens, "output_dir": str(output_dir)},
        "seed": seed, "output_dir": str(output_dir.parent),
    })


# ---- the stages (run in worker processes: module-level functions of plain arguments) -------------------

def stage_train_model(kind: str, folder: str, size: dict[str, int], config: dict[str, Any],
                      start: str | None = None, align: dict[str, Any] | None = None) -> str:
    """A cached model, then ``vold sft`` of it on ``config``'s data: ``teacher`` (a random Qwen3), ``lm``
    (a random Qwen2.5-VL: its text pre-training) or ``perception`` (the ``start`` text-pre-trained student,
    its vision aligned to the text embeddings first: :func:`vold.demo.models.align_vision` with ``align``)."""
    from vold.config import config_from_dict
    from vold.demo.models import align_vision, save_student, save_teacher
    from vold.sft import train_sft

    folder = Path(folder)
    if kind == "teacher":
        init = save_teacher(folder / "init", **size)
    elif kind == "lm":
        init = save_student(folder / "init", **size)
    else:
        init = folder / "aligned"
        stats = align_vision(Path(start), init, **align)
        (folder / "align.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    config = merge(config, {"model": {"student": str(init)}, "output_dir": str(folder)})
    return str(train_sft(config_from_dict(config)))


def stage_traces(config: dict[str, Any]) -> str:
    from vold.config import config_from_dict
    from vold.traces import make_traces

    return str(make_traces(config_from_dict(config)))


def stage_sft(config: dict[str, Any]) -> str:
    from vold.config import config_from_dict
    from vold.sft import train_sft

    return str(train_sft(config_from_dict(config)))


def stage_rl(config: dict[str, Any]) -> str:
    from vold.config import config_from_dict
    from vold.rl import train_rl

    return str(train_rl(config_from_dict(config)))


def stage_sophia(config: dict[str, Any]) -> str:
    from vold.config import config_from_dict
    from vold.sophia import train_sophia

    return str(train_sophia(config_from_dict(config)))


def stage_eval(config: dict[str, Any], problems: dict[str, list[str]]) -> dict[str, Any]:
    """``vold eval``, plus how often the first line of an image completion is the problem read correctly."""
    from vold.config import config_from_dict
    from vold.evaluate import evaluate
    from vold.runs import read_jsonl

    cfg = config_from_dict(config)
    summary = evaluate(cfg)
    out = Path(cfg.eval.output_dir)
    reads: dict[str, list[float]] = {}
    for record in read_jsonl(out / "samples.jsonl"):
        truth = problems[record["benchmark"]][record["index"]]
        first = [c.split("\n")[0].split("=")[0].strip() == truth for c in record["completions"]]
        reads.setdefault(record["benchmark"], []).append(sum(first) / len(first))
    result = {"summary": summary, "reads": {name: sum(v) / len(v) for name, v in reads.items()}}
    (out / "demo_eval.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


STAGES: dict[str, Callable[..., Any]] = {"train_model": stage_train_model, "traces": stage_traces, "sft": stage_sft,
                                         "rl": stage_rl, "sophia": stage_sophia, "eval": stage_eval}


def run_stage(kind: str, kwargs: dict[str, Any], log_file: str, threads: int) -> tuple[Any, float]:
    """One stage, its prints and warnings to ``log_file``; returns (result, seconds)."""
    import torch
    from transformers.utils import logging as hf_logging

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    start = time.perf_counter()
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a", encoding="utf-8") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = STAGES[kind](**kwargs)
    return result, time.perf_counter() - start


def _worker_init(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


# ---- a small DAG scheduler -------------------------------------------------------------------------------

@dataclass
class Task:
    name: str
    kind: str
    kwargs: dict[str, Any]
    deps: list[str] = field(default_factory=list)
    after: Callable[[Any], None] | None = None  # run in the main process with the result


class Scheduler:
    """Runs tasks once their dependencies are done: in this process (``jobs=1``) or in a process pool."""

    def __init__(self, jobs: int, threads: int, log_dir: Path, say: Callable[[str], None]):
        self.jobs, self.threads, self.log_dir, self.say = jobs, threads, log_dir, say
        self.tasks: dict[str, Task] = {}
        self.results: dict[str, Any] = {}
        self.seconds: dict[str, float] = {}

    def add(self, task: Task) -> None:
        missing = [d for d in task.deps if d not in self.tasks and d not in self.results]
        if missing:
            raise ValueError(f"task {task.name} depends on unknown tasks {missing}")
        self.tasks[task.name] = task

    def _log(self, task: Task) -> str:
        return str(self.log_dir / (task.name.replace("/", "__") + ".log"))

    def _finish(self, task: Task, result: Any, seconds: float) -> None:
        self.results[task.name], self.seconds[task.name] = result, seconds
        self.say(f"done  {task.name} ({seconds:.1f} s)")
        if task.after is not None:
            task.after(result)

    def run(self) -> None:
        pending = dict(self.tasks)
        ready = lambda: [t for t in pending.values() if all(d in self.results for d in t.deps)]  # noqa: E731
        if self.jobs == 1:
            while pending:
                task = ready()[0]
                del pending[task.name]
                self.say(f"start {task.name}")
                try:
                    result, seconds = run_stage(task.kind, task.kwargs, self._log(task), self.threads)
                except Exception as error:
                    raise RuntimeError(f"demo stage {task.name} failed (log: {self._log(task)}): {error}") from error
                self._finish(task, result, seconds)
            return
        running: dict[Future, Task] = {}
        with ProcessPoolExecutor(self.jobs, mp_context=get_context("spawn"), initializer=_worker_init,
                                 initargs=(self.threads,)) as pool:
            while pending or running:
                for task in ready():
                    if len(running) >= self.jobs:
                        break
                    del pending[task.name]
                    self.say(f"start {task.name}")
                    running[pool.submit(run_stage, task.kind, task.kwargs, self._log(task), self.threads)] = task
                if not running:
                    raise RuntimeError(f"demo: tasks {sorted(pending)} can never start (a dependency cycle)")
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    task = running.pop(future)
                    try:
                        result, seconds = future.result()
                    except Exception as error:
                        for other in running:
                            other.cancel()
                        raise RuntimeError(f"demo stage {task.name} failed (log: {self._log(task)}): "
                                           f"{error}") from error
                    self._finish(task, result, seconds)


# ---- the demo -------------------------------------------------------------------------------------------

def prepare_data(dc: DemoConfig, data: Path) -> dict[str, Any]:
    """Write the problem sets; returns the file paths and, per eval benchmark, the problems' texts."""
    from vold.demo.task import READ_INSTRUCTION, fact_rows, image_rows, split_problems, text_rows, write_rows

    sets = split_problems(dc.data_seed, eval=dc.eval_problems, perception=dc.perception_problems,
                          train=dc.train_problems, teacher=dc.teacher_problems)
    images = data / "images"
    files = {
        "teacher": write_rows(data / "teacher_solutions.jsonl", text_rows(sets["teacher"], "solution")),
        # the student's text pre-training: the primitive operations, never the procedure
        "lm": write_rows(data / "lm_text.jsonl", fact_rows()),
        "perception": write_rows(data / "perception.jsonl",
                                 image_rows(sets["perception"], images, data, "direct")
                                 + image_rows(sets["perception"], images, data, "transcription", READ_INSTRUCTION)
                                 + fact_rows() + text_rows(sets["perception"], "direct")),
        "train": write_rows(data / "train_text.jsonl", text_rows(sets["train"])),
        "rl": write_rows(data / "rl_text.jsonl", text_rows(sets["train"][:dc.rl_problems])),
        "rl_image": write_rows(data / "rl_image.jsonl", image_rows(sets["train"][:dc.rl_problems], images, data)),
        "image": write_rows(data / "image.jsonl", image_rows(sets["eval"], images, data)),
        "text": write_rows(data / "text.jsonl", text_rows(sets["eval"])),
    }
    return {"files": {k: str(v) for k, v in files.items()},
            "problems": {name: [p.text for p in sets["eval"]] for name in BENCHMARKS}}


def cached_model(cache_dir: Path, kind: str, dc: DemoConfig, keys: tuple[str, ...],
                 seed: int | None = None) -> tuple[Path, bool]:
    """``(folder, hit)``: the cache folder of a model and whether a complete one is there."""
    folder = cache_dir / f"{kind}-{cache_key(dc, keys, kind)}" if seed is None else \
        cache_dir / f"{kind}-{cache_key(dc, keys, kind)}-seed{seed}"
    done = folder / "demo_cache.json"
    if done.is_file() and (folder / "sft" / "final" / "config.json").is_file():
        return folder, True
    if folder.exists():  # an interrupted earlier attempt
        shutil.rmtree(folder)
    return folder, False


def run_demo(dc: DemoConfig, output: str | Path, *, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the whole ablation into ``output``; returns the results (also in ``results.json``)."""
    from vold.demo.report import write_report

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else out / "cache"
    t0 = time.perf_counter()
    log_path = out / "log.txt"
    log_path.write_text("", encoding="utf-8")

    def say(message: str) -> None:
        line = f"[{time.perf_counter() - t0:7.1f}s] {message}"
        print(line, flush=True)
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    (out / "demo.yaml").write_text(yaml.safe_dump(as_dict(dc), sort_keys=False), encoding="utf-8")
    say(f"vold demo -> {out} (seeds={dc.seeds}, jobs={dc.jobs}, threads={dc.threads})")
    for stale in [*out.glob("seed_*"), out / "teacher", out / "logs"]:  # an earlier run's stages
        shutil.rmtree(stale, ignore_errors=True)
    data = prepare_data(dc, out / "data")
    files, problems = data["files"], data["problems"]
    eval_files = [files[name] for name in BENCHMARKS]
    sched = Scheduler(dc.jobs, dc.threads, out / "logs", say)

    # cached models: the teacher and the student's text-pre-trained language model (one each: given models,
    # like a paper's base checkpoints), and the student with eyes (one per seed)
    cached: dict[str, Any] = {}
    models: dict[str, tuple[str, list[str]]] = {}  # name -> (final model folder, task names to wait for)
    student_size = {"hidden_size": dc.student_hidden, "layers": dc.student_layers,
                    "vision_hidden": dc.vision_hidden, "vision_depth": dc.vision_depth}
    specs = [("teacher", "teacher", TEACHER_KEYS, None, files["teacher"],
              {"hidden_size": dc.teacher_hidden, "layers": dc.teacher_layers},
              (dc.teacher_steps, dc.teacher_lr, dc.teacher_batch)),
             ("lm", "lm", LM_KEYS, None, files["lm"], student_size, (dc.lm_steps, dc.lm_lr, dc.lm_batch))]
    specs += [(f"seed_{seed}/perception", "perception", PERCEPTION_KEYS, seed, files["perception"], student_size,
               (dc.perception_steps, dc.perception_lr, dc.perception_batch)) for seed in range(dc.seeds)]
    for name, kind, keys, seed, train_file, size, (steps, lr, batch) in specs:
        folder, hit = cached_model(cache, kind, dc, keys, seed)
        final = str(folder / "sft" / "final")
        cached[name] = {"path": final, "cache_hit": hit}
        models[name] = (final, [] if hit else [name])
        if hit:
            say(f"cache {name}: {folder}")
            continue
        # the training file is copied into the cache folder, so the cached model does not point into a run
        folder.mkdir(parents=True, exist_ok=True)
        local = shutil.copy(train_file, folder / Path(train_file).name)
        extra: dict[str, Any] = {}
        deps: list[str] = []
        if kind == "perception":
            shutil.copytree(Path(train_file).parent / "images", folder / "images", dirs_exist_ok=True)
            start, deps = models["lm"]
            extra = {"start": start, "align": {"steps": dc.align_steps, "lr": dc.align_lr, "batch": dc.align_batch,
                                               "seed": seed}}
        config = sft_config(dc, model="", files=[str(local)], output_dir=folder, steps=steps, lr=lr, batch=batch,
                            seed=seed or 0, response="response", frozen=kind == "perception")
        spec = {"seed": seed, **{k: getattr(dc, k) for k in keys}}

        def mark(_result: Any, folder: Path = folder, spec: dict = spec) -> None:
            (folder / "demo_cache.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")

        sched.add(Task(name, "train_model", {"kind": kind, "folder": str(folder), "size": {**size, "seed": seed or 0},
                                             "config": config, **extra}, deps=deps, after=mark))
    teacher, teacher_deps = models["teacher"]

    sched.add(Task("teacher/eval", "eval", {
        "config": eval_config(dc, model=teacher, files=[files["text"]], output_dir=out / "teacher" / "eval",
                              seed=0),
        "problems": problems}, deps=teacher_deps))

    for seed in range(dc.seeds):
        root = out / f"seed_{seed}"
        student, student_deps = models[f"seed_{seed}/perception"]
        sched.add(Task(f"seed_{seed}/a_base/eval", "eval", {
            "config": eval_config(dc, model=student, files=eval_files, output_dir=root / "a_base" / "eval",
                                  seed=seed),
            "problems": problems}, deps=student_deps))
        traces = merge(base_config(dc), {
            "model": {"teacher": teacher},
            "traces": {"input_files": [files["train"]], "num_samples": 1, "keep_per_prompt": 1,
                       "max_new_tokens": dc.max_new_tokens, "temperature": dc.trace_temperature,
                       "top_p": dc.trace_top_p, "batch_size": 64, "filter_correct": True},
            "seed": seed, "output_dir": str(root),
        })
        sched.add(Task(f"seed_{seed}/traces", "traces", {"config": traces}, deps=teacher_deps))
        sft = sft_config(dc, model=student, files=[str(root / "traces" / "traces.jsonl")], output_dir=root,
                         steps=dc.sft_steps, lr=dc.sft_lr, batch=dc.sft_batch, seed=seed, response="trace")
        sched.add(Task(f"seed_{seed}/sft", "sft", {"config": sft}, deps=[f"seed_{seed}/traces", *student_deps]))
        sft_model = str(root / "sft" / "final")
        sched.add(Task(f"seed_{seed}/b_sft/eval", "eval", {
            "config": eval_config(dc, model=sft_model, files=eval_files, output_dir=root / "b_sft" / "eval",
                                  seed=seed),
            "problems": problems}, deps=[f"seed_{seed}/sft"]))
        for arm in TRAINED_ARMS:
            if dc.arms and arm.key not in dc.arms:
                continue
            key = arm.key
            deps = [*teacher_deps, *student_deps] + ([f"seed_{seed}/sft"] if arm.start == "sft" else [])
            start_model = sft_model if arm.start == "sft" else student
            train_file = files["rl_image" if arm.images else "rl"]
            total = steps_of(dc, arm)
            every = max(1, total // dc.curve_points)  # checkpoints evaluated for the accuracy-vs-step curves
            common = merge(base_config(dc), {
                "model": {"student": start_model, "teacher": teacher, **frozen_vision()},
                "checkpoint": {"every": every, "keep_last": dc.curve_points + 1, "save_optimizer": False},
                "seed": seed, "output_dir": str(root / key),
            })
            if arm.trainer == "sophia":
                from vold.demo.task import READ_INSTRUCTION, image_prompt

                config = merge(common, {
                    "data": {"train_files": [train_file]},
                    "sophia": {"num_captions": dc.sophia_captions, "traces_per_caption": dc.sophia_traces,
                               "caption_reward_threshold": dc.sophia_alpha,
                               "caption_prompt": image_prompt(READ_INSTRUCTION),
                               "caption_max_new_tokens": 12, "caption_temperature": 1.0,  # ~6 characters
                               "teacher_prompt_template": "{caption}\n{question}",
                               "trace_max_new_tokens": dc.max_new_tokens, "trace_temperature": dc.trace_temperature,
                               "trace_top_p": dc.trace_top_p, "response_separator": "\n",
                               "importance_weighting": "none", "batch_size": dc.sophia_batch,
                               "max_steps": dc.sophia_steps, "lr": dc.sophia_lr, "max_length": 160},
                })
            else:
                config = merge(common, {
                    "data": {"train_files": [train_file], "batch_size": dc.rl_batch},
                    "optim": {"lr": dc.rl_lr, "max_steps": dc.rl_steps},
                    "loss": {"distill_coef": dc.distill_coef if arm.estimator else 0.0,
                             "distill_estimator": arm.estimator or "k2",
                             "ref_kl_coef": dc.images_ref_kl_coef if arm.images else 0.0, "ref_kl_estimator": "k3"},
                })
            sched.add(Task(f"seed_{seed}/{key}/{arm.run}", arm.trainer, {"config": config}, deps=deps))
            # the checkpoints at every, 2 every, ... before the end, and the final model
            points = sorted({every * i for i in range(1, dc.curve_points) if every * i < total} | {total})
            for step in points:
                final = step == total
                model = root / key / arm.run / ("final" if final else f"checkpoints/step_{step:06d}/model")
                where = root / key / ("eval" if final else f"curve/step_{step:06d}")
                name = f"seed_{seed}/{key}/eval" if final else f"seed_{seed}/{key}/eval@{step}"
                sched.add(Task(name, "eval", {
                    "config": eval_config(dc, model=str(model), files=eval_files, output_dir=where, seed=seed),
                    "problems": problems}, deps=[f"seed_{seed}/{key}/{arm.run}"]))
    sched.run()
    elapsed = time.perf_counter() - t0
    results = write_report(out, dc, cached=cached, seconds=sched.seconds, elapsed=elapsed)
    say(f"results: {out / 'results.md'}, figure: {out / 'figure.png'} ({elapsed:.0f} s in all)")
    print(results["table"], flush=True)
    return results


def main(args: Any) -> int:
    """Entry from ``vold demo`` (parsed arguments)."""
    from vold.demo.config import make_config

    output = args.output or ("runs/demo-quick" if args.quick else "runs/demo")
    if args.report_only:
        from vold.demo.report import rebuild_report

        print(rebuild_report(output)["table"], end="")
        return 0
    dc = make_config(args.quick, args.overrides, seeds=args.seeds, jobs=args.jobs, threads=args.threads)
    run_demo(dc, output, cache_dir=args.cache_dir)
    return 0
