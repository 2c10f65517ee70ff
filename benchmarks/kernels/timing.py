"""Timing of the rows of one shape: all in this process on the same inputs, round-robin."""

from __future__ import annotations

import gc
import math
import statistics

import torch

from ..harness import CpuMonitor, failure, log, release
from .candidates import Step
from .config import COMPILED, Settings
from .inputs import Inputs

WAIT_SPENT = [0.0]  # seconds this run has waited for a quiet machine (reset by cli.main)


def wait_quiet(mon: CpuMonitor, s: Settings) -> float:
    """Wait for a quiet machine after a disturbed call, at most ``quiet_timeout`` s and within what is
    left of the run's ``wait_budget``; the seconds waited."""
    waited = mon.wait_quiet(s.max_foreign_cpu, min(s.quiet_timeout, s.wait_budget - WAIT_SPENT[0]),
                            only_if_disturbed=True)
    WAIT_SPENT[0] += waited
    return waited


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
                r["waited_s"] += wait_quiet(mon, s)
                elapsed, out, _ = mon.timed(step, device)
                if i == 0:
                    grads = [g for g in (inp.s_hidden.grad, inp.s_weight.grad) if g is not None]
                    norm = math.sqrt(sum(float(g.float().square().sum()) for g in grads)) if grads else None
                    r.update(first_call_s=elapsed, loss=None if out is None else float(out), grad_norm=norm)
                    log(f"    {key[0]} ({key[1]}): first call {elapsed:.3f} s")
        except Exception as exc:  # noqa: BLE001 - one failing row must not end the sweep
            r["status"] = failure(exc)
            log(f"    {key[0]} ({key[1]}): {r['status']}")
        inp.zero_grads()
        release(device)
    for rnd in range(s.repeats):
        for key, step in steps.items():
            r = res[key]
            if "status" in r:
                continue
            try:
                for attempt in range(1 + max(0, s.retries)):
                    inp.zero_grads()
                    gc.collect()
                    r["waited_s"] += wait_quiet(mon, s)
                    elapsed, _, foreign = mon.timed(step, device)
                    out_of_wait = WAIT_SPENT[0] >= s.wait_budget  # a busy machine stays busy: stop re-timing
                    if s.max_foreign_cpu is None or foreign <= s.max_foreign_cpu or attempt == s.retries or out_of_wait:
                        r["times_s"].append(elapsed)
                        r["foreign_cpu"].append(round(foreign, 3))
                        log(f"    {key[0]} ({key[1]}): round {rnd + 1}/{s.repeats} {elapsed:.3f} s "
                             f"(other processes {foreign:.2f} cores)")
                        break
                    r["retimed"] += 1
                    log(f"    {key[0]} ({key[1]}): {elapsed:.3f} s disturbed ({foreign:.2f} cores), re-timing")
            except Exception as exc:  # noqa: BLE001
                r["status"] = failure(exc)
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

