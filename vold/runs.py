"""Run plumbing shared by the stages: run folders, seeding, optimizer + schedule, checkpoints, logs.

A run folder (``{output_dir}/{stage}``) holds::

    config.yaml              the resolved config of the run whose weights are here (a start into a folder that
                             holds another run's checkpoints/final is refused: see prepare_run)
    metrics.jsonl            one JSON object per step
    samples.jsonl            a few rollouts per step (RL)
    checkpoints/step_000010/ model/ (save_pretrained + processor), state.pt, written as step_000010.tmp
                             and renamed when complete: a run killed mid-save leaves no half checkpoint
    final/                   the trained model (save_pretrained + processor)

``state.pt`` holds the optimizer, the scheduler, the RNG states (python, numpy, torch, cuda), the
data position (sampler state), the step and the byte sizes of the log files at that step: resuming
truncates the logs to those sizes, so the lines a killed run wrote after its last checkpoint vanish
and the resumed run writes them again, identically.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import random
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vold.config import Config, LoggingConfig, config_to_dict, load_config, save_config

STATE_FILE = "state.pt"
LOG_FILES = ("metrics.jsonl", "samples.jsonl")


# ---- run folder and seeding ------------------------------------------------------------------------

def run_dir(cfg: Config, stage: str) -> Path:
    """``{output_dir}/{stage}``: each stage of one config writes its own run folder."""
    return Path(cfg.output_dir) / stage


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def start_run(cfg: Config, stage: str, *, write: bool = True, seed: bool = True) -> Path:
    """Create the run folder, save the resolved config beside it (``write``: rank 0 only), seed python/numpy/torch
    (``seed``; a stage that seeds before loading its models and writes the folder after their checks passes False).

    Call it after every check that can fail on the user's input (:func:`prepare_run`, data, model paths), so a
    refused start leaves no folder holding only a config. With ``overwrite_output_dir`` and a fresh start, the
    earlier run's ``checkpoints/`` and ``final/`` are deleted first (logs restart in ``Stage.resume``)."""
    path = run_dir(cfg, stage)
    if write and cfg.overwrite_output_dir and cfg.checkpoint.resume == "none":
        for folder in ("checkpoints", "final"):
            shutil.rmtree(path / folder, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    if write:
        save_config(cfg, path / "config.yaml")
    if seed:
        seed_everything(cfg.seed)
    return path


# ---- what a resume may change -----------------------------------------------------------------------

# keys that may differ between a run folder's saved config and the config that resumes it: they change how the
# run is logged, saved, launched or evaluated, or how long it lasts (max_steps: the run is extended and its lr
# schedule re-planned, see vold.stage), never what the steps already taken computed. A prefix ends in ".".
RESUMABLE_CHANGES = (
    "logging.", "checkpoint.", "eval.", "overwrite_output_dir", "device", "distributed.timeout_minutes",
    "data.eval_files", "data.eval_batch_size", "data.check_images", "model.local_files_only",
    "rollout.gpu_memory_utilization", "rollout.enable_sleep_mode", "rollout.sleep_level",
    "optim.max_steps", "sft.max_steps", "sft.epochs", "sophia.max_steps",
)
# sections (or keys) a stage never reads: a difference there does not change that stage's result
UNUSED_BY_STAGE = {
    "sft": ("traces.", "rollout.", "loss.", "reward.", "sophia.", "optim.lr", "optim.max_steps",
            "optim.lr_scheduler", "optim.warmup_steps", "optim.ppo_epochs", "optim.minibatches", "optim.grad_accum",
            "optim.packing", "model.teacher", "sft.enabled"),
    "rl": ("traces.", "sophia.", "sft.train_files", "sft.response_column", "sft.epochs", "sft.max_steps", "sft.lr",
           "sft.lr_scheduler", "sft.warmup_steps", "sft.min_lr_ratio", "sft.batch_size", "sft.grad_accum",
           "sft.max_length", "sft.packing"),
    "sophia": ("traces.", "sft.", "loss."),
}


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


Changes = dict[str, tuple[Any, Any]]  # {key: (old value, new value)}


def config_changes(saved: Config, cfg: Config, stage: str) -> tuple[Changes, Changes]:
    """``(allowed, refused)``: the keys whose value differs between ``saved`` and ``cfg`` (``{key: (old, new)}``),
    split into those a resume of ``stage`` may change (:data:`RESUMABLE_CHANGES`, or keys the stage never reads)
    and those that change its result."""
    old, new = _flatten(config_to_dict(saved)), _flatten(config_to_dict(cfg))
    allowed, refused = {}, {}
    free = RESUMABLE_CHANGES + UNUSED_BY_STAGE.get(stage, ())
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key):
            target = allowed if any(key == f or (f.endswith(".") and key.startswith(f)) for f in free) else refused
            target[key] = (old.get(key), new.get(key))
    return allowed, refused


