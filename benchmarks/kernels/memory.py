"""Peak memory of one row: on CUDA in process (``torch.cuda.max_memory_allocated``), on the CPU in a fresh
child process per (shape, implementation, estimator) (``python -m benchmarks.kernels --child``: VmHWM,
reset after a warm-up call, minus the RSS once the inputs exist)."""

from __future__ import annotations

import gc
from dataclasses import asdict
from typing import Any

import torch

from ..harness import peak_rss, run_child
from .candidates import Step, build_step
from .config import COMPILED, Settings, Shape
from .inputs import Inputs, make_inputs


def cuda_peak(step: Step, inp: Inputs, device: torch.device) -> dict[str, Any]:
    """Peak allocated CUDA memory of one call above what was allocated before it (inputs)."""
    inp.zero_grads()
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    inp.zero_grads()
    return {"peak_extra_bytes": peak - base, "mem_status": "ok", "mem_method": "cuda max_memory_allocated"}


def child_measure(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: make the inputs, warm up, then the peak RSS of one call above the baseline."""
    s = Settings.from_dict(spec["settings"])
    shape, impl, estimator = Shape(**spec["shape"]), spec["impl"], spec["estimator"]
    inp = make_inputs(shape, s, teacher_logprobs=estimator == "k2")
    step = build_step(impl, estimator, inp, s)
    for _ in range(max(1 if impl in COMPILED else 0, s.mem_warmup)):
        inp.zero_grads()
        step()
    inp.zero_grads()
    return peak_rss(step)


def measure_in_child(shape: Shape, impl: str, estimator: str, s: Settings) -> dict[str, Any]:
    """Run :func:`child_measure` in ``python -m benchmarks.kernels --child`` and return its result."""
    spec = {"shape": asdict(shape), "impl": impl, "estimator": estimator, "settings": asdict(s)}
    return run_child("benchmarks.kernels", spec, timeout=s.child_timeout)
