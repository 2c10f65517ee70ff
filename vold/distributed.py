"""Data-parallel training of the student: one process per device, launched by ``torchrun`` (or the
``deepspeed`` launcher), which sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``.

    torchrun --nproc_per_node 8 -m vold train --config configs/paper_1x8_gpu.yaml
    torchrun --nproc_per_node 8 -m vold train --config configs/paper_1x8_gpu.yaml distributed.backend=deepspeed

``distributed.backend``:

- ``ddp`` (default): PyTorch ``DistributedDataParallel`` (gloo on the CPU, nccl on CUDA); every rank holds
  the whole student and its AdamW state, gradients are averaged over the ranks during the backward pass.
  A single process (no launcher) trains exactly as before, without any wrapper.
- ``deepspeed``: a DeepSpeed engine (ZeRO-2: optimizer state and gradients partitioned over the ranks;
  ZeRO-3 also the parameters) from ``distributed.deepspeed_config`` (JSON; ``"auto"`` values are filled
  from the run config). The optimizer and the lr schedule are still the trainer's (``optim.*``/``sft.*``).

What every rank does (W ranks, rank r):

- **data**: the seeded sampler draws the same global batch on every rank and rank r keeps
  ``indices[r::W]``, so W processes with global batch B see exactly the prompts of one process with
  batch B (``data.batch_size`` and ``sft.batch_size * sft.grad_accum`` are global, divisible by W);
- **rollouts**: each rank samples its own prompts' completions; the sampling seed of a prompt depends on
  ``(seed, step, its position in the global batch)`` only, never on the rank (``prompt_seeds``);
- **teacher** (and reference): a full frozen copy per rank, colocated with the student;
- **loss normalisation**: gradients are averaged (divided by W), so every rank scales its loss by W over
  the *global* count: dapo's ``token_normalizer`` = all-reduced minibatch token count / W, grpo/dr_grpo
  weight each micro-batch by ``len(micro) * W / global minibatch sequences``, SFT divides by the
  all-reduced token count / W; the update equals the single-process one on the union of the shards;
- **metrics** are all-reduced (token-weighted means, sums) or computed from all ranks' rollouts;
- **files**: rank 0 alone writes logs, samples, config, checkpoints (model, scheduler, sampler, every
  rank's RNG state; DDP: rank 0's optimizer state, which is every rank's; DeepSpeed: the engine's
  partitioned optimizer state in ``step_N/deepspeed/``, written by every rank) and the final model.
  ``output_dir`` must be one shared folder for multi-node runs. What a checkpoint holds and how a resume
  restores it is the run's lifecycle, :class:`vold.stage.Stage`; this module is the process topology only.

All student passes that take gradients run inside :class:`StudentPasses` (the module DDP/DeepSpeed wrap):
the fused losses read the lm_head weight instead of calling the head, so the whole loss, not only the
hidden states, runs inside the wrapped forward, where DDP and ZeRO hook their reductions.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from vold.config import DistributedConfig
from vold.models import is_vision_config, lm_head_bias, lm_head_weight, resolve_device
from vold.runs import clip_grad_norm


def prompt_seeds(seed: int, step: int, positions: Iterable[int]) -> list[int]:
    """Sampling seeds of the prompts at ``positions`` of step ``step``'s global batch: a hash of
    ``(seed, step, position)`` only (in [0, 2**31)), so a prompt's completions do not depend on which rank
    samples it, nor on the other prompts of its batch."""
    return [int.from_bytes(hashlib.blake2b(f"{seed}/{step}/{int(p)}".encode(), digest_size=8).digest(), "little")
            % 2**31 for p in positions]


class StudentPasses(torch.nn.Module):
    """``forward(fn, *args, **kwargs)`` is ``fn(model, *args, **kwargs)``: any differentiable pass of the
    student (hidden states + fused loss) as the forward of one module that DDP or DeepSpeed can wrap."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.model, *args, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(path: str | None, *, grad_accum: int, max_grad_norm: float,
                     bf16: bool = False) -> dict[str, Any]:
    """The DeepSpeed config: ``path`` (JSON) or ZeRO-2 by default, with ``"auto"`` values filled in.

    The trainer drives the micro-batches itself (explicit accumulation boundaries, its own loss scaling),
    so ``train_micro_batch_size_per_gpu`` is nominal (1) and ``gradient_accumulation_steps`` is the
    number of micro-batches per update; ``gradient_clipping`` is ``max_grad_norm``; ``bf16.enabled``
    "auto" follows the model's dtype/autocast. An ``optimizer`` or ``scheduler`` section is refused: they
    come from the run config (``optim``/``sft``), so the update is the same under every backend.
    """
    if path:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    else:
        config = {"zero_optimization": {"stage": 2}}
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ValueError(f"{path}: remove the '{section}' section: the optimizer and lr schedule come from the "
                             f"run config (optim.* / sft.*)")
    fills = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": grad_accum,
             "gradient_clipping": max_grad_norm}
    for key, value in fills.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    if config.get("train_batch_size") == "auto":  # DeepSpeed derives it: micro * accumulation * world size
        del config["train_batch_size"]
    for key in ("bf16", "fp16"):
        section = config.get(key)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = bf16 if key == "bf16" else False
    config.setdefault("zero_allow_untested_optimizer", True)  # torch's AdamW, wrapped by ZeRO
    config.setdefault("steps_per_print", 10**12)
    return config


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def install_vision_dummy(model: torch.nn.Module) -> list[Any]:
    """Keep a VLM's vision tower in every training graph (DeepSpeed ZeRO needs it; returns the hook handles).

    ZeRO reduces gradients in buckets, in the order the parameters' gradients become ready, and that order
    must be the same on every rank. A micro-batch without images leaves the vision tower out of the graph,
    so with image rows on some ranks only, the ranks' collectives no longer match (gloo aborts; NCCL may
    hang). Here a forward hook on the token embedding runs the vision tower on one blank image whenever the
    model is called with gradients and without ``pixel_values``, right where real images run (after the
    embedding), and adds ``0 *`` its output: the same graph as an image batch, zero gradient, one
    ``spatial_merge_size**2``-patch vision pass per such micro-batch."""
    base = model.base_model
    vc = model.config.vision_config
    merge = vc.spatial_merge_size
    width = getattr(vc, "in_channels", None) or getattr(vc, "in_chans", 3)
    width *= vc.temporal_patch_size * vc.patch_size**2
    state = {"images": False}

    def before_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        state["images"] = kwargs.get("pixel_values") is not None

    def after_embedding(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if state["images"] or not torch.is_grad_enabled():
            return None
        pixels = torch.zeros(merge * merge, width, device=output.device, dtype=base.visual.dtype)
        grid = torch.tensor([[1, merge, merge]], device=output.device)
        features = base.get_image_features(pixels, grid)
        features = getattr(features, "pooler_output", features)
        if isinstance(features, (list, tuple)):
            features = torch.cat(list(features))
        return output + 0.0 * features.sum().to(output.dtype)

    return [base.register_forward_pre_hook(before_forward, with_kwargs=True),
            model.get_input_embeddings().register_forward_hook(after_embedding)]


class Runtime:
    """Where this process stands (rank, world size, device) and the data-parallel plumbing of one run: process
    group, the student's wrapper (forward, backward, accumulation, optimizer step) and the collectives.

    Built from the run config at the start of a stage; attaches to a process group that is already
    initialised (the tests' spawned workers), else initialises one when launched with ``WORLD_SIZE > 1``
    (or for DeepSpeed). A single process with the ``ddp`` backend has no wrapper at all: its numbers are
    the trainer's without this module.
    """

    def __init__(self, dc: DistributedConfig | None = None, device: str | torch.device = "auto"):
        self.dc = dc or DistributedConfig()
        self.owns_group = False
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        else:
            self.rank = int(os.environ.get("RANK", 0))
            self.world_size = int(os.environ.get("WORLD_SIZE", 1))
            self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.kind = "deepspeed" if self.dc.backend == "deepspeed" else ("ddp" if self.world_size > 1 else "single")
        self.device = resolve_device(device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.local_rank if self.device.index is None else self.device.index)
            torch.cuda.set_device(self.device)
        if self.kind != "single" and not dist.is_initialized():
            if self.world_size == 1:  # DeepSpeed in one process without a launcher
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                os.environ.setdefault("MASTER_PORT", str(_free_port()))
            backend = self.dc.process_group_backend
            if backend == "auto":
                backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, rank=self.rank, world_size=self.world_size, init_method="env://",
                                    timeout=datetime.timedelta(minutes=self.dc.timeout_minutes))
            self.owns_group = True
        self.model: torch.nn.Module | None = None
        self.module: Any = None  # the DDP module or the DeepSpeed engine (None: plain calls)
        self.engine: Any = None
        self.zero_stage = 0

    @classmethod
    def single(cls, model: torch.nn.Module | None = None) -> Runtime:
        """One process, no wrapper, no collectives (what the trainer's functions use without a runtime),
        even when a process group exists for something else."""
        rt = cls.__new__(cls)
        rt.dc, rt.owns_group, rt.kind = DistributedConfig(), False, "single"
        rt.rank, rt.world_size, rt.local_rank = 0, 1, 0
        rt.device = next(model.parameters()).device if model is not None else torch.device("cpu")
        rt.model, rt.module, rt.engine, rt.zero_stage = model, None, None, 0
        return rt

    # ---- who am I ------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's share of a global batch: ``items[rank::world_size]``."""
        return list(items[self.rank::self.world_size])

    def check_divisible(self, count: int, what: str) -> None:
        if count % self.world_size:
            raise ValueError(f"{what} = {count} must be divisible by the number of processes ({self.world_size}): "
                             f"every rank takes the same share of the global batch")

    def close(self) -> None:
        """Tear down the process group if this runtime created it."""
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False

    # ---- the student ---------------------------------------------------------------------------

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, grad_accum: int,
             max_grad_norm: float, bf16: bool = False, zero3: str | None = None) -> None:
        """Wrap the student for the backend (DDP module / DeepSpeed engine around :class:`StudentPasses`).
        ``zero3``: None allows ZeRO-3, else the reason it is refused (raised as an error)."""
        self.model, self.optimizer = model, optimizer
        if self.kind == "ddp":
            import inspect

            from torch.nn.parallel import DistributedDataParallel

            # the buffers (rotary frequencies) are the same on every rank: no broadcast before each forward
            no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers"
                       in inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
            self.module = DistributedDataParallel(
                StudentPasses(model), device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # the vision tower gets no gradient from text-only batches; the lm_head is used inside forward
                find_unused_parameters=self.dc.find_unused_parameters, **no_sync,
            )
        elif self.kind == "deepspeed":
            try:
                import deepspeed
            except ImportError as error:
                raise ImportError("distributed.backend='deepspeed' needs DeepSpeed (pip install deepspeed)") from error
            import logging

            # DeepSpeed's logger (created at INFO by its import) prints a dozen config lines per engine through the
            # tqdm bars: warnings and errors only (its accelerator line is avoided by vold.cli.quiet_third_party)
            logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
            config = deepspeed_config(self.dc.deepspeed_config, grad_accum=grad_accum, max_grad_norm=max_grad_norm,
                                      bf16=bf16)
            self.zero_stage = zero_stage(config)
            if self.zero_stage == 3 and zero3 is not None:
                raise ValueError(f"{self.dc.deepspeed_config}: ZeRO stage 3 {zero3}")
            wrapper = StudentPasses(model)
            if self.zero_stage == 3:  # the fused loss reads the head's weight without calling the head
                for param in (lm_head_weight(model), lm_head_bias(model)):
                    if param is not None:
                        deepspeed.zero.register_external_parameter(wrapper, param)
            self.engine, *_ = deepspeed.initialize(model=wrapper, optimizer=optimizer, config=config,
                                                   dist_init_required=False)
            self.module = self.engine
            if is_vision_config(model.config):  # after ZeRO-3's hooks: the embedding is released, then the tower
                self.hooks = install_vision_dummy(model)

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(student, *args, **kwargs)`` through the wrapper (gradient hooks), or directly."""
        if self.module is None:
            return fn(self.model, *args, **kwargs)
        return self.module(fn, *args, **kwargs)

    @contextlib.contextmanager
    def accumulate(self, last: bool) -> Iterator[None]:
        """Around the forward + backward of one micro-batch: gradients are reduced only after ``last``."""
        if self.kind == "ddp" and not last:
            with self.module.no_sync():
                yield
            return
        if self.kind == "deepspeed":
            self.engine.set_gradient_accumulation_boundary(last)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        if self.kind == "deepspeed":
            self.engine.backward(loss, scale_wrt_gas=False)  # the trainer scales its micro-batch losses itself
        else:
            loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, scheduler: Any, max_grad_norm: float) -> float:
        """Clip, optimizer step, lr schedule step, zero the gradients; returns the norm before clipping."""
        if self.kind == "deepspeed":
            self.engine.step()  # clips to gradient_clipping, steps the (ZeRO-wrapped) AdamW, zeroes the grads
            scheduler.step()
            norm = self.engine.get_global_grad_norm()
            return float("nan") if norm is None else float(norm)
        norm = clip_grad_norm(self.model.parameters(), max_grad_norm)
        if not math.isfinite(norm):  # clipping cannot fix a NaN/inf gradient: the update would write NaN weights
            optimizer.zero_grad(set_to_none=True)
            raise ValueError(f"the gradient norm is {norm} at this update (the loss or its gradient is NaN/inf): the "
                             "run diverged and nothing was applied; lower the learning rate (optim.lr, sft.lr, "
                             "sophia.lr) and resume from the last checkpoint")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[None]:
        """ZeRO-3: the student's whole parameters on every rank inside the block (saving, weight sync)."""
        if self.kind == "deepspeed" and self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                yield
            return
        yield

    # ---- collectives ---------------------------------------------------------------------------

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over the ranks (float64)."""
        if not self.distributed:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def max(self, value: float) -> float:
        if not self.distributed:
            return float(value)
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along dim 0 in rank order (on the CPU; shapes may differ)."""
        if not self.distributed:
            return tensor
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, tensor.detach().cpu())
        return torch.cat(parts)

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, obj)
        return parts

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()