def holds_results(run: Path) -> bool:
    """Whether ``run`` holds a run's weights: a checkpoint (complete or not) or a final model."""
    return (run / "final").exists() or (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir())


def prepare_run(cfg: Config, stage: str, run: Path | None = None, *, max_steps: int | None = None) -> Path | None:
    """Decide how a stage starts in its run folder ``run`` (default ``run_dir(cfg, stage)``), before anything is
    written; returns the checkpoint to resume from (None: a fresh start).

    The rule of the HF Trainer/TRL (resume only when asked): ``checkpoint.resume=none`` (the default) into a
    folder that holds checkpoints or a final model is refused, naming the folder and the two ways out
    (``--resume auto``, or ``overwrite_output_dir=true``/another ``output_dir``). ``auto`` picks the latest
    checkpoint (a fresh start when there is none and no final model); ``auto`` or a checkpoint path is refused
    when the saved ``config.yaml`` of the checkpoint's run differs in a key that changes the result (named in the
    error; :func:`config_changes`), and so is a checkpoint past this run's ``max_steps``. Raises ValueError
    (FileNotFoundError for a missing checkpoint path)."""
    run = run_dir(cfg, stage) if run is None else run
    resume = cfg.checkpoint.resume
    if resume == "none":
        if holds_results(run) and not cfg.overwrite_output_dir:
            raise ValueError(f"{run} already holds a run (checkpoints/ or final/): continue it with --resume auto "
                             f"(checkpoint.resume=auto), or start over with overwrite_output_dir=true (deletes "
                             f"them) or another output_dir")
        return None
    if cfg.overwrite_output_dir and holds_results(run):  # resume used to win silently (and with only a final model,
        # the error below told the user to set overwrite_output_dir=true, which they had)
        raise ValueError(f"--resume {resume} (continue the run in {run}) and overwrite_output_dir=true (delete it and "
                         f"start over) contradict each other: drop one")
    checkpoint = find_checkpoint(run, resume)
    if checkpoint is None:
        if (run / "final").exists():
            raise ValueError(f"--resume {resume}: {run} holds a final model but no checkpoint to continue from "
                             f"(checkpoint.every=0?): start over with overwrite_output_dir=true or another output_dir")
        return None
    at = checkpoint.name.split("_")[-1]
    if max_steps is not None and at.isdigit() and int(at) > max_steps:
        raise ValueError(f"--resume {resume}: {checkpoint} is at step {int(at)}, past this config's max_steps="
                         f"{max_steps}: raise max_steps to extend the run, or start a new one")
    saved_path = checkpoint.parent.parent / "config.yaml"
    if saved_path.is_file():
        allowed, refused = config_changes(load_config(saved_path), cfg, stage)
        longer = {key: change for key, change in allowed.items() if key.endswith((".max_steps", ".epochs"))}
        if longer and not refused:
            print(f"{stage}: resuming with {', '.join(f'{k} {a} -> {b}' for k, (a, b) in longer.items())}: the lr "
                  f"schedule is re-planned for the new total and continues from the checkpoint's step")
        if refused:
            listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in refused.items())
            raise ValueError(f"--resume {resume}: the config differs from the one {checkpoint} was trained with in "
                             f"keys that change the result ({listed}); resume with the saved values "
                             f"({saved_path}), or start a new run (another output_dir, or overwrite_output_dir=true)")
    return checkpoint


