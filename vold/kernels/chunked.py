"""The chunk loop shared by every public function: ``run_chunks``.

Tokens are processed ``chunk`` rows at a time. Per chunk::

    z = h_s[c] @ W_s^T (+ b_s)            [chunk, V]   student logits (the only [*, V] buffers)
    u = h_t[c] @ W_t^T (+ b_t)            [chunk, V]   teacher logits (only when a teacher is given)
    stats = engine.forward(z, u)          logp(target), entropy, divergence, teacher logp(target)
    g = objective(stats)                  dL/dlogp, dL/dH, dL/dD per row (policy_loss.token_objective)
    dz = engine.backward(g)               dL/dz, written over the chunk's own buffers
    dh[c] = dz @ W_s ; dW_s += dz^T @ h_s[c] ; db_s += sum_rows dz

so peak extra memory is O(chunk * V), independent of N. The engine (``engines.get_engine``: the
PyTorch engine ``engines/torch.py`` or the Triton engine ``engines/triton.py``, behind the
``engines.Engine`` protocol) owns the per-row math and its formulas; this module owns the GEMMs, the
buffers and the gradient accumulation, and imports no engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import common
from .common import ChunkSpec, Head, Workspace

# objective(start, end, stats) -> (dL/dlogp, dL/dH or None, dL/dD or None) for rows [start, end)
Objective = Callable[[int, int, dict], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]


@dataclass
class ChunkResult:
    stats: dict[str, torch.Tensor]  # each [N], in the compute dtype (fp32, or fp64 for fp64 inputs)
    grad_hidden: torch.Tensor | None = None
    grad_weight: torch.Tensor | None = None
    grad_bias: torch.Tensor | None = None


def run_chunks(
    student: Head,
    teacher: Head | None,
    targets: torch.Tensor,
    spec: ChunkSpec,
    engine,
    chunk_size: int,
    *,
    objective: Objective | None = None,
    grad_hidden: bool = False,
    grad_weight: bool = False,
    grad_bias: bool = False,
    keep: tuple[str, ...] = ("logp", "entropy", "divergence", "teacher_logp"),
) -> ChunkResult:
    """Run ``engine`` (an ``engines.Engine``) over all chunks; with ``objective``, also return the student's gradients.

    Logits and statistics are in the heads' common compute dtype (``compute_dtype``: fp32, or fp64 when
    an input is fp64);
    statistics named in ``keep`` are gathered into ``[N]`` vectors of that dtype. The logit gradient
    ``dL/dz`` is computed in that dtype and is *not* rounded to a bf16/fp16 input dtype before the dX / dW
    GEMMs: near convergence (student ~ teacher) that rounding alone put 1-2.6e-3 of the gradient's max
    on top of the gradient's own final rounding (measured on issue 11's case). On the CPU the GEMMs run
    on the fp32 weight copy made for the logits; on CUDA dz is split into two bf16 parts (hi + lo) and
    each goes through a bf16 GEMM with an fp32 output. Gradients w.r.t. the student's weight and bias
    are accumulated across chunks in the compute dtype and returned in the input's dtype.
    """
    n = student.hidden.shape[0]
    device = student.hidden.device
    dtype = student.weight.dtype
    acc = student.dtype if teacher is None else torch.promote_types(student.dtype, teacher.dtype)
    student.dtype = acc
    if teacher is not None:
        teacher.dtype = acc
    want_grads = objective is not None and (grad_hidden or grad_weight or grad_bias)
    result = ChunkResult(stats={})
    # fp16 gradients are returned in the compute dtype: the caller casts them (``cast_grad``), after any
    # scaling, and says so if they do not fit fp16's range
    grad_dtype = acc if dtype == torch.float16 else dtype
    gh = torch.empty_like(student.hidden, dtype=grad_dtype) if want_grads and grad_hidden else None
    gw = torch.zeros(student.weight.shape, dtype=acc, device=device) if want_grads and grad_weight else None
    gb = torch.zeros(student.weight.shape[0], dtype=acc, device=device) if want_grads and grad_bias else None
    pieces: dict[str, list[torch.Tensor]] = {}
    # One logits buffer per model for the whole call, reused chunk after chunk (the backward overwrites
    # it with dz): a new [chunk, V] tensor per chunk would be a fresh, page-faulted allocation each time.
    use_teacher = teacher is not None and spec.needs_teacher
    workspace = Workspace()  # the eager engine's intermediates, freed when this call returns
    rows = min(chunk_size, n)
    z_buf = torch.empty(rows, student.weight.shape[0], dtype=acc, device=device)
    # a soft cap's derivative needs the capped logits, which the backward overwrites with dz: a copy
    capped_buf = None
    if want_grads and student.transform.softcap is not None:
        capped_buf = torch.empty_like(z_buf)
    u_buf = None
    if use_teacher:
        u_buf = torch.empty(rows, teacher.weight.shape[0], dtype=teacher.dtype, device=device)
    for start in range(0, n, chunk_size):
        end = min(n, start + chunk_size)
        z = student.logits(start, end, out=z_buf[: end - start])
        u = teacher.logits(start, end, out=u_buf[: end - start]) if use_teacher else None
        stats, cache = engine.forward(z, u, targets[start:end], spec, workspace)
        del z, u
        for key in keep:
            if key in stats:
                pieces.setdefault(key, []).append(stats[key])
        if objective is None:
            continue
        g_logp, g_ent, g_div = objective(start, end, stats)
        if not want_grads:
            continue
        capped = None if capped_buf is None else capped_buf[: end - start].copy_(cache["z"])
        dz = engine.backward(cache, g_logp, g_ent, g_div, spec)
        del cache
        if not student.transform.identity:
            dz = student.transform.backward_(dz, capped)
        gb_done = False
        h = student.hidden[start:end]
        if dtype == acc:
            if gh is not None:
                torch.mm(dz, student.weight, out=gh[start:end])
            if gw is not None:
                gw.addmm_(dz.t(), h)
        elif acc == torch.float32 and common.mm_has_out_dtype(device, dtype):
            mm_out_fp32 = common.mm_out_fp32  # looked up per call (tests put an emulation of the CUDA GEMM there)
            # dz = (hi + lo) / k to ~2^-16 relative (bf16), two low-precision GEMMs each with an fp32 output;
            # k, a power of two bringing max|dz| near 1 (no host sync), keeps tiny dz out of fp16's subnormals
            k = torch.exp2(-torch.floor(torch.log2(dz.abs().amax().clamp(min=torch.finfo(acc).tiny))))
            hi = dz.mul_(k).to(dtype)
            lo = dz.sub_(hi).to(dtype)
            if gh is not None:
                gh[start:end] = mm_out_fp32(hi, student.weight).add_(mm_out_fp32(lo, student.weight)).div_(k)
            if gw is not None:
                gw += mm_out_fp32(hi.t(), h).add_(mm_out_fp32(lo.t(), h)).div_(k)
            if gb is not None:
                gb += hi.sum(0, dtype=acc).add_(lo.sum(0, dtype=acc)).div_(k)
                gb_done = True
        else:  # no such GEMM here: the weight upcast made for the logits serves the backward GEMMs too
            weight_acc, _ = student.upcast()
            if gh is not None:
                gh[start:end] = dz @ weight_acc
            if gw is not None:
                gw.addmm_(dz.t(), h.to(acc))
        if gb is not None and not gb_done:
            gb += dz.sum(0)
        del dz
    result.stats = {k: torch.cat(v) if v else torch.empty(0, dtype=acc, device=device) for k, v in pieces.items()}
    if n == 0:
        result.stats = {k: torch.empty(0, dtype=acc, device=device) for k in keep}
    if want_grads:
        if gh is not None and spec.shard is not None:
            spec.shard.sum(gh)  # each rank holds dz_shard @ W_shard; the hidden states are replicated
        result.grad_hidden = gh if gh is not None else None
        result.grad_weight = None if gw is None else gw.to(grad_dtype)
        result.grad_bias = None if gb is None else gb.to(grad_dtype)
        if n == 0 and gh is not None:
            result.grad_hidden = torch.zeros_like(student.hidden, dtype=grad_dtype)
    return result

