"""Kernel benchmark of vold: time and peak memory of one loss, computed several ways on the same inputs.

The objective is the same in every row: GRPO clipped policy loss (token-level ratio, epsilon_low 0.2,
epsilon_high 0.3, loss_type "dapo" = mean over masked tokens) + 0.1 * reverse KL(student || teacher)
per token. Estimator "full" is the exact full-vocabulary KL (needs the teacher's hidden states and
lm_head); "k2" is the sampled-token estimate (logp - teacher_logp)^2 / 2 from given teacher log-probs.

Implementations (rows):

- naive           plain PyTorch, full [N, V] logits, autograd (benchmarks/naive.py)
- vold_torch      vold.kernels.vold_loss(impl="torch")
- vold_compile    vold.kernels.vold_loss(impl="torch_compile") (first call, i.e. compile, reported separately)
- vold_triton     vold.kernels.vold_loss(impl="triton"), CUDA only
- liger           LigerFusedLinearGRPOLoss + 0.1 * LigerFusedLinearJSDLoss(beta=1, soft only), eager
- liger_compiled  the same with compiled=True (first call, i.e. compile, reported separately)
- gemm_floor      only the unavoidable GEMMs (teacher logits, student logits, dX, dW; 3 for "k2"),
                  chunked with vold's chunk size: the floor for this loss on this machine
- gemm_unchunked  (opt-in) the same GEMMs on whole [N, V] buffers

Time: forward + backward, median of --repeats after --warmup calls, all rows of one shape in this
process on the same tensors, timed round-robin (row A, B, C, A, B, C, ...) so that drift hits all rows
alike. On a shared machine every timed call waits until other processes use < --max-foreign-cpu cores
and is re-timed (--retries) if they used more while it ran; that foreign CPU use is reported per row.

Peak memory ("peak extra": above the memory held once the inputs exist, including the gradients dX
and dW): CUDA, max_memory_allocated in process; CPU, peak RSS of a fresh child process per (shape,
implementation) (`--child`): VmHWM, reset after a warm-up call, minus the RSS once the inputs exist.

Outputs in --output (default benchmarks/results/): kernels_<tag>.json, kernels_<tag>.md and
kernels_<tag>_V<V>_H<H>_<dtype>.png (time and memory vs N, one line per implementation).

Examples:
  python -m benchmarks.kernels                    # default sweep for this device (CPU: ~30 min timing, + memory)
  python -m benchmarks.kernels --preset quick     # smoke run, < 1 min on CPU
  python -m benchmarks.kernels --preset headline  # (N,H,V) = (4096,1024,32768) and (2048,896,151936), fp32
  python -m benchmarks.kernels --preset headline --dtype bf16  # the same shapes, bf16 inputs (fp32 logits)
  python -m benchmarks.kernels --preset memory    # N=16384, V=32768: peak memory vs one [N, V] fp32 tensor
  python -m benchmarks.kernels --shapes 4096x1024x32768 --impls vold_torch,gemm_floor --estimators full
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .naive import chunked_logprobs, naive_vold_loss

EPSILON_LOW, EPSILON_HIGH, DISTILL_COEF, LOSS_TYPE = 0.2, 0.3, 0.1, "dapo"
IMPLS = ("gemm_floor", "gemm_unchunked", "vold_torch", "vold_compile", "vold_triton", "liger", "liger_compiled",
         "naive")
DEFAULT_IMPLS = ("gemm_floor", "vold_torch", "vold_compile", "vold_triton", "liger", "liger_compiled", "naive")
VOLD_ENGINE = {"vold_torch": "torch", "vold_compile": "torch_compile", "vold_triton": "triton"}
ESTIMATORS = ("full", "k2")
ESTIMATORS_OF = {"liger": ("full",), "liger_compiled": ("full",)}  # others: both
COMPILED = ("liger_compiled", "vold_compile")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Live [N, V] fp32-sized buffers of the naive baseline at its peak (measured on CPU: 6.0 full, 3.0 k2,
# rounded up); used only to skip it before it would exceed --naive-cap-gb.
NAIVE_NV_BUFFERS = {"full": 7.0, "k2": 4.0}
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_MARK = "@@VOLD_KERNEL_BENCH@@"
MIB = 1 << 20


@dataclass(frozen=True)
class Shape:
    """Tokens ``n``, student hidden ``h``, vocabulary ``v``; teacher hidden ``ht`` (default ``h``)."""

    n: int
    h: int
    v: int
    ht: int | None = None

    @property
    def teacher_h(self) -> int:
        return self.h if self.ht is None else self.ht

    @property
    def nv_fp32_bytes(self) -> int:
        return self.n * self.v * 4

    @classmethod
    def parse(cls, text: str) -> Shape:
        """``NxHxV`` or ``NxHxVxHt``, e.g. ``4096x1024x32768``."""
        parts = [int(p) for p in text.lower().split("x")]
        if len(parts) not in (3, 4) or min(parts) <= 0:
            raise argparse.ArgumentTypeError(f"shape {text!r} must be NxHxV or NxHxVxHt with positive ints")
        return cls(*parts)

    def __str__(self) -> str:
        return f"N={self.n} H={self.h} V={self.v}" + ("" if self.ht is None else f" Ht={self.ht}")


def _grid(ns: Sequence[int], hs: Sequence[int], vs: Sequence[int]) -> list[Shape]:
    return [Shape(n, h, v) for v, h, n in itertools.product(vs, hs, ns)]


# preset -> device type -> options (shapes, and optionally impls / estimators / dtype / repeats).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {
        "cpu": {"shapes": _grid((512, 1024), (64,), (8192,)), "repeats": 2, "wait_budget": 20.0, "mem_jobs": 2,
                "impls": ("gemm_floor", "vold_torch", "liger", "naive")},
        "cuda": {"shapes": _grid((1024, 4096), (896,), (32768,)), "repeats": 3},
    },
    "default": {
        # N over 1k-16k at V = 32768 and 1k-2k at V = 151,936; H scaled down to 256 on the CPU (the headline
        # preset has H = 1024 / 896, the full preset the Qwen widths 896 / 2048 / 3584)
        "cpu": {"shapes": _grid((1024, 2048, 4096, 8192, 16384), (256,), (32768,))
                + _grid((1024, 2048), (256,), (151936,)), "repeats": 2},
        "cuda": {"shapes": _grid((1024, 4096, 16384, 65536), (896, 3584), (32768, 151936))},
    },
    "full": {
        "cpu": {"shapes": _grid((1024, 2048, 4096, 8192, 16384), (896, 2048, 3584), (32768, 151936))},
        "cuda": {"shapes": _grid(tuple(1024 << i for i in range(7)), (896, 2048, 3584), (32768, 151936))},
    },
    "headline": {
        "cpu": {"shapes": [Shape(4096, 1024, 32768), Shape(2048, 896, 151936)], "estimators": ("full",),
                "dtype": "fp32"},
        "cuda": {"shapes": [Shape(4096, 1024, 32768), Shape(2048, 896, 151936)], "estimators": ("full",),
                 "dtype": "fp32"},
    },
    "memory": {
        "cpu": {"shapes": [Shape(16384, 256, 32768)], "estimators": ("full",)},
        "cuda": {"shapes": [Shape(16384, 896, 32768)], "estimators": ("full",)},
    },
}


@dataclass
class Settings:
    """Everything a run (and each of its child processes) needs besides the shape."""

    device: str = "cpu"
    dtype: str = "fp32"
    impls: tuple[str, ...] = DEFAULT_IMPLS
    estimators: tuple[str, ...] = ESTIMATORS
    repeats: int = 3
    warmup: int = 1
    seq_len: int = 512
    mask_fraction: float = 1.0
    chunk_size: int | None = None
    liger_grpo_chunk: int = 1
    liger_jsd_chunk: int = 1024
    naive_cap_bytes: int | None = None  # None: never skip naive
    memory: bool = True
    timing: bool = True
    mem_warmup: int = 1
    mem_jobs: int = 1  # memory children run at once (each measures only itself; mind the RAM)
    cold_compile: bool = False  # disable torch.compile's on-disk caches: first calls include a full compile
    child_timeout: float = 3600.0
    seed: int = 0
    max_foreign_cpu: float | None = 0.3  # cores used by other processes that spoil a timing (None: ignore)
    quiet_timeout: float = 30.0  # longest wait for the machine to be quiet before one timed call
    wait_budget: float = 600.0  # longest total wait of a run; then calls are only re-timed and flagged
    retries: int = 2  # re-timings of a call that other processes disturbed (while wait_budget lasts)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


# ---------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """One shape's tensors, padded layout ``[B, T]`` with ``B * T = N``; student tensors are leaves."""

    s_hidden: torch.Tensor  # [B, T, H], requires grad
    s_weight: torch.Tensor  # [V, H], requires grad
    t_hidden: torch.Tensor  # [B, T, Ht]
    t_weight: torch.Tensor  # [V, Ht]
    targets: torch.Tensor  # [B, T] int64
    mask: torch.Tensor  # [B, T] float 0/1
    advantages: torch.Tensor  # [B]
    old_logprobs: torch.Tensor  # [B, T] fp32
    teacher_logprobs: torch.Tensor | None  # [B, T] fp32, for "k2"
    n_active: int

    def zero_grads(self) -> None:
        self.s_hidden.grad = None
        self.s_weight.grad = None

    def grad_bytes(self) -> int:
        """Size of the gradients every implementation must produce (dX and dW)."""
        return (self.s_hidden.numel() + self.s_weight.numel()) * self.s_hidden.element_size()