def print_start(stage: str, *, start_from: str, run: Path, model: torch.nn.Module | None = None,
                examples: int | None = None, files: list[str] | None = None, steps: int | None = None,
                start_step: int = 0, extra: dict[str, Any] | None = None) -> str:
    """The start-up summary every stage prints (and returns) before its first step: the model it starts from,
    trainable/frozen parameters (and LoRA's rank), examples (and their files), steps (from which one), the output
    folder, and stage-specific ``extra`` lines."""
    lines = [f"vold {stage}: starts from {start_from}"]
    if model is not None:
        from vold.models import parameter_summary

        lines.append(f"  parameters: {parameter_summary(model)}")
    if examples is not None:
        lines.append(f"  examples: {examples:,}" + (f" from {', '.join(map(str, files))}" if files else ""))
    if steps is not None:
        lines.append(f"  steps: {steps:,}" + (f" (resuming at step {start_step:,})" if start_step else ""))
    for key, value in (extra or {}).items():
        lines.append(f"  {key}: {value}")
    lines.append(f"  output: {run}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


# ---- optimizer and schedule -----------------------------------------------------------------------

def make_optimizer(model: torch.nn.Module, lr: float, *, weight_decay: float = 0.0, betas: tuple[float, float] = (
        0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norms (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)


def lr_factor(step: int, *, kind: str, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at optimizer update ``step`` (0-based).

    warmup: ``(step + 1) / warmup`` for ``step < warmup``; then with ``p = (step - warmup) / max(1, total - warmup)``
    in [0, 1]: constant 1, linear ``1 - (1 - m) p``, cosine ``m + (1 - m) (1 + cos(pi p)) / 2``.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    if kind == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_scheduler={kind!r} is not one of ('constant', 'linear', 'cosine')")


def make_scheduler(optimizer: torch.optim.Optimizer, *, kind: str, warmup: int, total: int,
                   min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, kind=kind, warmup=warmup, total=total, min_ratio=min_ratio))


def replan_schedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR) -> list[float]:
    """Set every group's lr to ``base_lr * lambda(last_epoch)`` of ``scheduler`` (whose lambdas were built for
    this run's total): after a resume the optimizer state holds the lr the checkpointed run's schedule chose for
    its next update, which is stale when the total changed (an extended run). Returns the new lrs."""
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports (LambdaLR keeps it there)
    return lrs


class StreakWarning:
    """Warns once, with ``message(n)``, when a condition has held for ``patience`` steps in a row: the run goes on,
    but a term of its objective learns nothing (``vold train``: every group's rewards equal, so no advantage;
    ``vold sophia``: no item kept, so no update)."""

    def __init__(self, patience: int, message: Callable[[int], str]):
        self.patience, self.message, self.run, self.warned = max(1, patience), message, 0, False

    def update(self, condition: bool) -> bool:
        """Count one step; True when this step's warning was issued."""
        self.run = self.run + 1 if condition else 0
        if self.run >= self.patience and not self.warned:
            self.warned = True
            warnings.warn(self.message(self.run), stacklevel=2)  # at the loop that calls update
            return True
        return False


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """Clip to ``max_norm`` (0 disables) and return the total norm before clipping."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))


# ---- checkpoints ---------------------------------------------------------------------------------

def checkpoint_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:06d}"


def save_model(model: torch.nn.Module, processor: Any, path: Path, *, merged: bool = False) -> Path:
    """``save_pretrained`` of the model and its processor/tokenizer: a folder every loader reads.

    A LoRA student (``vold.models.lora_wrapper``) is saved as its adapter (PEFT's ``adapter_config.json`` +
    ``adapter_model.safetensors``, the base model named in the config); ``merged``: also the merged full model
    in ``path/merged`` (loadable without peft)."""
    from vold.models import lora_wrapper, merged_copy

    path.mkdir(parents=True, exist_ok=True)
    wrapper = lora_wrapper(model)
    (model if wrapper is None else wrapper).save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)
    if merged and wrapper is not None:
        save_model(merged_copy(model), processor, path / "merged")
    return path


def save_final(model: torch.nn.Module, processor: Any, path: Path, *, merged: bool = False) -> Path:
    """:func:`save_model` to ``path`` as a whole: written as ``path.tmp``, then renamed over ``path``. A kill while
    saving leaves the earlier ``path`` (or none), never a folder with a config but half the weights that the next
    stage (``sft/final`` -> ``vold train``) or ``vold eval`` would try to load; no file of an earlier model stays."""
    with replaced_whole(path) as tmp:
        save_model(model, processor, tmp, merged=merged)
    return path


@contextmanager
def replaced_whole(path: Path, *, clear: bool = True) -> Iterator[Path]:
    """Yield ``path.tmp`` to write a folder into; when the block ends without an error, it replaces ``path`` (the
    earlier folder removed first), so ``path`` is never half-written and keeps no file of an earlier version.
    ``clear=False`` keeps what is already in ``path.tmp`` (written there before, e.g. by other ranks)."""
    tmp = path.with_name(path.name + ".tmp")
    if clear:
        shutil.rmtree(tmp, ignore_errors=True)
    yield tmp
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def save_checkpoint(run: Path, step: int, model: torch.nn.Module, processor: Any, state: dict[str, Any], *,
                    keep_last: int = 2, clear_tmp: bool = True) -> Path:
    """Write ``checkpoints/step_N`` atomically (``.tmp`` then rename); keep the ``keep_last`` newest.

    Checkpoints of steps after ``step`` belong to an abandoned run (a fresh start with ``resume=none``, or a
    resume from an earlier checkpoint) and are removed: kept, ``keep_last`` would prune this run's own
    checkpoints instead, and ``resume=auto`` would continue the abandoned run. ``clear_tmp=False`` keeps
    what is already in the ``.tmp`` folder (DeepSpeed's partitioned optimizer state, written by every rank)."""
    final = checkpoint_dir(run, step)
    with replaced_whole(final, clear=clear_tmp) as tmp:
        save_model(model, processor, tmp / "model")
        torch.save({**state, "step": step, "rng": rng_state(), "logs": log_positions(run)}, tmp / STATE_FILE)
    for later in list_checkpoints(run):
        if int(later.name.split("_")[1]) > step:
            shutil.rmtree(later, ignore_errors=True)
    for old in list_checkpoints(run)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (``.tmp`` folders of an interrupted save are ignored)."""
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def find_checkpoint(run: Path, resume: str) -> Path | None:
    """``resume``: ``auto`` (the latest checkpoint of ``run``, or None), ``none``, or a checkpoint folder of ``run``
    (``FileNotFoundError`` without its state file, ``ValueError`` for one of another run or stage)."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(run)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"checkpoint.resume={resume!r}: no {STATE_FILE} in that folder "
                                f"(use 'auto', 'none' or a checkpoints/step_N folder)")
    # a checkpoint's optimizer state, step, data position and log positions belong to its own run folder: `vold
    # train --resume <sft>/checkpoints/step_N` used to continue an RL run "at step N" from SFT's state
    if path.resolve().parent != (run / "checkpoints").resolve():
        raise ValueError(f"checkpoint.resume={resume!r} is not a checkpoint of this run ({run / 'checkpoints'}): a "
                         f"stage continues only its own run; to start from another run's model, set model.student "
                         f"to its final/ (or checkpoints/step_N/model) folder")
    return path


def load_checkpoint_state(path: Path) -> dict[str, Any]:
    """The ``state.pt`` of a checkpoint (trusted: written by this code)."""
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)


def restore_run(run: Path, state: dict[str, Any]) -> None:
    """Put the RNGs back and cut the logs to where they were when the checkpoint was written."""
    set_rng_state(state["rng"])
    truncate_logs(run, state["logs"])


def reset_logs(run: Path) -> None:
    """A run that starts from scratch starts its logs from scratch too (no lines of an earlier run)."""
    truncate_logs(run, dict.fromkeys(LOG_FILES, 0))


def log_positions(run: Path) -> dict[str, int]:
    return {name: (run / name).stat().st_size if (run / name).exists() else 0 for name in LOG_FILES}


def truncate_logs(run: Path, positions: dict[str, int]) -> None:
    for name, size in positions.items():
        path = run / name
        if path.exists() and path.stat().st_size > size:
            with open(path, "r+b") as f:
                f.truncate(size)


# ---- logs ------------------------------------------------------------------------------------------

class Logger:
    """Metrics to ``metrics.jsonl`` (+ TensorBoard, wandb when asked for and installed); samples to JSONL."""

    def __init__(self, run: Path, cfg: LoggingConfig, *, start_step: int = 0, config: dict[str, Any] | None = None):
        self.run, self.cfg = run, cfg
        self.tb = self.wandb = None
        if cfg.tensorboard:
            if importlib.util.find_spec("tensorboard") is None:
                warnings.warn("logging.tensorboard=true but the tensorboard package is not installed: "
                              "skipping TensorBoard (pip install tensorboard)", stacklevel=2)
            else:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                warnings.warn("logging.wandb=true but wandb is not installed: skipping it", stacklevel=2)
            else:
                run_id = hashlib.sha1(str(run.resolve()).encode()).hexdigest()[:16]  # one wandb run per folder
                self.wandb = wandb.init(project=cfg.wandb_project, dir=str(run), config=config, resume="allow",
                                        id=run_id, name=str(run))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **metrics}
        if self.cfg.jsonl:
            append_jsonl(self.run / "metrics.jsonl", [record])
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def samples(self, records: list[dict[str, Any]]) -> None:
        if records:
            append_jsonl(self.run / "samples.jsonl", records)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def append_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        f.flush()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, *args: Any, **kwargs: Any) -> None: ...
    def close(self) -> None: ...


