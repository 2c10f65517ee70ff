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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of every logit, statistic and accumulation for inputs of ``dtype``: promote(fp32, dtype),
    i.e. fp32 for bf16 / fp16 / fp32 inputs and fp64 for fp64 inputs."""
    return torch.promote_types(torch.float32, dtype)


_MM_OUT_DTYPE: dict[tuple[str, torch.dtype], bool] = {}


def mm_out_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` of two bf16/fp16 matrices with an fp32 accumulation and an fp32 output (cuBLAS)."""
    if out is None:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b, out_dtype=torch.float32, out=out)


def mm_has_out_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` inputs on this device type
    (a low-precision GEMM with fp32 accumulation and an fp32 output: cuBLAS in torch >= 2.8; not on the
    CPU in torch 2.13). Probed once per (device type, dtype) with a 2x2 product."""
    key = (device.type, dtype)
    if key not in _MM_OUT_DTYPE:
        try:
            a = torch.zeros(2, 2, dtype=dtype, device=device)
            _MM_OUT_DTYPE[key] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, NotImplementedError, TypeError):
            _MM_OUT_DTYPE[key] = False
    return _MM_OUT_DTYPE[key]


@dataclass(frozen=True)
class LogitTransform:
    """``z -> c tanh(z s / c)`` (``softcap`` c, Gemma-2's final_logit_softcapping) or ``z -> z s`` (no cap),
    with ``s = logit_scale`` (Cohere's), applied to a head's logits ``h W^T + b`` before the temperature,
    as TRL's chunked kernels order them. Its derivative is ``s (1 - (z'/c)^2)`` at the capped ``z'``."""

    logit_scale: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        return self.logit_scale == 1.0 and self.softcap is None

    def apply_(self, z: torch.Tensor) -> torch.Tensor:
        if self.softcap is not None:
            return z.mul_(self.logit_scale / self.softcap).tanh_().mul_(self.softcap)
        return z.mul_(self.logit_scale) if self.logit_scale != 1.0 else z

    def backward_(self, dz: torch.Tensor, capped: torch.Tensor | None) -> torch.Tensor:
        """dL/dz from dL/dz' (in place); ``capped``: z' of the chunk (consumed), needed with a soft cap."""
        if self.softcap is not None:
            dz.mul_(capped.div_(self.softcap).square_().neg_().add_(1.0))
        return dz.mul_(self.logit_scale) if self.logit_scale != 1.0 else dz


def logit_transform(prefix: str, logit_scale: float, final_logit_softcapping: float | None) -> LogitTransform:
    """Validated ``LogitTransform``: ``{prefix}logit_scale`` finite and > 0, ``{prefix}final_logit_softcapping``
    None or finite and > 0 (``ValueError`` naming the argument otherwise)."""
    if not (math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"{prefix}logit_scale must be finite and > 0, got {logit_scale}")
    cap = final_logit_softcapping
    if cap is not None and not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"{prefix}final_logit_softcapping must be None or finite and > 0, got {cap}")
    return LogitTransform(float(logit_scale), None if cap is None else float(cap))


@dataclass
class Head:
    """One model's last hidden states ``[N, H]`` and lm_head ``weight [V, H]``, ``bias [V]``.

    Its logits are computed in ``compute_dtype(weight.dtype)`` with an accumulation of that precision
    whatever the input dtype, and never rounded to the input dtype: bf16/fp16 inputs on CUDA use a
    low-precision GEMM with an fp32 output (``torch.mm(out_dtype=torch.float32)``); elsewhere (the CPU:
    torch 2.13 has no such GEMM there) the weight is upcast once per call (V x H x 4 bytes, kept while
    the call runs) and each chunk's hidden rows when they are used. ``dtype`` may be raised by
    ``run_chunks`` to the other head's compute dtype.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    transform: LogitTransform = LogitTransform()

    def __post_init__(self) -> None:
        self.dtype = compute_dtype(self.weight.dtype)
        self._upcast: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def upcast(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight, bias)`` in ``self.dtype`` (made once, on first use)."""
        if self._upcast is None or self._upcast[0].dtype != self.dtype:
            bias = None if self.bias is None else self.bias.to(self.dtype)
            self._upcast = (self.weight.to(self.dtype), bias)
        return self._upcast

    def logits(self, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """``transform(hidden[start:end] @ weight^T (+ bias))`` in ``self.dtype``, into ``out`` when given."""
        return self.transform.apply_(self._linear(start, end, out))

    def _linear(self, start: int, end: int, out: torch.Tensor | None) -> torch.Tensor:
        h = self.hidden[start:end]
        if h.dtype == self.dtype:
            weight, bias = self.weight, self.bias
        elif self.dtype == torch.float32 and mm_has_out_dtype(h.device, h.dtype):
            z = mm_out_fp32(h, self.weight.t(), out=out)
            return z if self.bias is None else z.add_(self.bias)
        else:
            h = h.to(self.dtype)
            weight, bias = self.upcast()
        if bias is None:
            return torch.mm(h, weight.t(), out=out)
        return torch.addmm(bias, h, weight.t(), out=out)


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
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return x * inv_t if inv_t != 1.0 else x


class Workspace:
    """Reusable ``[rows, V]`` scratch buffers (of the logits' dtype) for the eager engine, owned by one
    ``run_chunks`` call: buffer ``i`` is allocated once and lent chunk after chunk (a ragged last chunk
    gets a row slice)."""

    def __init__(self) -> None:
        self._buffers: dict[int, torch.Tensor] = {}

    def get(self, index: int, like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(index)
        rows, cols = like.shape
        if (buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.device != like.device
                or buf.dtype != like.dtype):
            buf = self._buffers[index] = torch.empty(rows, cols, dtype=like.dtype, device=like.device)
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
    """``logits * inv_t - lse[:, None]``; over the logits' own buffer when ``in_place`` and fp32/fp64."""
    if not (in_place and logits.dtype in (torch.float32, torch.float64)):
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
        args = (cache["u"], cache["targets"], cache["stats"], g_logp.to(z.dtype), g_ent, g_div,
                spec.inv_temperature, cache["code"], spec.beta, spec.shard)
        if self.compiled and z.shape[0] == self.chunk_rows and spec.shard is None:
            if z.dtype in (torch.float32, torch.float64) and z.is_contiguous():
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
        capped = None if capped_buf is None else capped_buf[: end - start].copy_(cache["z"])
        dz = ops.backward(cache, g_logp, g_ent, g_div, spec)
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
        elif acc == torch.float32 and mm_has_out_dtype(device, dtype):
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


def cast_grad(name: str, grad: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``grad`` in ``dtype`` (the input's). A finite gradient that does not fit float16's range (|g| > 65504)
    raises ``ValueError`` naming the input instead of coming back as inf."""
    if grad is None or grad.dtype == dtype:
        return grad
    out = grad.to(dtype)
    if dtype == torch.float16 and not torch.compiler.is_compiling() and not bool(torch.isfinite(out).all()):
        raise ValueError(
            f"the gradient w.r.t. {name} overflows float16 (max |g| = {float(grad.abs().max()):.3g} > 65504): "
            "use bf16 or fp32 inputs, or scale the loss down"
        )
    return out


def get_ops(impl: str, device: torch.device, chunk_size: int | None = None, dtype: torch.dtype = torch.float32):
    """The engine for ``impl``: "torch", "torch_compile", "triton" or "auto" (triton on CUDA when
    installed and the inputs are not fp64, else torch). ``chunk_size``: the row count torch_compile
    compiles for. ``dtype``: the inputs' dtype; the Triton kernels compute in fp32, so fp64 inputs with
    ``impl="triton"`` raise ``ValueError``."""
    if impl == "auto":
        use_triton = device.type == "cuda" and dtype != torch.float64 and _triton_available()
        impl = "triton" if use_triton else "torch"
    if impl == "triton" and dtype == torch.float64:
        raise ValueError("impl='triton' computes in fp32 and does not take float64 inputs; use impl='torch' "
                         "(or 'torch_compile', or 'auto') for float64 math end to end")
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