def layout(n: int, seq_len: int) -> tuple[int, int]:
    """``(B, T)`` with ``B * T = n``: sequences of ``seq_len`` tokens when it divides ``n``, else one."""
    t = min(seq_len, n)
    return (n // t, t) if n % t == 0 else (1, n)


def active_tokens(n: int, s: Settings) -> int:
    """Unmasked tokens of the ``layout``: the first ``mask_fraction`` of each sequence."""
    b, t = layout(n, s.seq_len)
    return b * max(1, round(t * s.mask_fraction))


def make_inputs(shape: Shape, s: Settings, *, teacher_logprobs: bool) -> Inputs:
    """Deterministic inputs (same ``seed`` -> same tensors in every process); logits have std ~2."""
    device, dtype = torch.device(s.device), s.torch_dtype
    g = torch.Generator(device=device).manual_seed(s.seed)
    b, t = layout(shape.n, s.seq_len)
    h, ht, v = shape.h, shape.teacher_h, shape.v

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*size, generator=g, device=device, dtype=dtype).mul_(scale)

    s_hidden = randn(b, t, h)
    s_weight = randn(v, h, scale=2.0 / math.sqrt(h))
    t_hidden = randn(b, t, ht)
    t_weight = randn(v, ht, scale=2.0 / math.sqrt(ht))
    targets = torch.randint(0, v, (b, t), generator=g, device=device)
    advantages = torch.randn(b, generator=g, device=device)
    noise = 0.2 * torch.randn(b, t, generator=g, device=device)
    active_len = active_tokens(shape.n, s) // b
    mask = (torch.arange(t, device=device) < active_len).float().expand(b, t).contiguous()
    chunk = max(1, (1 << 23) // v)
    logp = chunked_logprobs(s_hidden.view(-1, h), s_weight, targets.view(-1), chunk).view(b, t)
    t_logp = None
    if teacher_logprobs:
        t_logp = chunked_logprobs(t_hidden.view(-1, ht), t_weight, targets.view(-1), chunk).view(b, t)
    return Inputs(
        s_hidden=s_hidden.requires_grad_(True), s_weight=s_weight.requires_grad_(True), t_hidden=t_hidden,
        t_weight=t_weight, targets=targets, mask=mask, advantages=advantages, old_logprobs=logp + noise,
        teacher_logprobs=t_logp, n_active=active_tokens(shape.n, s),
    )


# ---------------------------------------------------------------------------------------------------
# implementations: each step() runs forward + backward and returns the loss (or None)
# ---------------------------------------------------------------------------------------------------

Step = Callable[[], "torch.Tensor | None"]


def vold_chunk_size(n: int, v: int, device: torch.device, override: int | None) -> int:
    """The chunk (rows) vold uses for ``n`` active tokens: its own rule unless overridden, at most ``n``."""
    if override:
        return max(1, min(n, override))
    from vold.kernels.chunked import default_chunk_size

    return max(1, min(n, default_chunk_size(v, device)))


def _vold_step(inp: Inputs, estimator: str, impl: str, s: Settings) -> Step:
    from vold.kernels import vold_loss

    teacher = (dict(teacher_hidden=inp.t_hidden, teacher_weight=inp.t_weight) if estimator == "full"
               else dict(teacher_logprobs=inp.teacher_logprobs))

    def step() -> torch.Tensor:
        loss, _ = vold_loss(
            inp.s_hidden, inp.s_weight, inp.targets, inp.advantages, inp.old_logprobs, inp.mask, **teacher,
            loss_type=LOSS_TYPE, epsilon_low=EPSILON_LOW, epsilon_high=EPSILON_HIGH, distill_coef=DISTILL_COEF,
            distill_estimator=estimator, impl=impl, chunk_size=s.chunk_size,
        )
        loss.backward()
        return loss.detach()

    return step


def _naive_step(inp: Inputs, estimator: str) -> Step:
    def step() -> torch.Tensor:
        loss = naive_vold_loss(
            inp.s_hidden, inp.s_weight, inp.targets, inp.advantages, inp.old_logprobs, inp.mask,
            teacher_hidden=inp.t_hidden, teacher_weight=inp.t_weight, teacher_logprobs=inp.teacher_logprobs,
            epsilon_low=EPSILON_LOW, epsilon_high=EPSILON_HIGH, distill_coef=DISTILL_COEF,
            distill_estimator=estimator,
        )
        loss.backward()
        return loss.detach()

    return step


def _liger_step(inp: Inputs, compiled: bool, s: Settings) -> Step:
    """GRPO (no ref model, beta=0) + 0.1 * reverse KL via JSD(beta=1), as a TRL user would combine them."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss, LigerFusedLinearJSDLoss

    grpo = LigerFusedLinearGRPOLoss(
        beta=0.0, compiled=compiled, use_ref_model=False, chunk_size=s.liger_grpo_chunk,
        epsilon_low=EPSILON_LOW, epsilon_high=EPSILON_HIGH, loss_type=LOSS_TYPE,
    )
    jsd = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0, compiled=compiled, chunk_size=s.liger_jsd_chunk,
    )
    h, ht = inp.s_hidden.shape[-1], inp.t_hidden.shape[-1]
    labels = inp.targets.masked_fill(inp.mask == 0, -100).reshape(-1)
    t_hidden = inp.t_hidden.reshape(-1, ht)

    def step() -> torch.Tensor:
        pg, _ = grpo(inp.s_hidden, inp.s_weight, inp.targets, inp.mask, inp.advantages,
                     old_per_token_logps=inp.old_logprobs)
        kl = jsd(inp.s_hidden.view(-1, h), inp.s_weight, t_hidden, inp.t_weight, labels)
        loss = pg + DISTILL_COEF * kl
        loss.backward()
        return loss.detach()

    return step


def _gemm_step(inp: Inputs, estimator: str, chunk: int) -> Step:
    """The GEMMs any implementation must do, ``chunk`` rows at a time, with the student logits standing
    in for dL/dlogits: teacher logits (full only), student logits, dX = dZ W, dW += dZ^T X."""
    h, ht = inp.s_hidden.shape[-1], inp.t_hidden.shape[-1]
    x, w = inp.s_hidden.detach().reshape(-1, h), inp.s_weight.detach()
    xt, wt = inp.t_hidden.reshape(-1, ht), inp.t_weight
    n, v = inp.n_active, w.shape[0]

    def step() -> None:
        rows = min(chunk, n)
        z = torch.empty(rows, v, dtype=w.dtype, device=w.device)
        u = torch.empty(rows, v, dtype=w.dtype, device=w.device) if estimator == "full" else None
        dx = torch.empty(n, h, dtype=w.dtype, device=w.device)
        dw = torch.zeros_like(w)
        for start in range(0, n, rows):
            end = min(n, start + rows)
            if u is not None:
                torch.mm(xt[start:end], wt.t(), out=u[: end - start])
            zc = z[: end - start]
            torch.mm(x[start:end], w.t(), out=zc)
            torch.mm(zc, w, out=dx[start:end])
            dw.addmm_(zc.t(), x[start:end])
        return None

    return step


def build_step(impl: str, estimator: str, inp: Inputs, s: Settings) -> Step:
    """The forward+backward callable of one row."""
    device = torch.device(s.device)
    if impl == "naive":
        return _naive_step(inp, estimator)
    if impl in VOLD_ENGINE:
        return _vold_step(inp, estimator, VOLD_ENGINE[impl], s)
    if impl in ("liger", "liger_compiled"):
        return _liger_step(inp, impl == "liger_compiled", s)
    if impl == "gemm_floor":
        return _gemm_step(inp, estimator, vold_chunk_size(inp.n_active, inp.s_weight.shape[0], device, s.chunk_size))
    if impl == "gemm_unchunked":
        return _gemm_step(inp, estimator, inp.n_active)
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")


# ---------------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Step, device: torch.device) -> tuple[float, torch.Tensor | None]:
    _sync(device)
    start = time.perf_counter()
    out = step()
    _sync(device)
    return time.perf_counter() - start, out


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc), so that RSS baselines are tight."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _failure(exc: BaseException) -> str:
    """``"oom"`` for allocation failures, else ``"error: ..."``."""
    oom_types = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
    text = str(exc).lower()
    if isinstance(exc, oom_types) or (isinstance(exc, RuntimeError) and any(
            k in text for k in ("out of memory", "can't allocate", "cannot allocate", "not enough memory"))):
        return "oom"
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"error: {type(exc).__name__}: {first}"


_WAIT_SPENT = [0.0]  # seconds this run has waited for a quiet machine


class CpuMonitor:
    """CPU time used by *other* processes (in cores) over an interval, from /proc/stat and /proc/self/stat."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.ok = self._read() is not None
        self.last = 0.0  # foreign cores during the last timed call (waits only follow a disturbed one)

    @staticmethod
    def _read() -> tuple[int, int] | None:
        """(busy jiffies of the whole machine incl. steal, jiffies of this process)."""
        try:
            with open("/proc/stat") as f:
                cpu = [int(x) for x in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                own = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        busy = sum(cpu[:8]) - cpu[3] - cpu[4]  # user nice system [idle iowait] irq softirq steal
        return busy, int(own[11]) + int(own[12])  # utime + stime of all threads

    def snapshot(self) -> tuple[float, tuple[int, int] | None]:
        return time.perf_counter(), self._read() if self.ok else None

    def foreign(self, a: tuple[float, tuple[int, int] | None], b: tuple[float, tuple[int, int] | None]) -> float:
        if a[1] is None or b[1] is None or b[0] <= a[0]:
            return 0.0
        return max(0.0, ((b[1][0] - a[1][0]) - (b[1][1] - a[1][1])) / self.tick / (b[0] - a[0]))

    def wait_quiet(self, s: Settings) -> float:
        """Wait (0.5 s samples) until other processes use <= ``s.max_foreign_cpu`` cores, at most
        ``s.quiet_timeout`` and within what is left of ``s.wait_budget``; returns the time waited."""
        waited = 0.0
        if s.max_foreign_cpu is None or not self.ok or self.last <= s.max_foreign_cpu:
            return waited
        while waited < min(s.quiet_timeout, s.wait_budget - _WAIT_SPENT[0]):
            a = self.snapshot()
            time.sleep(0.5)
            waited += 0.5
            _WAIT_SPENT[0] += 0.5
            self.last = self.foreign(a, self.snapshot())
            if self.last <= s.max_foreign_cpu:
                break
        return waited

    def timed(self, step: Step, device: torch.device) -> tuple[float, torch.Tensor | None, float]:
        """``_timed`` plus the foreign CPU use meanwhile (also kept as ``last``)."""
        before = self.snapshot()
        elapsed, out = _timed(step, device)
        self.last = self.foreign(before, self.snapshot())
        return elapsed, out, self.last


def time_rows(steps: dict[tuple[str, str], Step], inp: Inputs, s: Settings) -> dict[tuple[str, str], dict]:
    """Time every row: first call(s) row by row, then ``repeats`` round-robin rounds.

    Each timed call waits for a quiet machine and is re-timed (up to ``retries``) when other processes
    used more than ``max_foreign_cpu`` cores meanwhile. A row that raises is dropped with its failure.
    """
    device = torch.device(s.device)
    mon = CpuMonitor()
    res: dict[tuple[str, str], dict] = {}
    for key, step in steps.items():
        r = res[key] = {"times_s": [], "foreign_cpu": [], "retimed": 0, "waited_s": 0.0}
        try:
            for i in range(max(1, s.warmup)):
                inp.zero_grads()
                gc.collect()
                r["waited_s"] += mon.wait_quiet(s)
                elapsed, out, _ = mon.timed(step, device)
                if i == 0:
                    grads = [g for g in (inp.s_hidden.grad, inp.s_weight.grad) if g is not None]
                    norm = math.sqrt(sum(float(g.float().square().sum()) for g in grads)) if grads else None
                    r.update(first_call_s=elapsed, loss=None if out is None else float(out), grad_norm=norm)
                    _log(f"    {key[0]} ({key[1]}): first call {elapsed:.3f} s")
        except Exception as exc:  # noqa: BLE001 - one failing row must not end the sweep
            r["status"] = _failure(exc)
            _log(f"    {key[0]} ({key[1]}): {r['status']}")
        inp.zero_grads()
        _release(device)
    for rnd in range(s.repeats):
        for key, step in steps.items():
            r = res[key]
            if "status" in r:
                continue
            try:
                for attempt in range(1 + max(0, s.retries)):
                    inp.zero_grads()
                    gc.collect()
                    r["waited_s"] += mon.wait_quiet(s)
                    elapsed, _, foreign = mon.timed(step, device)
                    out_of_wait = _WAIT_SPENT[0] >= s.wait_budget  # a busy machine stays busy: stop re-timing
                    if s.max_foreign_cpu is None or foreign <= s.max_foreign_cpu or attempt == s.retries or out_of_wait:
                        r["times_s"].append(elapsed)
                        r["foreign_cpu"].append(round(foreign, 3))
                        _log(f"    {key[0]} ({key[1]}): round {rnd + 1}/{s.repeats} {elapsed:.3f} s "
                             f"(other processes {foreign:.2f} cores)")
                        break
                    r["retimed"] += 1
                    _log(f"    {key[0]} ({key[1]}): {elapsed:.3f} s disturbed ({foreign:.2f} cores), re-timing")
            except Exception as exc:  # noqa: BLE001
                r["status"] = _failure(exc)
            inp.zero_grads()
    for key, r in res.items():
        if r["times_s"]:
            r.update(time_s=statistics.median(r["times_s"]), time_min_s=min(r["times_s"]),
                     foreign_cpu_max=max(r["foreign_cpu"]))
        elif "first_call_s" in r and "status" not in r:
            r["time_s"] = r["first_call_s"]
        if key[0] in COMPILED and r.get("time_s") is not None and "first_call_s" in r:
            r["compile_s"] = max(0.0, r["first_call_s"] - r["time_s"])  # compile (+ first-call overheads)
    return res


def _release(device: torch.device) -> None:
    _malloc_trim()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


def _proc_status_bytes(key: str) -> int | None:
    """``VmRSS``/``VmHWM`` of this process from /proc/self/status, in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss_bytes() -> int:
    rss = _proc_status_bytes("VmRSS")
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0) so that VmHWM restarts from now."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def child_measure(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: make the inputs, warm up, then peak RSS of one call above the baseline.

    The peak is VmHWM, reset after the warm-up. ``getrusage(RUSAGE_SELF).ru_maxrss`` is recorded too
    but not used: after fork + exec the kernel seeds it with the *parent's* high-water mark, so a
    child of a large parent reports the parent's size (ru_maxrss = max(inherited, own peak)).
    """
    s = Settings(**{**spec["settings"], "impls": tuple(spec["settings"]["impls"]),
                    "estimators": tuple(spec["settings"]["estimators"])})
    shape, impl, estimator = Shape(**spec["shape"]), spec["impl"], spec["estimator"]
    inp = make_inputs(shape, s, teacher_logprobs=estimator == "k2")
    step = build_step(impl, estimator, inp, s)
    for _ in range(max(1 if impl in COMPILED else 0, s.mem_warmup)):
        inp.zero_grads()
        step()
    inp.zero_grads()
    _malloc_trim()
    reset = _reset_peak_rss()
    base = _rss_bytes()
    out = step()
    hwm = _proc_status_bytes("VmHWM") if reset else None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del out
    if hwm is not None:
        peak, method = hwm, "child VmHWM (reset after warm-up) - RSS after inputs"
    else:
        peak, method = maxrss, "child ru_maxrss (lifetime) - RSS after inputs"
    return {"peak_extra_bytes": peak - base, "rss_base_bytes": base, "rss_peak_bytes": peak,
            "ru_maxrss_bytes": maxrss, "mem_status": "ok", "mem_method": method}


def run_child(shape: Shape, impl: str, estimator: str, s: Settings) -> dict[str, Any]:
    """Run ``child_measure`` in ``python -m benchmarks.kernels --child`` and parse its result."""
    spec = {"shape": asdict(shape), "impl": impl, "estimator": estimator, "settings": asdict(s)}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "benchmarks.kernels", "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=s.child_timeout, cwd=REPO_ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"mem_status": f"error: child timed out after {s.child_timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    if proc.returncode in (-9, 137):
        return {"mem_status": "oom (child killed)"}
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])[:300]
    return {"mem_status": f"error: child exit {proc.returncode}: {tail}"}


# ---------------------------------------------------------------------------------------------------
# one shape
# ---------------------------------------------------------------------------------------------------


def vold_engines() -> tuple[str, ...]:
    """The ``impl=`` values the installed vold accepts."""
    try:
        from vold.kernels import checks
    except ImportError:
        return ()
    return tuple(getattr(checks, "IMPLS", ("torch", "triton")))


def row_keys(s: Settings) -> list[tuple[str, str]]:
    return [(impl, est) for est in s.estimators for impl in IMPLS
            if impl in s.impls and est in ESTIMATORS_OF.get(impl, ESTIMATORS)]


def naive_estimate_bytes(shape: Shape, estimator: str) -> int:
    return int(NAIVE_NV_BUFFERS[estimator] * shape.nv_fp32_bytes)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_shape(shape: Shape, s: Settings) -> list[dict[str, Any]]:
    """Time every row of one shape in this process, then measure each row's peak memory."""
    device = torch.device(s.device)
    keys = row_keys(s)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for impl, est in keys:
        rows[impl, est] = {
            "impl": impl, "estimator": est, "n": shape.n, "h": shape.h, "ht": shape.teacher_h, "v": shape.v,
            "dtype": s.dtype, "device": s.device, "status": "ok", "nv_fp32_bytes": shape.nv_fp32_bytes,
            "mem_status": "not measured" if s.memory else "off",
        }
        if impl == "vold_triton" and device.type != "cuda":
            rows[impl, est]["status"] = "skipped (needs CUDA)"
        if impl in VOLD_ENGINE and VOLD_ENGINE[impl] not in vold_engines():
            rows[impl, est]["status"] = f"skipped (this vold has no impl={VOLD_ENGINE[impl]!r})"
        too_big = s.naive_cap_bytes is not None and naive_estimate_bytes(shape, est) > s.naive_cap_bytes
        if impl in ("naive", "gemm_unchunked") and too_big:
            rows[impl, est]["status"] = "skipped (memory)"
            rows[impl, est]["naive_estimate_bytes"] = naive_estimate_bytes(shape, est)
    if any(impl in COMPILED for impl, _ in keys):
        torch._dynamo.reset()  # every shape compiles afresh (and never hits the recompile limit)
    n_active = active_tokens(shape.n, s)
    floor_chunk = vold_chunk_size(n_active, shape.v, device, s.chunk_size)
    grad_bytes = (shape.n * shape.h + shape.v * shape.h) * torch.empty((), dtype=s.torch_dtype).element_size()
    for row in rows.values():
        row.update(n_active=n_active, grad_bytes=grad_bytes, chunk_rows=floor_chunk)
    load_before = os.getloadavg()[0]
    inp = make_inputs(shape, s, teacher_logprobs="k2" in s.estimators) if s.timing else None
    steps: dict[tuple[str, str], Step] = {}
    for key in keys:
        if rows[key]["status"] != "ok" or inp is None:
            continue
        try:
            steps[key] = build_step(*key, inp, s)
        except Exception as exc:  # noqa: BLE001
            rows[key]["status"] = _failure(exc)
    if inp is not None:
        for key, timing in time_rows(steps, inp, s).items():
            rows[key].update(timing)
    load = [load_before, os.getloadavg()[0]]
    if device.type == "cuda" and s.memory:
        for key, step in steps.items():
            if rows[key]["status"] == "ok":
                try:
                    rows[key].update(cuda_peak(step, inp, device))
                except Exception as exc:  # noqa: BLE001
                    rows[key]["mem_status"] = _failure(exc)
                _release(device)
    for key in keys:
        row = rows[key]
        row["load_avg_1m"] = load
        msg = f"{row['time_s']:.3f} s (min {row.get('time_min_s', row['time_s']):.3f}, first call " \
              f"{row['first_call_s']:.2f})" if row["status"] == "ok" and "time_s" in row else ""
        _log(f"  {shape} {key[0]:<15} {key[1]:<4} {row['status']:<6} {msg}")
    del steps
    del inp
    _malloc_trim()
    if device.type == "cpu" and s.memory:
        todo = [key for key in keys if rows[key]["status"] == "ok"]
        with ThreadPoolExecutor(max_workers=max(1, s.mem_jobs)) as pool:
            for key, mem in zip(todo, pool.map(lambda k: run_child(shape, *k, s), todo), strict=True):
                rows[key].update(mem)
                peak = mem.get("peak_extra_bytes")
                _log(f"  {shape} {key[0]:<15} {key[1]:<4} memory {mem['mem_status']}"
                     + ("" if peak is None else f" {peak / MIB:.1f} MiB"))
    for row in rows.values():
        if row.get("peak_extra_bytes") is not None:
            row["peak_extra_over_nv"] = row["peak_extra_bytes"] / shape.nv_fp32_bytes
    _add_ratios(list(rows.values()))
    return list(rows.values())


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """time / gemm_floor and time / naive, within the same estimator."""
    for est in ESTIMATORS:
        same = [r for r in rows if r["estimator"] == est]
        ref = {r["impl"]: r.get("time_s") for r in same if r["status"] == "ok"}
        for r in same:
            t = r.get("time_s") if r["status"] == "ok" else None
            r["ratio_floor"] = t / ref["gemm_floor"] if t and ref.get("gemm_floor") else None
            r["ratio_naive"] = t / ref["naive"] if t and ref.get("naive") else None


# ---------------------------------------------------------------------------------------------------
# machine info and outputs
# ---------------------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, memory, GPU, library versions, vold commit and kernels/ content hash, date."""
    cpu = platform.processor() or platform.machine()
    mem_total = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            mem_total = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemTotal"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / "vold" / "kernels").glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "mem_total_bytes": mem_total,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
        "liger_kernel": _version("liger_kernel") or _version("liger-kernel"), "vold": _version("vold"),
        "git_commit": commit, "kernels_sha256": digest.hexdigest()[:16],
    }


