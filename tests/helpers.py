"""Shared test helpers: engine parameters, tolerance checks, input builders and the gloo multi-process runner."""

from __future__ import annotations

import datetime
import faulthandler
import importlib.util
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vold.kernels.reference import half_ulp, leaf64, ref_logprobs

# fp32 inputs: the kernels compute in fp32 and must agree with the float64 reference to 1e-5 of the
# largest magnitude of the compared tensor (see ``assert_rel``).
FP32_TOL = 1e-5
# bf16/fp16 inputs: logits are accumulated and kept in fp32 (never rounded to the input dtype) and the
# logit gradient is not rounded before the backward GEMMs, so the only rounding left is that of the
# returned gradients to the input dtype. Against the float64 reference evaluated on the same rounded
# inputs, values (fp32) and gradients agree to 1e-3 of the largest magnitude, beyond half an ulp (in the
# input dtype) of each gradient element (``assert_rel(..., rounding=dtype)``).
BF16_TOL = 1e-3
# fp64 inputs compute in fp64 end to end.
FP64_TOL = 1e-10


def _triton_engine_missing() -> bool:
    try:
        return importlib.util.find_spec("vold.kernels.engines.triton") is None
    except (ImportError, ValueError):
        return True


TRITON_MISSING = _triton_engine_missing()
TRITON = pytest.param(
    "triton",
    marks=pytest.mark.skipif(TRITON_MISSING, reason="vold.kernels.engines.triton (triton) is not installed"),
    id="triton",
)
# the device the tests run on (tests/conftest.py makes it the default device); cpu unless VOLD_TEST_DEVICE says
DEVICE = torch.device(os.environ.get("VOLD_TEST_DEVICE", "cpu").strip() or "cpu")


def _impls() -> list:
    """The engines every kernel test runs: torch and triton (interpreted on the CPU), plus torch_compile on
    CUDA (on the CPU its inductor C++ builds would dominate the suite; tests/test_compile.py covers it);
    ``VOLD_TEST_IMPLS`` (a comma list, e.g. ``triton``) picks them explicitly."""
    names = os.environ.get("VOLD_TEST_IMPLS", "").replace(" ", "")
    chosen = names.split(",") if names else ["torch", "triton"] + (["torch_compile"] if DEVICE.type == "cuda" else [])
    known = ("torch", "triton", "torch_compile")
    bad = [n for n in chosen if n not in known]
    if bad or not chosen:
        raise ValueError(f"VOLD_TEST_IMPLS={names!r}: expected a comma list of {known}, got {bad or chosen}")
    return [TRITON if n == "triton" else n for n in chosen]


IMPLS = _impls()


def max_abs(x: torch.Tensor) -> float:
    return float(x.detach().double().abs().max()) if x.numel() else 0.0


def assert_rel(actual, expected, tol: float, name: str = "", floor: float = 1.0,
               rounding: torch.dtype | None = None) -> None:
    """``max|a - b| <= tol * max(floor, max|b|)``, both finite and of the same shape.

    ``floor=1`` for values (logprobs, losses: an absolute 1e-5 near zero), ``floor=0`` for gradients
    (pure relative-to-max-norm: a gradient of size 1e-2 must be right to 1e-7 absolute).
    ``rounding``: ``a`` was returned in this (low-precision) dtype; the error is counted beyond
    ``half_ulp(b, rounding)`` per element, the rounding no computation can avoid.
    """
    a = torch.as_tensor(actual).detach().double()
    b = torch.as_tensor(expected).detach().double()
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(b.shape)}"
    assert bool(torch.isfinite(a).all()), f"{name}: kernel output has NaN/inf"
    assert bool(torch.isfinite(b).all()), f"{name}: reference has NaN/inf"
    if a.numel() == 0:
        return
    diff = (a - b).abs()
    if rounding is not None and rounding not in (torch.float32, torch.float64):
        diff = (diff - half_ulp(b, rounding)).clamp(min=0.0)
    err = max_abs(diff)
    scale = max(floor, max_abs(b))
    if scale == 0.0:
        assert err == 0.0, f"{name}: expected exactly zero, got max|a| = {err:.3e}"
        return
    assert err <= tol * scale, f"{name}: max|a-b| = {err:.3e} > {tol:g} * {scale:.4g} (rel {err / scale:.2e})"


