"""The PyTorch engine (``impl="torch"``, and ``impl="torch_compile"`` through torch.compile).

Per chunk of ``[chunk, V]`` logits (see ``chunked.run_chunks``), ``forward`` reduces each row to its
statistics and ``backward`` forms the logit gradient from the row coefficients the objective returns.
With z' = z / temperature, p = softmax(z'), q = softmax(u')::

    logp_y = z'_y - lse(z')                    d/dz' = onehot(y) - p
    H      = -sum_j p_j log p_j                d/dz'_j = -p_j (log p_j + H)
    reverse KL(p||q) = sum_j p_j (log p_j - log q_j)      d/dz'_j = p_j (log p_j - log q_j - KL)
    forward KL(q||p) = sum_j q_j (log q_j - log p_j)      d/dz'_j = p_j - q_j
    JSD_b = b KL(q||m) + (1-b) KL(p||m), m = b q + (1-b) p  d/dz'_j = (1-b) p_j (log p_j/m_j - KL(p||m))

and dL/dz = dL/dz' / temperature. The Triton engine (``engines/triton.py``) implements the same
formulas with the same interface (``engines.Engine``). Row statistics of a vocab-parallel head
(``VocabShard``) are all-reduced here; that runs on this engine only.
"""

from __future__ import annotations

import math

import torch

from ..common import DIVERGENCE_CODE, ChunkSpec, VocabShard, Workspace, block_rows


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



def _rowdot(
    a: torch.Tensor, b: torch.Tensor, shard: VocabShard | None = None, *, consume_b: bool = False,
    out: torch.Tensor | None = None,
):
    """sum_j a_ij b_ij per row with torch's pairwise summation (a BLAS dot over V accumulates
    sequentially and loses ~1e-5 relative at V = 32k). ``consume_b``: b is a temporary that may be
    overwritten, so no [chunk, V] buffer is allocated; else the product goes to ``out`` when given.
    Summed over the vocabulary shards."""
    return _reduce_sum((b.mul_(a) if consume_b else torch.mul(a, b, out=out)).sum(-1), shard)



def _scaled(logits: torch.Tensor, inv_t: float) -> torch.Tensor:
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return x * inv_t if inv_t != 1.0 else x



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

    Returns ``[chunk]`` tensors in the logits' dtype (fp32, or fp64): lse_z, logp, entropy and, with a teacher,
    lse_u, teacher_logp, divergence (code 1 reverse KL, 2 forward KL, 3 JSD) and aux (KL(p||m) for JSD). Differences of
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
        log_p_over_q = torch.sub(logp_all, logq_all, out=logq_all)
        out["divergence"] = _rowdot(p, log_p_over_q, shard, consume_b=True)  # sum p (log p - log q)
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
    """dL/dz (``[chunk, V]``, the logits' dtype) from the row coefficients; recomputes p, log p (and log q) from the
    logits and the saved log-normalisers::

        dz' = p * (-g_logp - g_ent (log p + H) + g_div [c=1] (log p - log q - D)
                   + g_div (1-b) [c=3] (log p - log m - KL(p||m))) + g_div [c=2] (p - q) + g_logp onehot

    ``in_place=False``: a pure function (what torch.compile traces; see ``_logit_grad_into``).
    ``in_place=True`` (eager): fp32 logits ``z`` and ``u`` are used as scratch and dz is returned in z's
    buffer, so a chunk allocates no new ``[chunk, V]`` buffer (each is a fresh, page-faulted mmap on the CPU).
    """
    logp = _shifted(z, inv_t, stats["lse_z"], in_place)
    # inner: the [chunk, V] part of the bracket; const: its per-row part (row vectors are folded there, so no
    # [chunk, V] pass subtracts them)
    inner, q, const = None, None, -g_logp
    if g_div is not None and code:
        logq = _shifted(u, inv_t, stats["lse_u"], in_place)
        if code == 1:  # g_div (log p - log q) - g_div D
            inner = torch.sub(logp, logq, out=logq if in_place else None).mul_(g_div[:, None])
            const = const - g_div * stats["divergence"]
        elif code == 2:
            q, const = logq.exp_(), const + g_div  # g_div (p - q) = p * g_div - g_div q
        else:  # w (log p/m) - w KL(p||m)
            w = g_div * (1.0 - beta)
            inner = _log_p_over_mixture(logq.sub_(logp), beta).mul_(w[:, None])
            const = const - w * stats["aux"]
    if g_ent is not None:  # - g_ent log p - g_ent H
        if inner is None:
            inner = logp * (-g_ent)[:, None]
        else:
            inner.addcmul_(logp, g_ent[:, None], value=-1.0)
        const = const - g_ent * stats["entropy"]
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