def _fmt(x: float | None, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _mib(x: int | None) -> str:
    return "-" if x is None else f"{x / MIB:,.0f}"


def markdown(result: dict[str, Any]) -> str:
    """The results table and a summary against the engine's targets."""
    m, rows = result["machine"], result["rows"]
    gpu = f", GPU {m['gpu']}" if m["gpu"] else ""
    out = [
        f"# vold kernel benchmark: {result['tag']}",
        "",
        f"{m['date']} | CPU {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads){gpu} | "
        f"torch {m['torch']}, triton {m['triton']}, liger-kernel {m['liger_kernel']} | vold {m['git_commit']} "
        f"(vold/kernels/ sha256 {m['kernels_sha256']}) | {result['elapsed_s']:.0f} s",
        "",
        *([] if result.get("complete", True) else ["**Partial: the sweep is still running or was stopped.**", ""]),
        "Objective: GRPO clipped loss (token ratio, eps 0.2/0.3, dapo) + 0.1 x reverse KL(student||teacher); "
        "forward + backward, median of "
        f"{result['settings']['repeats']} after {result['settings']['warmup']} warm-up. "
        "Peak extra = peak memory above the inputs, including the gradients dX, dW. "
        "Foreign CPU = most cores other processes used during a kept timed call (> 0.3: disturbed). "
        "Compile = first call - median, compiled rows only.",
        "",
        "| impl | est | N | H | V | dtype | time (s) | min (s) | x floor | x naive | first call (s) | compile (s) "
        "| peak extra (MiB) | / [N,V] fp32 | loss | foreign CPU | status |",
        "|---|---|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        status = r["status"] if r.get("mem_status") in ("ok", "off") else f"{r['status']}; memory {r['mem_status']}"
        out.append(
            f"| {r['impl']} | {r['estimator']} | {r['n']} | {r['h']} | {r['v']} | {r['dtype']} "
            f"| {_fmt(r.get('time_s'), '.3f')} | {_fmt(r.get('time_min_s'), '.3f')} | {_fmt(r.get('ratio_floor'))} "
            f"| {_fmt(r.get('ratio_naive'))} | {_fmt(r.get('first_call_s'))} | {_fmt(r.get('compile_s'), '.1f')} "
            f"| {_mib(r.get('peak_extra_bytes'))} "
            f"| {_fmt(r.get('peak_extra_over_nv'), '.3f')} | {_fmt(r.get('loss'), '.6g')} "
            f"| {_fmt(r.get('foreign_cpu_max'))} | {status} |"
        )
    out += ["", "## Summary against the targets", "",
            "Targets: engine <= 1.1 x gemm_floor; >= 2x faster than Liger (best of eager and compiled); "
            "peak extra <= 1/8 of one [N, V] fp32 tensor (target set at N=16384, V=32768: marked there only). "
            "'liger best / floor' bounds the speed-up over Liger of any implementation that runs at the floor: "
            "Liger's GRPO and JSD losses compute the student logits and their gradients twice (7 GEMMs vs 4).", "",
            "| engine | est | N | H | V | engine / floor | liger best / engine | liger best / floor | naive / floor "
            "| peak extra MiB: engine / liger / liger_c / naive / floor | engine extra / [N,V] fp32 |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|---|--:|"]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["estimator"], r["n"], r["h"], r["v"], r["dtype"]), {})[r["impl"]] = r
    for (est, n, h, v, _), by in groups.items():
        def t(name: str, by: dict[str, dict] = by) -> float | None:
            r = by.get(name)
            return r.get("time_s") if r and r["status"] == "ok" else None

        liger_times = [x for x in (t("liger"), t("liger_compiled")) if x]
        naive_floor = t("naive") / t("gemm_floor") if t("naive") and t("gemm_floor") else None
        liger_floor = min(liger_times) / t("gemm_floor") if liger_times and t("gemm_floor") else None
        for engine in VOLD_ENGINE:
            if engine not in by or by[engine]["status"] != "ok":
                continue
            e = by[engine]
            speedup = min(liger_times) / t(engine) if liger_times else None
            mems = " / ".join(_mib(by[k].get("peak_extra_bytes")) if k in by else "-"
                              for k in (engine, "liger", "liger_compiled", "naive", "gemm_floor"))
            out.append(
                f"| {engine} | {est} | {n} | {h} | {v} "
                f"| {_fmt(e.get('ratio_floor'))} {_mark(e.get('ratio_floor'), 1.1)} "
                f"| {_fmt(speedup)} {_mark(speedup, 2.0, low=True)} | {_fmt(liger_floor)} | {_fmt(naive_floor)} "
                f"| {mems} "
                f"| {_fmt(e.get('peak_extra_over_nv'), '.3f')} "
                f"{_mark(e.get('peak_extra_over_nv'), 0.125) if (n, v) == MEMORY_TARGET_SHAPE else ''} |"
            )
    return "\n".join(out) + "\n"


