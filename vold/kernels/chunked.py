"""The chunk loop shared by every public function, and the PyTorch engine (the CPU engine).

Tokens are processed ``chunk`` rows at a time. Per chunk::

    z = h_s[c] @ W_s^T (+ b_s)            [chunk, V]   student logits (the only [*, V] buffers)
    u = h_t[c] @ W_t^T (+ b_t)            [chunk, V]   teacher logits (only when a teacher is given)
    stats = ops.forward(z, u)             logp(target), entropy, divergence, teacher logp(target)
    g = objective(stats)                  dL/dlogp, dL/dH, dL/dD per row (policy_loss.token_objective)
    dz = ops.backward(g)                  dL/dz, written over the chunk's own buffers
    dh[c] = dz @ W_s ; dW_s += dz^T @ h_s[c] ; db_s += sum_rows dz

so peak extra memory is O(chunk * V), independent of N. ``ops`` is the engine: ``TorchChunkOps``
(here) or ``TritonChunkOps`` (``triton_ops.py``); both implement the same formulas, with
z' = z / temperature, p = softmax(z'), q = softmax(u')::

    logp_y = z'_y - lse(z')                    d/dz' = onehot(y) - p
    H      = -sum_j p_j log p_j                d/dz'_j = -p_j (log p_j + H)
    reverse KL(p||q) = sum_j p_j (log p_j - log q_j)      d/dz'_j = p_j (log p_j - log q_j - KL)
    forward KL(q||p) = sum_j q_j (log q_j - log p_j)      d/dz'_j = p_j - q_j
    JSD_b = b KL(q||m) + (1-b) KL(p||m), m = b q + (1-b) p  d/dz'_j = (1-b) p_j (log p_j/m_j - KL(p||m))

and dL/dz = dL/dz' / temperature.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Elements of one [chunk, V] buffer the default chunk size aims at (per device type).
_CHUNK_BUDGET = {"cpu": 1 << 23, "cuda": 1 << 27}
_MIN_CHUNK, _MAX_CHUNK = 256, 16384


@dataclass
class Head:
    """One model's last hidden states ``[N, H]`` and lm_head ``weight [V, H]``, ``bias [V]``."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def logits(self, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden[start:end] @ weight^T (+ bias)``, written into ``out`` (``[end - start, V]``) when given."""
        h = self.hidden[start:end]
        if self.bias is None:
            return torch.mm(h, self.weight.t(), out=out)
        return torch.addmm(self.bias, h, self.weight.t(), out=out)


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice ``[start, start + size)`` of a vocabulary sharded over ``group`` (tensor-parallel
    lm_head, as Megatron's vocab-parallel cross-entropy). Row statistics are all-reduced: the max and
    sum-exp for each log-normaliser, then every vocabulary sum; the target's logit lives on one rank."""

    group: object  # torch.distributed.ProcessGroup
    start: int
    size: int

    def max(self, x: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return x

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM, group=self.group)
        return x

    def local_targets(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index into this shard, clamped; 1.0 where the target is on this rank else 0.0)."""
        local = targets - self.start
        inside = (local >= 0) & (local < self.size)
        return local.clamp(0, self.size - 1), inside.float()


def resolve_shard(
    process_group, local_rows: int, device: torch.device, impl: str, vocab_size: int | None
) -> tuple[str, VocabShard | None, int]:
    """``(impl, shard, global vocabulary size)`` for an optional ``process_group`` (vocab-parallel)."""
    if process_group is None:
        return impl, None, local_rows
    if vocab_size is not None:
        raise ValueError("vocab_size= cannot be combined with process_group= (shard the common rows instead)")
    shard = vocab_shard(process_group, local_rows, device, impl)
    return "torch", shard, local_rows * torch.distributed.get_world_size(process_group)


def vocab_shard(process_group, local_rows: int, device: torch.device, impl: str) -> VocabShard:
    """The ``VocabShard`` of this rank: equal contiguous shards, rank r holding rows
    ``[r * local_rows, (r + 1) * local_rows)`` of the global vocabulary (Megatron's layout)."""
    if impl not in ("auto", "torch"):
        raise ValueError(f"process_group= (vocab-parallel lm_head) runs on impl='torch', got impl={impl!r}")
    import torch.distributed as dist

    sizes = torch.tensor([local_rows, -local_rows], dtype=torch.float64, device=device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=process_group)
    if int(sizes[0]) != local_rows or int(-sizes[1]) != local_rows:
        raise ValueError(
            f"process_group: every rank must hold the same number of vocabulary rows (weight shards of "
            f"{int(-sizes[1])}..{int(sizes[0])} rows); pad the vocabulary to a multiple of the world size"
        )
    return VocabShard(process_group, dist.get_rank(process_group) * local_rows, local_rows)


def _reduce_max(x: torch.Tensor, shard: VocabShard | None) -> torch.Tensor:
    return x if shard is None else shard.max(x)


def _reduce_sum(x: torch.Tensor, shard: VocabShard | None) -> torch.Tensor:
    return x if shard is None else shard.sum(x)


def _gather_rows(values: torch.Tensor, targets: torch.Tensor, shard: VocabShard | None) -> torch.Tensor:
    """values[i, targets[i]] for global target ids (summed over the ranks that hold them)."""
    if shard is None:
        return values.gather(1, targets[:, None]).view(-1)
    local, inside = shard.local_targets(targets)
    return shard.sum(values.gather(1, local[:, None]).view(-1) * inside)


@dataclass(frozen=True)
class ChunkSpec:
    """Which per-row statistics a call needs."""

    inv_temperature: float = 1.0
    need_entropy: bool = False
    divergence: str | None = None  # None | "reverse_kl" | "forward_kl" | "jsd"
    beta: float = 0.5  # JSD mixing weight (Liger's convention: 0 = forward KL, 1 = reverse KL)
    need_teacher_logp: bool = False
    shard: VocabShard | None = None  # vocab-parallel lm_head (torch engine)

    @property
    def needs_teacher(self) -> bool:
        return self.divergence is not None or self.need_teacher_logp


def default_chunk_size(vocab_size: int, device: torch.device) -> int:
    """Rows per chunk: a power of two near ``budget / V``, clamped to [256, 16384] (independent of N,
    so torch_compile sees one chunk shape)."""
    budget = _CHUNK_BUDGET.get(device.type, _CHUNK_BUDGET["cuda"])
    rows = 1 << max(0, int(math.log2(max(1, budget // vocab_size))))
    return max(_MIN_CHUNK, min(_MAX_CHUNK, rows))


def _rowdot(
    a: torch.Tensor, b: torch.Tensor, shard: VocabShard | None = None, *, consume_b: bool = False,
    out: torch.Tensor | None = None,
):
    """sum_j a_ij b_ij per row with torch's pairwise summation (a BLAS dot over V accumulates
    sequentially and loses ~1e-5 relative at V = 32k). ``consume_b``: b is a temporary that may be
    overwritten, so no [chunk, V] buffer is allocated; else the product goes to ``out`` when given.
    Summed over the vocabulary shards."""
    return _reduce_sum((b.mul_(a) if consume_b else torch.mul(a, b, out=out)).sum(-1), shard)


_DIVERGENCE_CODE = {None: 0, "reverse_kl": 1, "forward_kl": 2, "jsd": 3}


def _scaled(logits: torch.Tensor, inv_t: float) -> torch.Tensor:
    x = logits.float()
    return x * inv_t if inv_t != 1.0 else x


class Workspace:
    """Reusable fp32 ``[rows, V]`` scratch buffers for the eager engine, owned by one ``run_chunks`` call:
    buffer ``i`` is allocated once and lent chunk after chunk (a ragged last chunk gets a row slice)."""

    def __init__(self) -> None:
        self._buffers: dict[int, torch.Tensor] = {}

    def get(self, index: int, like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(index)
        rows, cols = like.shape
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.device != like.device:
            buf = self._buffers[index] = torch.empty(rows, cols, dtype=torch.float32, device=like.device)
        return buf[:rows]


def _new(workspace: Workspace | None, index: int, like: torch.Tensor) -> torch.Tensor | None:
    """An ``out=`` buffer for a ``[chunk, V]`` result: the workspace's, or None (allocate)."""
    return None if workspace is None else workspace.get(index, like)


def _log_softmax(
    logits: torch.Tensor,
    inv_t: float,
    *,
    want_probs: bool,
    shard: VocabShard | None = None,
    workspace: Workspace | None = None,
    slots: tuple[int, int] = (0, 1),
):
    """``(log_softmax(logits * inv_t), logsumexp)``, plus ``softmax`` when ``want_probs``: fp32, two
    ``[chunk, V]`` buffers (the workspace's ``slots`` when given; the logits are never modified: the
    backward pass rereads them)."""
    x = _scaled(logits, inv_t)
    row_max = _reduce_max(x.amax(dim=-1, keepdim=True), shard)
    logp = torch.sub(x, row_max, out=_new(workspace, slots[0], x))
    probs = torch.exp(logp, out=_new(workspace, slots[1], x))
    log_total = _reduce_sum(probs.sum(dim=-1, keepdim=True), shard).log()
    logp.sub_(log_total)
    lse = (row_max + log_total).view(-1)
    if want_probs:
        return logp, lse, probs.div_(log_total.exp())
    del probs
    return logp, lse


def _log_p_over_mixture(log_q_over_p: torch.Tensor, beta: float) -> torch.Tensor:
    """log(p / m) for m = beta q + (1 - beta) p, from the difference log(q / p) (no cancellation):
    log p/m = -log((1 - beta) + beta q/p)."""
    log_1m_beta = math.log1p(-beta)
    return torch.nn.functional.softplus(log_q_over_p + (math.log(beta) - log_1m_beta)).add_(log_1m_beta).neg_()


def chunk_statistics(
    z: torch.Tensor,
    u: torch.Tensor | None,
    targets: torch.Tensor,
    inv_t: float,
    code: int,
    beta: float,
    shard: VocabShard | None = None,
    workspace: Workspace | None = None,
) -> dict[str, torch.Tensor]:
    """Per-row statistics of one chunk (pure function: eager, or compiled by torch.compile).

    Returns fp32 ``[chunk]`` tensors: lse_z, logp, entropy and, with a teacher, lse_u, teacher_logp,
    divergence (code 1 reverse KL, 2 forward KL, 3 JSD) and aux (KL(p||m) for JSD). Differences of
    log-probabilities are formed before each reduction (no cancellation of two ~log V sums).
    ``workspace`` (eager): its buffers hold the ``[chunk, V]`` intermediates instead of new tensors.
    """
    logp_all, lse_z, p = _log_softmax(z, inv_t, want_probs=True, shard=shard, workspace=workspace, slots=(0, 1))
    entropy = -_rowdot(p, logp_all, shard, out=_new(workspace, 3, p))  # slot 3 is free until the teacher
    out = {"lse_z": lse_z, "logp": _gather_rows(logp_all, targets, shard), "entropy": entropy}
    if u is None:
        return out
    if code >= 2:
        logq_all, lse_u, q = _log_softmax(u, inv_t, want_probs=True, shard=shard, workspace=workspace, slots=(2, 3))
    else:
        logq_all, lse_u = _log_softmax(u, inv_t, want_probs=False, shard=shard, workspace=workspace, slots=(2, 3))
    out["lse_u"] = lse_u
    out["teacher_logp"] = _gather_rows(logq_all, targets, shard)
    if code == 1:
        out["divergence"] = _rowdot(p, logq_all.neg_().add_(logp_all), shard, consume_b=True)  # sum p (log p - log q)
    elif code == 2:
        out["divergence"] = _rowdot(q, logq_all.sub_(logp_all), shard, consume_b=True)  # sum q (log q - log p)
    elif code == 3:
        log_q_over_p = logq_all.sub_(logp_all)
        log_p_over_m = _log_p_over_mixture(log_q_over_p, beta)
        kl_p_m = _rowdot(p, log_p_over_m, shard)  # before log_p_over_m is consumed below
        kl_q_m = _rowdot(q, log_q_over_p.add_(log_p_over_m), shard, consume_b=True)  # log q/m = log q/p + log p/m
        out["divergence"] = beta * kl_q_m + (1.0 - beta) * kl_p_m
        out["aux"] = kl_p_m
    return out


def _shifted(logits: torch.Tensor, inv_t: float, lse: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``logits * inv_t - lse[:, None]`` in fp32; over the logits' own buffer when ``in_place`` and fp32."""
    if not (in_place and logits.dtype == torch.float32):
        return _scaled(logits, inv_t) - lse[:, None]
    if inv_t != 1.0:
        logits.mul_(inv_t)
    return logits.sub_(lse[:, None])


def _add_at_targets(
    dz: torch.Tensor, targets: torch.Tensor, g: torch.Tensor, shard: VocabShard | None, pointwise: bool
):
    """dz[i, targets[i]] += g[i] (targets on this vocabulary shard only). ``pointwise``: as a select that
    torch.compile fuses into the pass writing dz (a scatter would make it write dz out first)."""
    if shard is None:
        local, g_here = targets, g
    else:
        local, inside = shard.local_targets(targets)
        g_here = g * inside
    if not pointwise:
        return dz.scatter_add_(1, local[:, None], g_here[:, None])
    cols = torch.arange(dz.shape[1], device=dz.device)
    return torch.where(cols[None, :] == local[:, None], dz + g_here[:, None], dz)


def chunk_logit_grad(
    z: torch.Tensor,
    u: torch.Tensor | None,
    targets: torch.Tensor,
    stats: dict[str, torch.Tensor],
    g_logp: torch.Tensor,
    g_ent: torch.Tensor | None,
    g_div: torch.Tensor | None,
    inv_t: float,
    code: int,
    beta: float,
    shard: VocabShard | None = None,
    in_place: bool = False,
) -> torch.Tensor:
    """dL/dz (fp32 ``[chunk, V]``) from the row coefficients; recomputes p, log p (and log q) from the
    logits and the saved log-normalisers::

        dz' = p * (-g_logp - g_ent (log p + H) + g_div [c=1] (log p - log q - D)
                   + g_div (1-b) [c=3] (log p - log m - KL(p||m))) + g_div [c=2] (p - q) + g_logp onehot

    ``in_place=False``: a pure function (what torch.compile traces; see ``_logit_grad_into``).
    ``in_place=True`` (eager): fp32 logits ``z`` and ``u`` are used as scratch and dz is returned in z's
    buffer, so a chunk allocates no new ``[chunk, V]`` buffer (each is a fresh, page-faulted mmap on the CPU).
    """
    logp = _shifted(z, inv_t, stats["lse_z"], in_place)
    inner, q, const = None, None, -g_logp
    if g_div is not None and code:
        logq = _shifted(u, inv_t, stats["lse_u"], in_place)
        if code == 1:
            inner = logq.neg_().add_(logp).sub_(stats["divergence"][:, None]).mul_(g_div[:, None])
        elif code == 2:
            q, const = logq.exp_(), const + g_div  # g_div (p - q) = p * g_div - g_div q
        else:
            w = g_div * (1.0 - beta)
            inner = _log_p_over_mixture(logq.sub_(logp), beta).sub_(stats["aux"][:, None]).mul_(w[:, None])
    if g_ent is not None:  # inner -= g_ent (log p + H)
        if inner is None:
            inner = (logp + stats["entropy"][:, None]).mul_(-g_ent[:, None])
        else:
            inner.addcmul_(logp, g_ent[:, None], value=-1.0).sub_((g_ent * stats["entropy"])[:, None])
    p = logp.exp_()  # log p is not needed any more
    dz = p.mul_(const[:, None]) if inner is None else p.mul_(inner.add_(const[:, None]))
    if q is not None:
        dz.addcmul_(q, g_div[:, None], value=-1.0)
    dz = _add_at_targets(dz, targets, g_logp, shard, pointwise=not in_place)
    return dz.mul_(inv_t) if inv_t != 1.0 else dz


def _logit_grad_into(z: torch.Tensor, *args) -> None:
    """``z <- chunk_logit_grad(z, *args)``: the compiled backward writes dz over the fp32 logits in the
    same pass that computes it (no ``[chunk, V]`` output buffer)."""
    z.copy_(chunk_logit_grad(z, *args))


class TorchChunkOps:
    """The PyTorch engine. ``compiled=True`` runs the same per-chunk functions through torch.compile
    (inductor fuses them into a few reductions and one pointwise pass); chunks of another row count
    than ``chunk_rows`` (a ragged last chunk, or N below one chunk) run eagerly, so a changing N never
    recompiles."""

    def __init__(self, compiled: bool = False, chunk_rows: int | None = None):
        self.compiled = compiled
        self.chunk_rows = chunk_rows
        self.name = "torch_compile" if compiled else "torch"

    def _fn(self, eager, rows: int, spec: ChunkSpec):
        compiled = self.compiled and rows == self.chunk_rows and spec.shard is None  # collectives run eagerly
        return _compiled(eager) if compiled else eager

    def forward(
        self, z: torch.Tensor, u: torch.Tensor | None, targets: torch.Tensor, spec: ChunkSpec,
        workspace: Workspace | None = None,
    ):
        code = _DIVERGENCE_CODE[spec.divergence] if u is not None else 0
        fn = self._fn(chunk_statistics, z.shape[0], spec)
        if fn is chunk_statistics:
            stats = fn(z, u, targets, spec.inv_temperature, code, spec.beta, spec.shard, workspace)
        else:
            stats = fn(z, u, targets, spec.inv_temperature, code, spec.beta, spec.shard)
        cache = {"z": z, "u": u, "targets": targets, "stats": stats, "code": code}
        public = {"logp": stats["logp"]}
        if spec.need_entropy:
            public["entropy"] = stats["entropy"]
        if u is not None and spec.need_teacher_logp:
            public["teacher_logp"] = stats["teacher_logp"]
        if code:
            public["divergence"] = stats["divergence"]
        return public, cache

    def backward(self, cache: dict, g_logp, g_ent, g_div, spec: ChunkSpec) -> torch.Tensor:
        """dL/dz of the chunk. Consumes the chunk's logits: dz is written over ``z`` when z is fp32."""
        z = cache["z"]
        args = (cache["u"], cache["targets"], cache["stats"], g_logp.float(), g_ent, g_div,
                spec.inv_temperature, cache["code"], spec.beta, spec.shard)
        if self.compiled and z.shape[0] == self.chunk_rows and spec.shard is None:
            if z.dtype == torch.float32 and z.is_contiguous():
                _compiled(_logit_grad_into)(z, *args)
                return z
            return _compiled(chunk_logit_grad)(z, *args)
        return chunk_logit_grad(z, *args, in_place=True)


_COMPILED: dict = {}


def _compiled(fn):
    """One torch.compile'd version per function for the process (static shapes)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


# objective(start, end, stats) -> (dL/dlogp, dL/dH or None, dL/dD or None) for rows [start, end)
Objective = Callable[[int, int, dict], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]


@dataclass
class ChunkResult:
    stats: dict[str, torch.Tensor]  # each [N] fp32
    grad_hidden: torch.Tensor | None = None
    grad_weight: torch.Tensor | None = None
    grad_bias: torch.Tensor | None = None


def run_chunks(
    student: Head,
    teacher: Head | None,
    targets: torch.Tensor,
    spec: ChunkSpec,
    ops,
    chunk_size: int,
    *,
    objective: Objective | None = None,
    grad_hidden: bool = False,
    grad_weight: bool = False,
    grad_bias: bool = False,
    keep: tuple[str, ...] = ("logp", "entropy", "divergence", "teacher_logp"),
) -> ChunkResult:
    """Run ``ops`` over all chunks; with ``objective``, also return the student's gradients.

    Statistics named in ``keep`` are gathered into ``[N]`` vectors. Gradients w.r.t. the student's
    weight and bias are accumulated in fp32 and returned in the weight's dtype.
    """
    n = student.hidden.shape[0]
    device = student.hidden.device
    dtype = student.weight.dtype
    want_grads = objective is not None and (grad_hidden or grad_weight or grad_bias)
    result = ChunkResult(stats={})
    gh = torch.empty_like(student.hidden) if want_grads and grad_hidden else None
    gw = torch.zeros(student.weight.shape, dtype=torch.float32, device=device) if want_grads and grad_weight else None
    gb = torch.zeros(student.weight.shape[0], dtype=torch.float32, device=device) if want_grads and grad_bias else None
    pieces: dict[str, list[torch.Tensor]] = {}
    # One logits buffer per model for the whole call, reused chunk after chunk (the backward overwrites
    # it with dz): a new [chunk, V] tensor per chunk would be a fresh, page-faulted allocation each time.
    use_teacher = teacher is not None and spec.needs_teacher
    workspace = Workspace()  # the eager engine's intermediates, freed when this call returns
    rows = min(chunk_size, n)
    z_buf = torch.empty(rows, student.weight.shape[0], dtype=student.weight.dtype, device=device)
    u_buf = None
    if use_teacher:
        u_buf = torch.empty(rows, teacher.weight.shape[0], dtype=teacher.weight.dtype, device=device)
    for start in range(0, n, chunk_size):
        end = min(n, start + chunk_size)
        z = student.logits(start, end, out=z_buf[: end - start])
        u = teacher.logits(start, end, out=u_buf[: end - start]) if use_teacher else None
        stats, cache = ops.forward(z, u, targets[start:end], spec, workspace)
        del z, u
        for key in keep:
            if key in stats:
                pieces.setdefault(key, []).append(stats[key])
        if objective is None:
            continue
        g_logp, g_ent, g_div = objective(start, end, stats)
        if not want_grads:
            continue
        dz = ops.backward(cache, g_logp, g_ent, g_div, spec)
        del cache
        dz_mm = dz if dz.dtype == dtype else dz.to(dtype)
        h = student.hidden[start:end]
        if gh is not None:
            torch.mm(dz_mm, student.weight, out=gh[start:end])
        if gw is not None:
            if dtype == torch.float32:
                gw.addmm_(dz_mm.t(), h)
            else:
                gw += (dz_mm.t() @ h).float()
        if gb is not None:
            gb += dz.float().sum(0)
        del dz, dz_mm
    result.stats = {k: torch.cat(v) if v else torch.empty(0, device=device) for k, v in pieces.items()}
    if n == 0:
        result.stats = {k: torch.empty(0, device=device) for k in keep}
    if want_grads:
        if gh is not None and spec.shard is not None:
            spec.shard.sum(gh)  # each rank holds dz_shard @ W_shard; the hidden states are replicated
        result.grad_hidden = gh if gh is not None else None
        result.grad_weight = None if gw is None else gw.to(dtype)
        result.grad_bias = None if gb is None else gb.to(dtype)
        if n == 0 and gh is not None:
            result.grad_hidden = torch.zeros_like(student.hidden)
    return result


def get_ops(impl: str, device: torch.device, chunk_size: int | None = None):
    """The engine for ``impl``: "torch", "torch_compile", "triton" or "auto" (triton on CUDA when
    installed, else torch). ``chunk_size``: the row count torch_compile compiles for."""
    if impl == "auto":
        impl = "triton" if device.type == "cuda" and _triton_available() else "torch"
    if impl == "torch":
        return TorchChunkOps()
    if impl == "torch_compile":
        return TorchChunkOps(compiled=True, chunk_rows=chunk_size)
    if impl == "triton":
        from .triton_ops import TritonChunkOps

        return TritonChunkOps()
    raise ValueError(f"impl={impl!r} is not one of ('auto', 'torch', 'torch_compile', 'triton')")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