def randn(*shape, scale: float = 0.5, generator=None, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


# ---------------------------------------------------------------------------------------------------
# vold_loss inputs
# ---------------------------------------------------------------------------------------------------

GRAD_KEYS = ("student_hidden", "student_weight", "student_bias")


def make_vold_inputs(
    B: int = 3,
    T: int = 7,
    H: int = 16,
    V: int = 97,
    Ht: int = 12,
    Vt: int | None = None,
    *,
    seed: int = 0,
    bias: bool = False,
    teacher_bias: bool = False,
    adv_per_token: bool = False,
    distill_mask: str | None = None,
    mask: str = "padded",
    old: bool = True,
    ratio_spread: float = 1.7,
    vocab: int | None = None,
) -> dict[str, torch.Tensor | None]:
    """Padded ``[B, T]`` inputs for ``vold_loss`` (fp32), well conditioned (logits of std ~1).

    ``old_logprobs`` = true logp - U(-ratio_spread, ratio_spread), so ratios span [e^-1.7, e^1.7]:
    every clipping branch (low, high, dual clip with c < 5) is exercised. Advantages alternate signs
    (per token: some are exactly 0).
    ``vocab`` (default min(V, Vt)): targets lie in [0, vocab), logprobs use rows [0, vocab).
    ``mask``: "padded" (right padding of random length, plus a hole), "ones", "fractional" (weights).
    """
    g = torch.Generator().manual_seed(seed)
    Vt = V if Vt is None else Vt
    hidden = randn(B, T, H, generator=g)
    weight = randn(V, H, generator=g)
    vocab = min(V, Vt) if vocab is None else vocab
    targets = torch.randint(0, vocab, (B, T), generator=g)
    t_hidden = randn(B, T, Ht, generator=g)
    t_weight = randn(Vt, Ht, generator=g)
    out: dict[str, torch.Tensor | None] = {
        "student_hidden": hidden,
        "student_weight": weight,
        "targets": targets,
        "student_bias": randn(V, generator=g) if bias else None,
        "teacher_hidden": t_hidden,
        "teacher_weight": t_weight,
        "teacher_bias": randn(Vt, generator=g) if teacher_bias else None,
    }
    with torch.no_grad():
        logp, _ = ref_logprobs(hidden, weight, targets, out["student_bias"], 1.0, vocab)
    signs = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(B)], dtype=torch.float64)
    if adv_per_token:
        adv = signs[:, None] * (0.2 + torch.rand(B, T, generator=g, dtype=torch.float64))
        adv[:, 1::3] *= -1.0
        adv[:, 2::4] = 0.0  # exactly zero advantages: neither clip metric nor dual clip applies
    else:
        adv = signs * (0.2 + torch.rand(B, generator=g, dtype=torch.float64))
    out["advantages"] = adv.float()
    noise = (torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 1) * ratio_spread
    out["old_logprobs"] = (logp - noise).float() if old else None
    out["ref_logprobs"] = (logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    out["teacher_logprobs"] = (logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    if mask == "ones":
        m = torch.ones(B, T)
    else:
        lengths = torch.randint(max(1, T // 2), T + 1, (B,), generator=g)
        m = (torch.arange(T)[None, :] < lengths[:, None]).float()
        if T > 2:
            m[0, 1] = 0.0  # a hole inside a sequence
        if mask == "fractional":
            m = m * (0.25 + 0.75 * torch.rand(B, T, generator=g))
    out["mask"] = m
    if distill_mask == "seq":
        out["distill_mask"] = torch.rand(B, generator=g)
    elif distill_mask == "token":
        out["distill_mask"] = torch.rand(B, T, generator=g)
    else:
        out["distill_mask"] = None
    return out


def select(inputs: dict, *drop: str) -> dict:
    """A copy of ``inputs`` without the keys in ``drop`` (and without None values)."""
    return {k: v for k, v in inputs.items() if k not in drop and v is not None}


def _prepare(tensors: dict, cast, grad_keys) -> tuple[dict, dict]:
    args, leaves = {}, {}
    for key, value in tensors.items():
        if value is None:
            args[key] = None
            continue
        if value.is_floating_point():
            value = cast(value)
        if key in grad_keys:
            value = value.detach().clone().requires_grad_(True)
            leaves[key] = value
        args[key] = value
    return args, leaves


def run_vold(fn, tensors: dict, options: dict, *, cast=None, grad_keys=GRAD_KEYS):
    """``(loss, metrics, grads)`` of ``fn(**tensors, **options)`` with autograd grads of ``grad_keys``."""
    cast = cast or (lambda t: t)
    args, leaves = _prepare(tensors, cast, grad_keys)
    loss, metrics = fn(**args, **options)
    loss.backward()
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, {k: v.grad for k, v in leaves.items()}


def reference_cast(dtype: torch.dtype | None = None):
    """Cast for the reference: round to ``dtype`` first (the kernel's input precision), then float64."""

    def cast(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if dtype is not None:
            t = t.to(dtype)
        return leaf64(t, requires_grad=False)

    return cast


def unit_gradient_scale(fn, tensors: dict, options: dict) -> dict[str, float]:
    """Max-norm of each gradient of ``sum_t n_t logp_t`` (the loss with one unit coefficient on logp).

    This is the natural size of the gradients a problem can produce: fp32 rounding of logp (absolute
    error ~ |logp| eps) reaches the gradients scaled by it, whatever cancellations make the actual
    gradient small. Evaluated as the loss of an on-policy, token-level problem with advantages -1 and
    no other term (ratio 1 is never clipped, so pg_t = r_t and d pg_t / d logp_t = 1).
    """
    keep = ("loss_type", "temperature", "vocab_size", "max_completion_length", "token_normalizer", "cu_seqlens")
    unit_options = {k: v for k, v in options.items() if k in keep}
    unit_options.update(importance_sampling_level="token", distill_coef=0.0, ref_kl_coef=0.0, entropy_coef=0.0)
    unit_tensors = {k: v for k, v in tensors.items() if k not in ("old_logprobs", "advantages", "distill_mask")}
    num_seqs = len(tensors["cu_seqlens"]) - 1 if "cu_seqlens" in tensors else tensors["student_hidden"].shape[0]
    unit_tensors["advantages"] = -torch.ones(num_seqs)
    _, _, grads = run_vold(fn, unit_tensors, unit_options, cast=reference_cast())
    return {k: max_abs(g) for k, g in grads.items()}


def compare_vold(kernel, reference, tol: float, *, required_metrics=(), grad_floor: dict | None = None,
                 loss_dtype: torch.dtype = torch.float32) -> None:
    """Compare two ``run_vold`` results: loss, every common metric, every gradient.

    Gradients are compared relative to their own max-norm, or to ``grad_floor[key]`` when larger
    (see ``unit_gradient_scale``: for random problems whose gradients are small by cancellation).
    """
    k_loss, k_metrics, k_grads = kernel
    r_loss, r_metrics, r_grads = reference
    assert k_loss.dtype == loss_dtype, k_loss.dtype
    assert k_loss.shape == ()
    assert_rel(k_loss, r_loss, tol, "loss")
    for key in ("loss", "policy_loss", "entropy", "ratio", "clip_low", "clip_high", *required_metrics):
        assert key in k_metrics, f"metric {key!r} missing from {sorted(k_metrics)}"
    for key in sorted(set(k_metrics) & set(r_metrics)):
        assert not k_metrics[key].requires_grad, key
        assert_rel(k_metrics[key], r_metrics[key], tol, f"metric {key}")
    assert set(k_grads) == set(r_grads)
    for key in k_grads:
        assert k_grads[key] is not None, f"no gradient for {key}"
        floor = 0.0 if grad_floor is None else grad_floor[key]
        assert_rel(k_grads[key], r_grads[key], tol, f"grad {key}", floor=floor, rounding=k_grads[key].dtype)


# ---------------------------------------------------------------------------------------------------
# multi-process tests: gloo ranks on the CPU
# ---------------------------------------------------------------------------------------------------

# how long the parent waits past ``timeout_s`` for ranks that did not stop themselves before it kills them
_KILL_GRACE_S = 60.0
# how long the ranks may take to start (spawn, imports) and meet; ``timeout_s`` counts from then. A few seconds on a
# quiet machine, up to ~35 s seen at nice 19 under a load of ~10 on 2 cores
_START_S = 300.0
# the rendezvous keys in the parent's store: how many ranks have started; "go" (set by the last one) or "abort" (set
# by the parent when a rank stopped before all had started)
_ARRIVED, _GO = "gloo_ranks/arrived", "gloo_ranks/go"
# tests/test_gloo_ranks.py only: "RANK:SECONDS" makes that rank start SECONDS late (as a rank whose spawn and imports
# are slow on a loaded machine)
START_DELAY_ENV = "VOLD_TEST_GLOO_START_DELAY"


def run_on_gloo_ranks(fn: Callable[..., None], world_size: int, *args: Any, timeout_s: float = 300.0) -> None:
    """Run ``fn(rank, *args)`` in ``world_size`` spawned CPU processes joined in one gloo process group (the
    default group, ``dist.group.WORLD``); raise ``AssertionError`` here if any rank fails.

    What it guarantees:

    - **Every rank's error reaches the parent, with its traceback.** Each rank catches whatever ``fn`` raises
      (any ``BaseException``: also the ``Failed`` of ``pytest.fail``/``pytest.raises``, which is not an
      ``Exception``), puts ``"rank r:\n<traceback>"`` on a queue and leaves at once with status 0 (``os._exit``:
      a normal exit with the group still up can abort in gloo's destructors), so the other ranks go on and
      report their own errors too. The ``AssertionError`` raised here holds them all, in the order they were
      raised: the first is the cause (a peer of a failed rank usually fails next, in a collective, with
      "Connection closed by peer"). A rank that dies without raising (a signal such as SIGABRT, a nonzero
      ``os._exit``) is reported with its exit status; the other ranks then get until the parent's deadline
      (below) to stop on their own and report, before they are killed.
    - **No rank tears the group down while another still communicates.** After ``fn`` returns, every rank waits
      in ``dist.barrier()`` before ``dist.destroy_process_group()`` (gloo destroyed on one rank while a peer's
      collective, e.g. FSDP2's, is in flight can abort the peer with SIGABRT). A failed rank skips both.
    - **A hung rank fails the test instead of hanging CI.** The group's timeout is ``timeout_s`` (a collective
      that waits longer raises on its rank), and each rank arms ``faulthandler.dump_traceback_later(timeout_s,
      exit=True)``: a rank still running ``timeout_s`` after the start writes the stack of every thread to a
      file, which the parent adds at the end of its error, and exits with status 1. Ranks still alive ``timeout_s + 60``
      seconds after the start are killed by the parent, which then fails.
    - **The start is when every rank has started**, not when each did: the ranks meet in the store first (at most
      300 s, with the same stack dump past it), so a rank whose spawn and imports were slow on a loaded machine does
      not eat into the others' ``timeout_s`` (their timers and the group's rendezvous used to run from their own
      start: rank 0 timed out in ``init_process_group`` waiting for a rank 1 more than ``timeout_s`` late). A rank
      that stops before all have started makes the others stop at once.
    - **No port race.** The rendezvous store (``TCPStore``) is opened here, on a port the OS picks and this
      process holds, before any rank starts; the ranks connect to it as clients.
    - Each rank sees the variables a launcher (torchrun) sets: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
      ``MASTER_ADDR``, ``MASTER_PORT`` (the store: a library that finds the group initialised, e.g. DeepSpeed or
      ``vold.distributed.Runtime``, attaches to it), and computes on one thread (``OMP_NUM_THREADS=1``,
      ``torch.set_num_threads(1)``): the ranks share the machine's cores.

    ``fn`` and ``args`` are pickled to the ranks (``spawn`` start method), so ``fn`` must be a module-level
    function. Raises ``ValueError`` (before starting anything) for ``world_size < 1`` or ``timeout_s <= 0``.
    """
    __tracebackhide__ = True  # pytest shows the ranks' tracebacks in the message, not this function's source
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    failures: list[str] = []
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()

    def drain() -> None:
        while not errors.empty():
            failures.append(errors.get())

    with tempfile.TemporaryDirectory(prefix="gloo_ranks_") as stacks:
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
        ranks = mp.start_processes(_gloo_rank, args=(world_size, store.port, timeout_s, stacks, errors, fn, args),
                                   nprocs=world_size, join=False, start_method="spawn")
        started = False  # every rank has started (the store holds _GO)
        deadline = time.monotonic() + _START_S + _KILL_GRACE_S
        running = dict(enumerate(ranks.processes))
        try:
            # the processes are watched here, not with ``ranks.join``: that terminates every other rank as soon as
            # one exits with a nonzero status, and their own reports (an error raised in a collective at the
            # group's timeout, a hung rank's stack at its own timer, which starts a little later) would be lost
            while running:
                multiprocessing.connection.wait([p.sentinel for p in running.values()], timeout=1.0)
                drain()
                if not started and store.check([_GO]):
                    started = True
                    deadline = time.monotonic() + timeout_s + _KILL_GRACE_S
                for rank, process in list(running.items()):
                    if process.exitcode is None:
                        continue
                    del running[rank]
                    if not started and not store.check([_GO]):
                        store.set(_GO, "abort")  # the others would wait for it to start until _START_S
                    if process.exitcode != 0:
                        drain()  # what was raised before
                        how = (f"status {process.exitcode}" if process.exitcode > 0
                               else f"signal {_signal_name(-process.exitcode)}")
                        failures.append(f"rank {rank} exited with {how} without raising")
                if running and time.monotonic() > deadline:
                    limit = f"{timeout_s + _KILL_GRACE_S:.0f} s after the start" if started else (
                        f"not all started {_START_S + _KILL_GRACE_S:.0f} s after the spawn")
                    failures.append(f"ranks {sorted(running)} still running, {limit}: killed")
                    break
        finally:
            for process in ranks.processes:
                if process.is_alive():
                    process.kill()
                process.join()
        drain()
        for path in sorted(Path(stacks).glob("rank*.stack")):
            if path.stat().st_size:
                rank = path.stem[len("rank"):]
                failures.append(f"rank {rank} ran past timeout_s={timeout_s} s (or did not meet the others within "
                                f"{_START_S:.0f} s of its start); its threads then:\n{path.read_text()}")
    if failures:
        raise AssertionError(f"{len(failures)} failure(s) on {world_size} gloo ranks, in the order raised:\n"
                             + "\n".join(failures))


def _signal_name(number: int) -> str:
    """``SIGABRT`` for 6; the number itself for a signal Python does not name (real-time ones such as 40, where
    ``signal.Signals(40)`` raises ValueError)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _gloo_rank(rank: int, world_size: int, port: int, timeout_s: float, stacks: str, errors: Any,
               fn: Callable[..., None], args: tuple) -> None:
    """One rank of ``run_on_gloo_ranks`` (see there)."""
    delayed, _, delay = os.environ.get(START_DELAY_ENV, "").partition(":")
    if delayed == str(rank):
        time.sleep(float(delay))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    failed = None
    with open(Path(stacks) / f"rank{rank}.stack", "w") as stack:
        faulthandler.dump_traceback_later(_START_S, exit=True, file=stack)
        try:
            store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=_START_S))
            if store.add(_ARRIVED, 1) == world_size:
                store.set(_GO, "go")
            store.wait([_GO])
            if store.get(_GO) != b"go":
                raise RuntimeError("another rank stopped before every rank had started")
            # every rank is here: timeout_s counts from now, on every rank alike (re-arming replaces the timer)
            faulthandler.dump_traceback_later(timeout_s, exit=True, file=stack)
            timeout = datetime.timedelta(seconds=timeout_s)
            store.set_timeout(timeout)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
            fn(rank, *args)
            dist.barrier()
            dist.destroy_process_group()
        except BaseException:  # noqa: BLE001 - every rank's error goes to the parent, with its traceback
            failed = f"rank {rank}:\n{traceback.format_exc()}"
        finally:
            faulthandler.cancel_dump_traceback_later()
    if failed is not None:
        errors.put(failed)  # a SimpleQueue writes to the pipe before put returns: nothing is left to flush
        sys.stdout.flush()
        sys.stderr.flush()
        # exit at once, with status 0: a normal exit with the group still up can abort in gloo's destructors
        # ("terminate called without an active exception", SIGABRT), and the parent would then stop the other
        # ranks before they report their own errors
        os._exit(0)