MEMORY_TARGET_SHAPE = (16384, 32768)  # (N, V) where the peak-memory target is set (memory preset)


def _mark(value: float | None, target: float, low: bool = False) -> str:
    if value is None:
        return ""
    return "(ok)" if (value >= target if low else value <= target) else "(miss)"


def plot(result: dict[str, Any], out_dir: Path, tag: str) -> list[Path]:
    """One PNG per (V, H, dtype): time vs N and peak extra memory vs N, one line per implementation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    paths = []
    rows = result["rows"]
    for v, h, dtype in sorted({(r["v"], r["h"], r["dtype"]) for r in rows}):
        sel = [r for r in rows if (r["v"], r["h"], r["dtype"]) == (v, h, dtype)]
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
        for impl, est in sorted({(r["impl"], r["estimator"]) for r in sel}, key=lambda k: (k[1], IMPLS.index(k[0]))):
            line = sorted((r for r in sel if (r["impl"], r["estimator"]) == (impl, est)), key=lambda r: r["n"])
            style = dict(linestyle="-" if est == "full" else "--", marker="o" if est == "full" else "s",
                         color=f"C{IMPLS.index(impl)}", label=f"{impl} ({est})")
            pts = [(r["n"], r["time_s"]) for r in line if r["status"] == "ok" and r.get("time_s")]
            if pts:
                ax_t.plot(*zip(*pts, strict=True), **style)
            pts = [(r["n"], r["peak_extra_bytes"] / MIB) for r in line if r.get("peak_extra_bytes") is not None]
            if pts:
                ax_m.plot(*zip(*pts, strict=True), **style)
        ns = sorted({r["n"] for r in sel})
        ax_m.plot(ns, [n * v * 4 / MIB for n in ns], "k:", marker="_", markersize=16, label="one [N, V] fp32")
        ax_m.plot(ns, [n * v * 4 / MIB / 8 for n in ns], color="grey", linestyle=":", marker="_", markersize=16,
                  label="1/8 [N, V] fp32")
        for ax, ylabel in ((ax_t, "forward + backward time (s)"), (ax_m, "peak extra memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (tokens)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "not measured in this run", ha="center", transform=ax.transAxes)
        fig.suptitle(f"vold kernel benchmark ({tag}): V={v}, H={h}, {dtype}, {result['machine']['gpu'] or 'CPU'}")
        fig.tight_layout()
        path = out_dir / f"kernels_{tag}_V{v}_H{h}_{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def _csv(kind: type, choices: Sequence[str] | None = None) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        items = tuple(kind(x) for x in text.split(",") if x.strip())
        bad = [x for x in items if choices is not None and x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of {choices or kind.__name__}")
        return items

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="shape set (per device type) and defaults; flags below override it (default: default)")
    p.add_argument("--shapes", type=_csv(Shape.parse), help="explicit shapes NxHxV[xHt],... (overrides --n/--h/--v)")
    p.add_argument("--n", type=_csv(int), help="token counts, e.g. 1024,2048 (grid with the preset's H and V)")
    p.add_argument("--h", type=_csv(int), help="hidden sizes")
    p.add_argument("--v", type=_csv(int), help="vocabulary sizes")
    p.add_argument("--impls", type=_csv(str, IMPLS), help=f"subset of {','.join(IMPLS)}")
    p.add_argument("--estimators", type=_csv(str, ESTIMATORS), help="full,k2 (default: preset's, else both)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--repeats", type=int, help="timed calls per row (default 3; CPU quick/default presets 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing, >= 1 (default 1)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence, B = N / seq_len (default 512)")
    p.add_argument("--mask-fraction", type=float, default=1.0,
                   help="fraction of each sequence that is unmasked (right padding; default 1.0)")
    p.add_argument("--chunk-size", type=int, help="vold's chunk rows (default: vold's own rule); also gemm_floor's")
    p.add_argument("--liger-grpo-chunk", type=int, default=1, help="sequences per Liger GRPO chunk (TRL default 1)")
    p.add_argument("--liger-jsd-chunk", type=int, default=1024, help="tokens per Liger JSD chunk (default 1024)")
    p.add_argument("--naive-cap-gb", type=float,
                   help="skip naive when its estimated [N,V] buffers exceed this (default: 60%% of RAM / GPU memory)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--no-timing", action="store_true", help="only the peak-memory measurements (CPU: children)")
    p.add_argument("--mem-warmup", type=int, default=1,
                   help="calls in the memory child before the measured one (compiled rows: at least 1)")
    p.add_argument("--mem-jobs", type=int,
                   help="memory children run at once (default 1; quick preset 2): peaks are per process, RAM adds up")
    p.add_argument("--child-timeout", type=float, default=3600.0, help="seconds per memory child (default 3600)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-foreign-cpu", type=float, default=0.3,
                   help="cores other processes may use during a timed call before it is re-timed (default 0.3; "
                        "negative: never wait or re-time)")
    p.add_argument("--quiet-timeout", type=float, default=30.0,
                   help="longest wait (s) for a quiet machine before each timed call (default 30)")
    p.add_argument("--wait-budget", type=float,
                   help="longest total wait (s) for a quiet machine in this run (default 600; quick preset 20)")
    p.add_argument("--retries", type=int, default=2,
                   help="re-timings of a disturbed call, while the wait budget lasts (default 2)")
    p.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results",
                   help="output directory (default: benchmarks/results/)")
    p.add_argument("--tag", help="file name tag (default: the preset's name, or 'custom' with --shapes)")
    p.add_argument("--cold-compile", action="store_true",
                   help="disable torch.compile's caches, so compiled rows' first calls include a full compile "
                        "(by default a warm on-disk inductor cache can make them fast)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only re-write the markdown and plots of a saved kernels_<tag>.json (into --output)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings_and_shapes(args: argparse.Namespace) -> tuple[Settings, list[Shape], str]:
    """Resolve the preset, the device and the flags into ``Settings``, the shapes and the file tag."""
    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
        if device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available")
    preset = PRESETS[args.preset]["cuda" if device == "cuda" else "cpu"]
    shapes = list(preset["shapes"])
    if args.shapes:
        shapes = list(args.shapes)
    elif args.n or args.h or args.v:
        shapes = _grid(args.n or sorted({x.n for x in shapes}), args.h or sorted({x.h for x in shapes}),
                       args.v or sorted({x.v for x in shapes}))
    if not shapes:
        raise SystemExit("no shapes to run")
    if args.naive_cap_gb is not None:
        cap = int(args.naive_cap_gb * 1e9)
    elif device == "cuda":
        cap = int(0.6 * torch.cuda.get_device_properties(0).total_memory)
    else:
        cap = int(0.6 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    impls = args.impls or preset.get("impls", DEFAULT_IMPLS)
    if device != "cuda" and not args.impls:
        impls = tuple(i for i in impls if i != "vold_triton")
    s = Settings(
        device=device, dtype=args.dtype or preset.get("dtype", "bf16" if device == "cuda" else "fp32"),
        impls=tuple(impls), estimators=args.estimators or preset.get("estimators", ESTIMATORS),
        repeats=args.repeats if args.repeats is not None else preset.get("repeats", 3), warmup=max(1, args.warmup),
        seq_len=args.seq_len, mask_fraction=args.mask_fraction, chunk_size=args.chunk_size,
        liger_grpo_chunk=args.liger_grpo_chunk, liger_jsd_chunk=args.liger_jsd_chunk, naive_cap_bytes=cap,
        memory=not args.no_memory, timing=not args.no_timing, mem_warmup=args.mem_warmup,
        mem_jobs=args.mem_jobs or preset.get("mem_jobs", 1), cold_compile=args.cold_compile,
        child_timeout=args.child_timeout, seed=args.seed,
        max_foreign_cpu=None if args.max_foreign_cpu < 0 else args.max_foreign_cpu,
        quiet_timeout=args.quiet_timeout, retries=args.retries,
        wait_budget=args.wait_budget if args.wait_budget is not None else preset.get("wait_budget", 600.0),
    )
    tag = args.tag or ("custom" if (args.shapes or args.n or args.h or args.v) else args.preset)
    return s, shapes, tag


def write_outputs(result: dict[str, Any], out_dir: Path, tag: str, plots: bool) -> list[Path]:
    """kernels_<tag>.json and .md (after every shape, so a stopped sweep keeps its rows), and the plots."""
    json_path, md_path = out_dir / f"kernels_{tag}.json", out_dir / f"kernels_{tag}.md"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(markdown(result))
    return [json_path, md_path] + (plot(result, out_dir, tag) if plots else [])


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run the benchmark; write JSON, markdown and plots; return the result dictionary."""
    args = parse_args(argv)
    if args.child:
        try:
            result = child_measure(json.loads(args.child))
        except Exception as exc:  # noqa: BLE001 - reported to the parent as this row's memory status
            result = {"mem_status": _failure(exc)}
        print(RESULT_MARK + json.dumps(result), flush=True)
        return None
    if args.render:
        result = json.loads(args.render.read_text())
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / f"kernels_{result['tag']}.md").write_text(markdown(result))
        plot(result, args.output, result["tag"])
        print(markdown(result))
        return result
    s, shapes, tag = settings_and_shapes(args)
    device = torch.device(s.device)
    if s.cold_compile:
        import torch._inductor.config as inductor_config

        inductor_config.force_disable_caches = True
    started = time.perf_counter()
    _WAIT_SPENT[0] = 0.0
    _log(f"vold kernel benchmark [{tag}]: {len(shapes)} shape(s) on {device} ({s.dtype}), "
         f"impls {','.join(s.impls)}, estimators {','.join(s.estimators)}")
    out_dir: Path = args.output
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    for i, shape in enumerate(shapes):
        _log(f"{shape}:")
        rows += run_shape(shape, s)
        result = {
            "tag": tag, "machine": machine_info(device), "settings": asdict(s),
            "objective": {"loss_type": LOSS_TYPE, "epsilon_low": EPSILON_LOW, "epsilon_high": EPSILON_HIGH,
                          "distill_coef": DISTILL_COEF, "divergence": "reverse_kl"},
            "shapes": [asdict(x) for x in shapes], "complete": i == len(shapes) - 1, "rows": rows,
            "elapsed_s": time.perf_counter() - started, "waited_for_quiet_s": _WAIT_SPENT[0],
        }
        written = write_outputs(result, out_dir, tag, plots=not args.no_plots and i == len(shapes) - 1)
    print(markdown(result))
    _log("wrote " + ", ".join(str(p) for p in written))
    return result


if __name__ == "__main__":
    main()
