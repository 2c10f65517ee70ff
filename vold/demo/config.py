"""The demo's settings: one dataclass, two presets (``full`` and ``--quick``), ``key=value`` overrides.

Everything that changes a cached model (the teacher, the perception-aligned student) is part of
that model's cache key (:func:`cache_key`), so changing e.g. ``teacher_steps`` trains a new teacher
and changing ``rl_steps`` does not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from vold.config import StrList, section
from vold.demo.arms import TRAINED_ARMS, Arm

# bump when the task, a model or its training change in a way the fields do not show
# lm 4, perception 6: the LM learns facts only ("x o y=r", 5 a row); image prompt without its leading line break
CACHE_VERSIONS = {"teacher": 1, "lm": 4, "perception": 6}


@section
class DemoConfig:
    seeds: int = 3  # replicates of everything but the teacher: perception student, traces, SFT, RL, eval
    jobs: int = 0  # worker processes running independent stages at once (0: one per CPU core, at most 4)
    threads: int = 1  # torch threads per worker
    data_seed: int = 0  # the problem split (shared by all seeds)
    # the trained arms to run (keys of vold.demo.arms.ARMS, e.g. c_sft_grpo); empty: all. (a) and (b) always run
    arms: StrList = dataclasses.field(default_factory=list)  # 'a,b' or '[a, b]', as the trainer's list keys

    # problems (of the 5647 valid expressions; eval is disjoint from all others, perception from train)
    eval_problems: int = 300  # held out: evaluated as images and as text
    perception_problems: int = 2000  # the student's own problems: its text pre-training and its perception stage
    train_problems: int = 2000  # the cold start's prompts (the teacher's traces of them, as text)
    rl_problems: int = 200  # the first of those: the RL and SOPHIA prompts, text (c-e) or images (f, g), 8 epochs
    teacher_problems: int = 3000  # the teacher's own training set (gold step-by-step solutions)

    # teacher: Qwen3 causal LM trained from scratch with `vold sft` on gold solutions
    teacher_hidden: int = 96
    teacher_layers: int = 3
    teacher_steps: int = 800
    teacher_lr: float = 3e-3
    teacher_batch: int = 32

    # student: Qwen2.5-VL whose language model has the teacher's size. (1) text pre-training [shared by the
    # seeds, like the teacher]: `vold sft` on the primitive operations and on direct answers ("3+4*2=\boxed{11}"),
    # never the step-by-step procedure; (2) eyes [per seed]: the vision tower + projector trained to map each
    # character cell to that character's input embedding (`align_*`), then `vold sft` on image -> read /
    # direct answer (+ the text rows, kept), vision tower and projector frozen.
    student_hidden: int = 96
    student_layers: int = 3
    vision_hidden: int = 32
    vision_depth: int = 2
    lm_steps: int = 1000
    lm_lr: float = 3e-3
    lm_batch: int = 32
    align_steps: int = 300
    align_lr: float = 3e-3
    align_batch: int = 16
    perception_steps: int = 400
    perception_lr: float = 1e-3
    perception_batch: int = 32

    # (b) cold start: `vold make-traces` (teacher, text prompts) then `vold sft`
    trace_temperature: float = 0.6
    trace_top_p: float = 0.95
    sft_steps: int = 500
    sft_lr: float = 1e-3
    sft_batch: int = 16

    # (c)-(f) `vold train`: GRPO (+ beta * reverse KL to the teacher on wrong rollouts)
    rl_steps: int = 200
    rl_lr: float = 1e-4
    rl_batch: int = 8  # prompts per step
    num_generations: int = 5  # G (the paper's)
    distill_coef: float = 0.1  # beta (the paper's)
    max_new_tokens: int = 48  # a solution is ~30 characters
    curve_points: int = 3  # held-out evaluations along each RL run (checkpoints), for the accuracy curves
    # (f) RL with cold start on images (Wei et al.'s recipe): SFT, then GRPO on image prompts, k3 reference KL
    images_ref_kl_coef: float = 1e-2
    # (g) `vold sophia` from the perception student: K captions (read prompt), N teacher traces each,
    # keep the shortest correct trace of a caption with mean reward > alpha, ratio-1 update (the paper's)
    sophia_steps: int = 100
    sophia_batch: int = 8  # images per step
    sophia_captions: int = 4  # K (the paper: 8)
    sophia_traces: int = 4  # N (the paper: 8)
    sophia_alpha: float = 0.75  # the paper's
    sophia_lr: float = 1e-4  # the RL lr: at the SFT lr (1e-3) the update overwrote the read prompt (see docs)

    # `vold eval`
    eval_samples: int = 4  # k: accuracy = mean@k
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95


QUICK = dict(
    seeds=1, teacher_problems=2000, perception_problems=800, train_problems=120, rl_problems=60, eval_problems=40,
    teacher_steps=250, lm_steps=100, align_steps=30, perception_steps=40, sft_steps=40, rl_steps=6, rl_batch=4,
    curve_points=2, eval_samples=2,
    sophia_steps=4, sophia_batch=4, sophia_captions=2, sophia_traces=2,
)

TEACHER_KEYS = ("data_seed", "eval_problems", "teacher_problems", "teacher_hidden", "teacher_layers",
                "teacher_steps", "teacher_lr", "teacher_batch")
LM_KEYS = ("data_seed", "eval_problems", "perception_problems", "student_hidden", "student_layers", "vision_hidden",
           "vision_depth", "lm_steps", "lm_lr", "lm_batch")
PERCEPTION_KEYS = (*LM_KEYS, "align_steps", "align_lr", "align_batch", "perception_steps", "perception_lr",
                   "perception_batch")


def make_config(quick: bool = False, overrides: list[str] | None = None, **values: Any) -> DemoConfig:
    """The preset (``quick`` or full), then ``key=value`` strings, then keyword values."""
    settings: dict[str, Any] = dict(QUICK if quick else {})
    names = [f.name for f in dataclasses.fields(DemoConfig)]
    for override in overrides or []:
        if "=" not in override:
            raise ValueError(f"demo override {override!r} must look like key=value")
        key, raw = (part.strip() for part in override.split("=", 1))
        if key not in names:
            raise ValueError(f"unknown demo setting {key!r} (settings: {', '.join(names)})")
        settings[key] = raw  # pydantic parses the text as the field's type
    cfg = DemoConfig(**settings)
    for key, value in values.items():
        if value is not None:
            setattr(cfg, key, value)
    unknown = sorted(set(cfg.arms) - {arm.key for arm in TRAINED_ARMS})
    if unknown:
        raise ValueError(f"demo setting arms: unknown arms {unknown} (trained arms: "
                         f"{', '.join(arm.key for arm in TRAINED_ARMS)})")
    if not 1 <= cfg.rl_problems <= cfg.train_problems:
        raise ValueError(f"demo setting rl_problems must be in [1, train_problems={cfg.train_problems}], "
                         f"got {cfg.rl_problems}")
    if cfg.jobs == 0:
        cfg.jobs = max(1, min(4, os.cpu_count() or 1))
    for key in ("seeds", "jobs", "threads", "rl_steps", "sft_steps", "eval_samples", "curve_points", "rl_batch",
                "num_generations", "teacher_steps", "lm_steps", "align_steps", "perception_steps", "sophia_steps",
                "sophia_batch", "sophia_captions", "sophia_traces"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"demo setting {key} must be >= 1, got {getattr(cfg, key)}")
    return cfg


def cache_key(cfg: DemoConfig, keys: tuple[str, ...], kind: str) -> str:
    """A short hash of the settings ``keys`` (and ``kind``'s cache version): the name of a cached model's folder."""
    spec = {"version": CACHE_VERSIONS[kind], **{k: getattr(cfg, k) for k in keys}}
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def as_dict(cfg: DemoConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def steps_of(dc: DemoConfig, arm: Arm) -> int:
    """Optimizer steps of a trained arm."""
    return dc.sophia_steps if arm.trainer == "sophia" else dc.rl_steps
