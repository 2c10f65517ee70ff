"""The measuring harness the benchmarks share (``benchmarks.kernels``, ``benchmarks.step``, ``benchmarks.trainer``).

- timing: :func:`timed` (wall clock around a call; on CUDA, CUDA events between synchronisations) and
  :class:`CpuMonitor` (the CPU time *other* processes used meanwhile, and a wait for a quiet machine);
- peak memory: :func:`peak_rss` (the RSS high-water mark of one call, ``VmHWM`` reset before it) for use in
  a fresh child process, :func:`run_child` / :func:`child_main` (that child: a JSON spec in, one marked JSON
  line out; a killed child is reported as ``"oom (child killed)"``), :class:`RssWatchdog` and
  :func:`cap_address_space` (a memory cap on that child, so that an over-large point fails alone instead of
  pushing the machine into swap);
- failures: :func:`failure` (``"oom"`` for allocation failures, else ``"error: ..."``);
- the machine: :func:`machine_info` (CPU, cores, memory, GPU, library versions, commit, kernels hash);
- outputs: :func:`write_result` (``<stem>.json`` and ``<stem>.md``) and small formatters.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import hashlib
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
GIB = 1 << 30
RESULT_MARK = "@@VOLD_BENCH_RESULT@@"


def log(msg: str) -> None:
    """Progress to stderr (stdout carries the tables and the children's results)."""
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds of one ``step()`` and its result. CPU: ``perf_counter`` around the call. CUDA: the time
    between two CUDA events recorded around it, after a synchronisation (the GPU's own time of the call)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0, out
    start_s = time.perf_counter()
    out = step()
    return time.perf_counter() - start_s, out


class CpuMonitor:
    """CPU time used by *other* processes (in cores) over an interval, from /proc/stat and /proc/self/stat."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.ok = self._read() is not None
        self.last = 0.0  # foreign cores during the last timed call or wait sample

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

    def wait_quiet(self, max_cores: float | None, timeout: float, *, only_if_disturbed: bool = False) -> float:
        """Wait (0.5 s samples, at most ``timeout`` s) until other processes use <= ``max_cores`` cores;
        returns the seconds waited. ``max_cores`` None or negative: never wait. ``only_if_disturbed``: wait
        only when the last timed call saw more than ``max_cores`` (a quiet machine costs no sample)."""
        waited = 0.0
        if max_cores is None or max_cores < 0 or not self.ok:
            return waited
        if only_if_disturbed and self.last <= max_cores:
            return waited
        while waited < timeout:
            before = self.snapshot()
            time.sleep(0.5)
            waited += 0.5
            self.last = self.foreign(before, self.snapshot())
            if self.last <= max_cores:
                break
        return waited

    def timed(self, step: Callable[[], Any], device: torch.device) -> tuple[float, Any, float]:
        """:func:`timed` plus the foreign CPU use meanwhile (also kept as ``last``)."""
        before = self.snapshot()
        elapsed, out = timed(step, device)
        self.last = self.foreign(before, self.snapshot())
        return elapsed, out, self.last


# ---------------------------------------------------------------------------------------------------
# failures and memory
# ---------------------------------------------------------------------------------------------------


def failure(exc: BaseException) -> str:
    """``"oom"`` for allocation failures (CUDA or host), else ``"error: <type>: <first line>"``."""
    oom_types = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
    text = str(exc).lower()
    if isinstance(exc, oom_types) or (isinstance(exc, RuntimeError) and any(
            k in text for k in ("out of memory", "can't allocate", "cannot allocate", "not enough memory"))):
        return "oom"
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"error: {type(exc).__name__}: {first}"


def malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc), so that RSS baselines are tight."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def release(device: torch.device) -> None:
    """Free what can be freed: Python garbage, glibc's heap, CUDA's cached blocks."""
    malloc_trim()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def proc_status_bytes(key: str) -> int | None:
    """``VmRSS``/``VmHWM``/``VmSize`` of this process from /proc/self/status, in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    rss = proc_status_bytes("VmRSS")
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0) so that VmHWM restarts from now."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss(call: Callable[[], Any]) -> dict[str, Any]:
    """Peak RSS of ``call()`` above the RSS just before it: VmHWM reset before the call.

    ``getrusage(RUSAGE_SELF).ru_maxrss`` is recorded too but used only where VmHWM cannot be reset:
    after fork + exec the kernel seeds it with the *parent's* high-water mark, so a child of a large
    parent would report the parent's size. Meant for a fresh child process (:func:`run_child`).
    """
    malloc_trim()
    reset = reset_peak_rss()
    base = rss_bytes()
    out = call()
    hwm = proc_status_bytes("VmHWM") if reset else None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del out
    if hwm is not None:
        peak, method = hwm, "child VmHWM (reset before the call) - RSS before it"
    else:
        peak, method = maxrss, "child ru_maxrss (lifetime) - RSS before the call"
    return {"peak_extra_bytes": peak - base, "rss_base_bytes": base, "rss_peak_bytes": peak,
            "ru_maxrss_bytes": maxrss, "mem_status": "ok", "mem_method": method}


def cap_address_space(cap_bytes: int | None) -> int | None:
    """Limit this process's address space to what it maps now + ``cap_bytes`` (RLIMIT_AS): a backstop
    against one huge allocation driving the machine into swap (it then raises, usually as ``"oom"``;
    :class:`RssWatchdog` is the precise cap). Returns the limit set (None: no cap or not settable)."""
    if not cap_bytes:
        return None
    size = proc_status_bytes("VmSize")
    if size is None:
        return None
    limit = size + int(cap_bytes)
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    except (ValueError, OSError):
        return None
    return limit


class RssWatchdog:
    """Ends this process when its resident memory passes ``cap_bytes``: a thread reads VmRSS every
    ``interval`` s and, over the cap, prints ``on_exceed(rss)`` as the child's result line (see
    :func:`child_main`) and exits at once. RSS grows only as pages are touched (a few GB/s at most), so the
    overshoot is bounded by what one interval can touch; no allocation error surfaces in odd places, as a
    tight RLIMIT_AS would make it (e.g. ``SystemError`` from a C extension)."""

    def __init__(self, cap_bytes: int, on_exceed: Callable[[int], dict[str, Any]], interval: float = 0.005):
        self.cap, self.on_exceed, self.interval = int(cap_bytes), on_exceed, interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-watchdog", daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = self.rss()
            if rss > self.cap:
                print(RESULT_MARK + json.dumps(self.on_exceed(rss)), flush=True)
                os._exit(0)

    def __enter__(self) -> RssWatchdog:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def run_child(module: str, spec: dict[str, Any], *, timeout: float) -> dict[str, Any]:
    """Run ``python -m <module> --child <spec as JSON>`` from the repository root and parse the result
    line that :func:`child_main` printed; a child without one is reported in ``mem_status``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", module, "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"mem_status": f"error: child timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    if proc.returncode in (-9, 137):
        return {"mem_status": "oom (child killed)"}
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])[:300]
    return {"mem_status": f"error: child exit {proc.returncode}: {tail}"}


def child_main(measure: Callable[[dict[str, Any]], dict[str, Any]], spec_json: str) -> None:
    """The child side of :func:`run_child`: ``measure(spec)``, a failure as its ``mem_status``, one marked line."""
    try:
        result = measure(json.loads(spec_json))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as this point's memory status
        result = {"mem_status": failure(exc)}
    print(RESULT_MARK + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------------------------------


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, memory, GPU, library versions, vold commit and vold/kernels/ content hash, date."""
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
        "python": platform.python_version(), "torch": torch.__version__, "triton": version("triton"),
        "liger_kernel": version("liger_kernel") or version("liger-kernel"), "trl": version("trl"),
        "transformers": version("transformers"), "vold": version("vold"),
        "git_commit": commit, "kernels_sha256": digest.hexdigest()[:16],
    }


def modified_files() -> list[str] | None:
    """``git status --porcelain`` of the checkout (read-only): the results' code is HEAD plus these."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.splitlines() if out.returncode == 0 else None


# ---------------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------------


def write_result(result: dict[str, Any], markdown: str, out_dir: Path, stem: str) -> list[Path]:
    """``<out_dir>/<stem>.json`` (the whole result) and ``<stem>.md`` (``markdown``); returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(markdown)
    return [json_path, md_path]


def fmt(x: float | None, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def mib(x: int | None) -> str:
    return "-" if x is None else f"{x / MIB:,.0f}"


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or None (logged) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plots (pip install matplotlib)")
        return None
    return plt
