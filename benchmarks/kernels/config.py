"""What a kernel benchmark run measures: the objective's constants, the rows (implementations x
estimators), the shapes and presets, and the run's :class:`Settings`.

Where the dtype flows: ``--dtype`` (cli.py, ``settings_and_shapes``; default: the preset's ``dtype``, else
fp32 on CPU and bf16 on CUDA) -> ``Settings.dtype`` (a key of ``DTYPES``) -> ``Settings.torch_dtype`` ->
``inputs.make_inputs`` (every hidden state and lm_head weight in that dtype; targets int64, mask,
advantages and log-probs fp32) -> each candidate, which runs in the inputs' dtype; the row records
``dtype``. Memory children get the same ``Settings`` (``asdict``) in their JSON spec.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

EPSILON_LOW, EPSILON_HIGH, DISTILL_COEF, LOSS_TYPE = 0.2, 0.3, 0.1, "dapo"
IMPLS = ("gemm_floor", "gemm_unchunked", "vold_torch", "vold_compile", "vold_triton", "trl", "liger",
         "liger_compiled", "naive")
DEFAULT_IMPLS = ("gemm_floor", "vold_torch", "vold_compile", "vold_triton", "trl", "liger", "liger_compiled",
                 "naive")
VOLD_ENGINE = {"vold_torch": "torch", "vold_compile": "torch_compile", "vold_triton": "triton"}
# "full" / "k2": the loss (GRPO + 0.1 x reverse KL, exact or sampled-token k2), forward + backward.
# "logp" / "logp_grad": the log-prob pass alone (vold's fused_linear_logprobs vs TRL's ChunkedLogProbFunction):
# "logp" under no_grad (the old-policy / reference / teacher pass), "logp_grad" forward + backward of sum(logp).
LOSS_ESTIMATORS = ("full", "k2")
LOGP_PASSES = ("logp", "logp_grad")
ESTIMATORS = (*LOSS_ESTIMATORS, *LOGP_PASSES)
DEFAULT_ESTIMATORS = LOSS_ESTIMATORS
ESTIMATORS_OF = {"liger": ("full",), "liger_compiled": ("full",), "naive": LOSS_ESTIMATORS,
                 "gemm_unchunked": LOSS_ESTIMATORS}  # others: all
COMPILED = ("liger_compiled", "vold_compile")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Live [N, V] fp32-sized buffers of the naive baseline at its peak (measured on CPU: 6.0 full, 3.0 k2 for the
# former benchmarks/naive.py, 5.0 / 3.0 for ref_vold_loss(dtype=None), which frees the raw logits; rounded up);
# used only to skip it before it would exceed --naive-cap-gb.
NAIVE_NV_BUFFERS = {"full": 7.0, "k2": 4.0}


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
                "impls": ("gemm_floor", "vold_torch", "trl", "liger", "naive")},
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
    "logprobs": {
        # the log-prob pass alone (old-policy / reference / teacher): vold's fused_linear_logprobs vs TRL's
        # ChunkedLogProbFunction, no_grad and with grad, at the headline shapes
        "cpu": {"shapes": [Shape(4096, 1024, 32768), Shape(2048, 896, 151936)], "estimators": LOGP_PASSES,
                "impls": ("gemm_floor", "vold_torch", "vold_compile", "trl"), "dtype": "fp32"},
        "cuda": {"shapes": [Shape(4096, 1024, 32768), Shape(2048, 896, 151936)], "estimators": LOGP_PASSES,
                 "impls": ("gemm_floor", "vold_torch", "vold_compile", "vold_triton", "trl")},
    },
    "gpu": {
        # the GPU headline (CUDA only): Qwen2.5's vocabulary at 3B / 7B widths, bf16, up to 64k tokens;
        # naive runs where its [N, V] buffers fit (skipped above --naive-cap-gb, an OOM is recorded as "oom")
        "cuda": {"shapes": _grid((4096, 16384, 65536), (2048, 3584), (151936,)), "dtype": "bf16", "repeats": 2,
                 "estimators": (*LOSS_ESTIMATORS, *LOGP_PASSES),
                 "impls": ("gemm_floor", "vold_torch", "vold_compile", "vold_triton", "trl", "liger", "naive")},
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
    estimators: tuple[str, ...] = DEFAULT_ESTIMATORS
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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Settings:
        """The inverse of ``dataclasses.asdict`` (a memory child's JSON spec: lists back to tuples)."""
        return cls(**{**d, "impls": tuple(d["impls"]), "estimators": tuple(d["estimators"])})
