"""One training run of a stage (``vold sft``, ``vold train``, ``vold sophia``): the skeleton every stage shares,
so each stage module keeps only its own loop::

    stage = Stage(cfg, "sft", "sft", max_steps=...)      # the runtime (vold.distributed: rank, device, group)
    ...checks on the user's input...                      # nothing written yet
    checkpoint = stage.prepare()                          # resume only when asked (vold.runs.prepare_run)
    ...model path checks; seed; load the models from stage.model_path(start)...
    stage.open(model, processor, sampler, ...)            # run folder + config, AdamW, lr schedule, DDP/ZeRO wrap,
                                                          # resume, start-up summary, logger, progress bar
    while stage.step < stage.max_steps:
        ...one step...
        stage.end_step(metrics, samples=..., postfix=...) # step + 1, logs, bar, checkpoint every checkpoint.every
    return stage.close()                                  # logger closed, run/final saved, process group released

Process topology and collectives stay in :class:`vold.distributed.Runtime`; the run's files (folder, checkpoints,
logs) are :mod:`vold.runs`; this module is the run's lifecycle between them: what is saved in a checkpoint, how
a resume restores it (every rank's RNG, DeepSpeed's partitions, the re-planned lr schedule) and the final model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vold.config import Config
from vold.distributed import Runtime
from vold.models import is_adapter_folder
from vold.runs import (
    Logger,
    checkpoint_dir,
    load_checkpoint_state,
    log_names,
    make_optimizer,
    make_scheduler,
    prepare_run,
    print_start,
    progress_bar,
    replan_schedule,
    reset_logs,
    restore_run,
    rng_state,
    run_dir,
    save_checkpoint,
    save_final,
    scalar_metrics,
    set_rng_state,
    start_run,
)

DEEPSPEED_DIR = "deepspeed"  # inside a checkpoint folder: the engine's own checkpoint (ZeRO partitions)
DEEPSPEED_TAG = "zero"


@contextlib.contextmanager
def phase_timer(timings: dict[str, float] | None, name: str, device: torch.device | None = None) -> Iterator[None]:
    """Add the wall seconds of the block to ``timings[name]`` (nothing when ``timings`` is None); on CUDA
    the device is synchronised before and after, so queued kernels count in the phase that launched them."""
    if timings is None:
        yield
        return
    sync = device is not None and device.type == "cuda"
    if sync:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        if sync:
            torch.cuda.synchronize(device)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def student_start(cfg: Config) -> str:
    """The model stage 2 starts from: the SFT stage's final model when ``sft.enabled``, else ``model.student``."""
    if not cfg.sft.enabled:
        return cfg.model.student
    path = run_dir(cfg, "sft") / "final"
    if not (path / "config.json").is_file() and not is_adapter_folder(path):
        raise FileNotFoundError(f"sft.enabled=true but {path} has no model: run `vold sft` with this config first "
                                f"(or set sft.enabled=false to start from model.student)")
    return str(path)