class TorchEngine:
    """The PyTorch engine. ``compiled=True`` runs the same per-chunk functions through torch.compile
    (inductor fuses them into a few reductions and one pointwise pass).

    On the CPU a chunk's elementwise work runs in row blocks (``common.block_rows``: ~2 MiB eager, ~16 MiB
    compiled, at most ``chunk_rows``) so each pass stays in the cache; the GEMMs still see the whole chunk.
    torch_compile compiles for the full block shape only: a ragged block (the end of a ragged chunk, or N
    below one block) runs eagerly, so a changing N never recompiles. A vocab-parallel chunk (collectives
    per reduction) is one block, run eagerly."""

    def __init__(self, compiled: bool = False, chunk_rows: int | None = None):
        self.compiled = compiled
        self.chunk_rows = chunk_rows
        self.name = "torch_compile" if compiled else "torch"

    def _blocks(self, z: torch.Tensor, spec: ChunkSpec):
        """``(start, end, compiled)`` of each row block of the chunk ``z``."""
        rows = z.shape[0]
        block = None if spec.shard is not None else block_rows(z.shape[1], z.device, self.compiled, self.chunk_rows)
        if block is None:  # one block: compiled when it has the chunk shape torch_compile compiles for
            yield 0, rows, self.compiled and spec.shard is None and rows == self.chunk_rows
            return
        for start in range(0, rows, block):
            end = min(rows, start + block)
            yield start, end, self.compiled and end - start == block

    def forward(
        self, z: torch.Tensor, u: torch.Tensor | None, targets: torch.Tensor, spec: ChunkSpec,
        workspace: Workspace | None = None,
    ):
        code = DIVERGENCE_CODE[spec.divergence] if u is not None else 0
        parts = []
        for start, end, compiled in self._blocks(z, spec):
            args = (z[start:end], None if u is None else u[start:end], targets[start:end], spec.inv_temperature,
                    code, spec.beta)
            if compiled:
                parts.append(_compiled(chunk_statistics)(*args, None))
            else:
                parts.append(chunk_statistics(*args, spec.shard, workspace))
        stats = parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
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
        """dL/dz of the chunk, written over the chunk's logits ``z`` (fp32 or fp64) block by block."""
        z, u, targets, stats = cache["z"], cache["u"], cache["targets"], cache["stats"]
        g_logp = g_logp.to(z.dtype)
        for start, end, compiled in self._blocks(z, spec):
            block = slice(start, end)
            zb = z[block]
            args = (_rows(u, block), targets[block], {k: v[block] for k, v in stats.items()}, g_logp[block],
                    _rows(g_ent, block), _rows(g_div, block), spec.inv_temperature, cache["code"], spec.beta)
            if compiled:
                _compiled(_logit_grad_into)(zb, *args, None)
            else:
                dz = chunk_logit_grad(zb, *args, spec.shard, in_place=True)
                if dz.data_ptr() != zb.data_ptr():
                    zb.copy_(dz)
        return z


def _rows(x: torch.Tensor | None, block: slice) -> torch.Tensor | None:
    return None if x is None else x[block]


_COMPILED: dict = {}


def _compiled(fn):
    """One torch.compile'd version per function for the process (static shapes)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]

