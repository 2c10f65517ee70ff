"""One shape: every row timed in this process, then each row's peak memory; ratios to the floor."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ..harness import MIB, failure, log, malloc_trim, release
from .candidates import Step, build_step, vold_chunk_size
from .config import COMPILED, ESTIMATORS, ESTIMATORS_OF, IMPLS, NAIVE_NV_BUFFERS, VOLD_ENGINE, Settings, Shape
from .inputs import active_tokens, make_inputs
from .memory import cuda_peak, measure_in_child
from .timing import time_rows


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
        if impl in ("naive", "gemm_unchunked") and s.naive_cap_bytes is not None \
                and naive_estimate_bytes(shape, est) > s.naive_cap_bytes:
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
            rows[key]["status"] = failure(exc)
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
                    rows[key]["mem_status"] = failure(exc)
                release(device)
    for key in keys:
        row = rows[key]
        row["load_avg_1m"] = load
        msg = f"{row['time_s']:.3f} s (min {row.get('time_min_s', row['time_s']):.3f}, first call " \
              f"{row['first_call_s']:.2f})" if row["status"] == "ok" and "time_s" in row else ""
        log(f"  {shape} {key[0]:<15} {key[1]:<4} {row['status']:<6} {msg}")
    del steps
    del inp
    malloc_trim()
    if device.type == "cpu" and s.memory:
        todo = [key for key in keys if rows[key]["status"] == "ok"]
        with ThreadPoolExecutor(max_workers=max(1, s.mem_jobs)) as pool:
            for key, mem in zip(todo, pool.map(lambda k: measure_in_child(shape, *k, s), todo), strict=True):
                rows[key].update(mem)
                peak = mem.get("peak_extra_bytes")
                log(f"  {shape} {key[0]:<15} {key[1]:<4} memory {mem['mem_status']}"
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