class Stage:
    """The run of one stage: ``folder`` is its run folder's name under ``output_dir`` (``sft``, ``rl``, ``sophia``),
    ``name`` the command it prints (``sft``, ``train``, ``sophia``), ``max_steps`` its length in steps.

    After :meth:`open`: ``run`` (the folder), ``model`` (the student), ``optimizer``, ``scheduler``, ``step``
    (steps done: 0, or the checkpoint's), ``logger`` (rank 0 only, else None) and ``bar``."""

    def __init__(self, cfg: Config, folder: str, name: str, *, max_steps: int):
        self.cfg, self.folder, self.name, self.max_steps = cfg, folder, name, max_steps
        self.runtime = Runtime(cfg.distributed, cfg.device)  # data parallel under torchrun (vold.distributed)
        self.checkpoint: Path | None = None
        self.step = 0
        self.logger: Logger | None = None
        self.bar: Any = None

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    # ---- opening -------------------------------------------------------------------------------

    def prepare(self) -> Path | None:
        """How the run starts (:func:`vold.runs.prepare_run`, decided by rank 0 and broadcast): the checkpoint to
        resume from, or None. Nothing is written; call it after the checks on the data."""
        rt = self.runtime
        self.checkpoint = rt.broadcast(prepare_run(self.cfg, self.folder, max_steps=self.max_steps)
                                       if rt.is_main else None)
        return self.checkpoint

    def model_path(self, start: str | None) -> str | None:
        """Where the student loads from: the checkpoint's ``model/`` on a resume, else ``start``."""
        return str(self.checkpoint / "model") if self.checkpoint else start

    def open(self, model: torch.nn.Module, processor: Any, sampler: Any, *, section: Any, updates: int, start_from: str,
             examples: int, files: list[str], extra: dict[str, Any] | None = None, zero3: str | None = None) -> int:
        """Write the run folder (config.yaml; rank 0), build AdamW and the lr schedule from ``section``
        (``cfg.optim``, ``cfg.sft`` or ``cfg.sophia``: ``lr``, ``weight_decay`` (None: ``optim.weight_decay``),
        ``lr_scheduler``, ``warmup_steps``, ``min_lr_ratio``, ``grad_accum``) over ``updates`` optimizer updates,
        wrap the student (DDP/DeepSpeed; ``zero3``: why ZeRO-3 is refused, or None), resume from the checkpoint
        (``sampler``: the data position, a ``vold.data.PromptSampler``),
        print the start-up summary and start the logger and the progress bar. Returns the step to start from."""
        cfg, oc, rt = self.cfg, self.cfg.optim, self.runtime
        self.run = start_run(cfg, self.folder, write=rt.is_main, seed=False)
        self.model, self.processor, self.sampler = model, processor, sampler
        decay = oc.weight_decay if section.weight_decay is None else section.weight_decay
        self.optimizer = make_optimizer(model, section.lr, weight_decay=decay, betas=(oc.adam_beta1, oc.adam_beta2),
                                        eps=oc.adam_eps)
        self.scheduler = make_scheduler(self.optimizer, kind=section.lr_scheduler, warmup=section.warmup_steps,
                                        total=updates, min_ratio=section.min_lr_ratio)
        rt.wrap(model, self.optimizer, grad_accum=section.grad_accum, max_grad_norm=oc.max_grad_norm,
                bf16="bfloat16" in (cfg.model.dtype, cfg.model.autocast), zero3=zero3)
        self.step = self.resume()
        if rt.is_main:
            print_start(self.name, start_from=str(self.checkpoint or start_from), run=self.run, model=model,
                        examples=examples, files=files, steps=self.max_steps, start_step=self.step, extra=extra)
            self.logger = Logger(self.run, cfg.logging, start_step=self.step, config=dataclasses.asdict(cfg))
        self.bar = progress_bar(self.max_steps, initial=self.step, desc=self.name,
                                enabled=cfg.logging.progress and rt.is_main)
        return self.step

    def resume(self) -> int:
        """Continue the run from :attr:`checkpoint` (scheduler, sampler position, logs cut back to its step,
        optimizer state and this rank's RNG; after the wrap), or start its logs afresh when it is None.
        Returns the step to continue from (0 for a fresh run).

        The lr schedule is the one of *this* config, fast-forwarded to the checkpoint: the scheduler was built for
        this run's total (``max_steps``), its position (``last_epoch``, optimizer updates so far) comes from the
        checkpoint and every group's lr is recomputed from it (:func:`vold.runs.replan_schedule`). A run extended
        with a larger ``max_steps`` thus continues on the schedule planned for the new total, from the step it
        reached (a run of the same length continues exactly). A checkpoint past ``max_steps`` is refused."""
        checkpoint, rt = self.checkpoint, self.runtime
        if checkpoint is None:
            if rt.is_main:
                reset_logs(self.run)
            return 0
        state = load_checkpoint_state(checkpoint)
        if state["step"] > self.max_steps:
            raise ValueError(f"--resume: {checkpoint} is at step {state['step']}, past this config's max_steps="
                             f"{self.max_steps}: raise max_steps to extend the run, or start a new one")
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        if rt.is_main:
            restore_run(self.run, state)
            print(f"{self.name}: resumed from {checkpoint} (step {state['step']})")
        self._load_checkpoint(checkpoint, state)
        replan_schedule(self.optimizer, self.scheduler)
        return state["step"]

    def _load_checkpoint(self, checkpoint: Path, state: dict[str, Any]) -> None:
        """Optimizer state (DDP/single: ``state["optimizer"]``; DeepSpeed: the engine's partitions) and this
        rank's RNG state (after the wrap and after loading the scheduler's state)."""
        rt = self.runtime
        if rt.kind == "deepspeed":
            folder = checkpoint / DEEPSPEED_DIR
            if folder.is_dir():
                rt.engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
            # the schedule's current lr, whatever the engine restored
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
                group["lr"] = lr
        elif "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        ranks = state.get("rng_ranks")
        if ranks is not None and len(ranks) == rt.world_size:
            set_rng_state(ranks[rt.rank])
        else:
            set_rng_state(state["rng"])

    # ---- one step --------------------------------------------------------------------------------

    def end_step(self, metrics: dict[str, Any], *, samples: list[dict[str, Any]] | None = None,
                 distill: str | None = None, postfix: dict[str, str] | None = None) -> None:
        """Count the step; log ``metrics`` (under :func:`vold.runs.log_names`, ``distill``: the name of
        ``distill_kl``) and ``samples`` every ``logging.every`` steps and at the last; advance the bar (``postfix``);
        write a checkpoint every ``checkpoint.every`` steps."""
        self.step += 1
        step, every = self.step, self.cfg.logging.every
        if self.logger is not None and (step % every == 0 or step == self.max_steps):
            self.logger.log(step, scalar_metrics(log_names(metrics, distill=distill)))
            if samples is not None:
                self.logger.samples(samples)
        self.bar.update()
        self.bar.set_postfix(**(postfix or {}))
        self.save_training_checkpoint()

    def save_training_checkpoint(self) -> None:
        """Every ``checkpoint.every`` steps: scheduler, sampler position and (unless DeepSpeed saves its own
        partitions) optimizer state, through :meth:`save_checkpoint`."""
        cc = self.cfg.checkpoint
        if not cc.every or self.step % cc.every:
            return
        state = {"scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict()}
        if cc.save_optimizer and self.runtime.kind != "deepspeed":  # DeepSpeed: the engine saves it
            state["optimizer"] = self.optimizer.state_dict()
        self.save_checkpoint(state, keep_last=cc.keep_last)

    def save_checkpoint(self, state: dict[str, Any], *, keep_last: int) -> None:
        """``runs.save_checkpoint`` by rank 0 (model, state.pt), plus every rank's RNG state and, for DeepSpeed,
        the engine's partitioned optimizer state written by all ranks into the same ``.tmp`` folder first."""
        rt, run, step = self.runtime, self.run, self.step
        state = {**state, "rng_ranks": rt.gather_objects(rng_state()), "world_size": rt.world_size}
        if rt.kind == "deepspeed":
            state.pop("optimizer", None)
            tmp = checkpoint_dir(run, step)
            tmp = tmp.with_name(tmp.name + ".tmp")
            if rt.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            rt.barrier()
            rt.engine.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False)
            rt.barrier()
        with rt.full_parameters():
            if rt.is_main:
                save_checkpoint(run, step, self.model, self.processor, state, keep_last=keep_last,
                                clear_tmp=rt.kind != "deepspeed")
        rt.barrier()

    # ---- closing ---------------------------------------------------------------------------------

    def close(self) -> Path:
        """Close the bar and the logger, save the final model to ``run/final`` (``model.lora.save_merged``: a LoRA
        student's merged weights in ``final/merged`` too; rank 0 writes, every rank returns after it exists) and
        release the process group. Returns the final model's folder."""
        rt = self.runtime
        self.bar.close()
        if self.logger is not None:
            self.logger.close()
        final = self.run / "final"
        with rt.full_parameters():
            if rt.is_main:
                save_final(self.model, self.processor, final, merged=self.cfg.model.lora.save_merged)
        rt.barrier()
        if rt.is_main:
            print(f"{self.name}: {self.step} steps -> {final}")
        rt.close()
        return final