def progress_bar(total: int | None, *, initial: int = 0, desc: str = "", enabled: bool = True) -> Any:
    """A tqdm bar when tqdm is installed and ``enabled``, else an object with the same (no-op) methods."""
    if enabled and importlib.util.find_spec("tqdm") is not None:
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
    return _NoBar()


def distill_metric(estimator: str, divergence: str = "reverse_kl") -> str:
    """The logged name of the distillation term D_t (``vold_loss``'s ``distill_kl``), which says what it is:
    ``distill/reverse_kl`` (or ``distill/forward_kl``, ``distill/jsd``) for the exact divergence over the
    vocabulary (``loss.distill_estimator=full``), ``distill/k1|k2|k3`` for the sampled-token estimate of reverse
    KL (k2 = (log p - log q)^2 / 2; its mean is not the KL)."""
    return f"distill/{divergence if estimator == 'full' else estimator}"


def log_names(metrics: dict[str, Any], *, distill: str | None = None) -> dict[str, Any]:
    """The names metrics are logged under (README, "Metrics"): optimisation quantities under ``train/`` (``loss``
    -> ``train/loss``, ``grad_norm``, ``lr``, ``entropy``, ``ratio``, ``clip_low``...), ``distill_kl`` under
    ``distill`` (:func:`distill_metric`), already namespaced keys (``reward/``, ``completion/``, ``time/``...) as
    they are."""
    out = {}
    for key, value in metrics.items():
        if key == "distill_kl":
            if distill is None:
                raise ValueError("log_names: a distill_kl metric needs its name (distill_metric(...))")
            out[distill] = value
        else:
            out[key if "/" in key else f"train/{key}"] = value
    return out


def scalar_metrics(values: dict[str, Any]) -> dict[str, float]:
    """Plain floats (tensors ``.item()``-ed) for the logs (``json`` writes NaN as ``NaN`` and reads it back)."""
    return {key: float(value.item() if isinstance(value, torch.Tensor) else value) for key, value in values.items()}
