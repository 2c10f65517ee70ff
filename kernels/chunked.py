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

    def logits(self, start: int, end: int) -> torch.Tensor:
        h = self.hidden[start:end]
        if self.bias is None:
            return h @ self.weight.t()
        return torch.addmm(self.bias, h, self.weight.t())


@dataclass(frozen=True)
class ChunkSpec:
    """Which per-row statistics a call needs."""

    inv_temperature: float = 1.0
    need_entropy: bool = False
    divergence: str | None = None  # None | "reverse_kl" | "forward_kl" | "jsd"
    beta: float = 0.5  # JSD mixing weight (Liger's convention: 0 = forward KL, 1 = reverse KL)
    need_teacher_logp: bool = False

    @property
    def needs_teacher(self) -> bool:
        return self.divergence is not None or self.need_teacher_logp


def default_chunk_size(num_tokens: int, vocab_size: int, device: torch.device) -> int:
    """Rows per chunk: a power of two near ``budget / V``, clamped to [256, 16384] and to N."""
    budget = _CHUNK_BUDGET.get(device.type, _CHUNK_BUDGET["cuda"])
    rows = 1 << max(0, int(math.log2(max(1, budget // vocab_size))))
    return max(1, min(num_tokens, max(_MIN_CHUNK, min(_MAX_CHUNK, rows))))


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_j a_ij b_ij per row, as a batched matmul (no [chunk, V] temporary)."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).view(-1)


class TorchChunkOps:
    """The PyTorch engine: per-chunk statistics and logit gradients with in-place fp32 math."""

    name = "torch"

    def forward(
        self, z: torch.Tensor, u: torch.Tensor | None, targets: torch.Tensor, spec: ChunkSpec
    ) -> tuple[dict[str, torch.Tensor], dict]:
        logp_all = _log_softmax_(z, spec.inv_temperature)
        stats = {"logp": logp_all.gather(1, targets[:, None]).view(-1)}
        p = logp_all.exp()
        cache = {"logp_all": logp_all, "p": p, "targets": targets}
        neg_entropy = _rowdot(p, logp_all) if (spec.need_entropy or spec.divergence == "reverse_kl") else None
        if spec.need_entropy:
            stats["entropy"] = cache["entropy"] = -neg_entropy
        if u is not None:
            logq_all = _log_softmax_(u, spec.inv_temperature)
            if spec.need_teacher_logp:
                stats["teacher_logp"] = logq_all.gather(1, targets[:, None]).view(-1)
            cache["logq_all"] = logq_all
            if spec.divergence == "reverse_kl":
                stats["divergence"] = neg_entropy - _rowdot(p, logq_all)
            elif spec.divergence == "forward_kl":
                q = logq_all.exp()
                stats["divergence"] = _rowdot(q, logq_all) - _rowdot(q, logp_all)
                cache["q"] = q
            elif spec.divergence == "jsd":
                b = spec.beta
                log_m = torch.logaddexp(logp_all + math.log1p(-b), logq_all + math.log(b))
                kl_p_m = _rowdot(p, logp_all) - _rowdot(p, log_m)
                kl_q_m = _rowdot(logq_all.exp(), logq_all - log_m)
                stats["divergence"] = b * kl_q_m + (1.0 - b) * kl_p_m
                cache["log_m"], cache["kl_p_m"] = log_m, kl_p_m
            if "divergence" in stats:
                cache["divergence"] = stats["divergence"]
        return stats, cache

    def backward(
        self,
        cache: dict,
        g_logp: torch.Tensor,
        g_ent: torch.Tensor | None,
        g_div: torch.Tensor | None,
        spec: ChunkSpec,
    ) -> torch.Tensor:
        """dL/dz for the chunk, fp32, written over the cached log p buffer.

        dz' = p * (a * log p + c) - g_div * [b_r log q + b_j (1-b) log m] - [fwd] g_div q + onehot * g_logp
        """
        logp_all, p = cache["logp_all"], cache["p"]
        coef_logp = torch.zeros_like(g_logp)
        const = -g_logp
        if g_ent is not None:
            coef_logp = coef_logp - g_ent
            const = const - g_ent * cache["entropy"]
        if g_div is not None:
            if spec.divergence == "reverse_kl":
                coef_logp = coef_logp + g_div
                const = const - g_div * cache["divergence"]
            elif spec.divergence == "forward_kl":
                const = const + g_div
            elif spec.divergence == "jsd":
                w = g_div * (1.0 - spec.beta)
                coef_logp = coef_logp + w
                const = const - w * cache["kl_p_m"]
        dz = logp_all.mul_(coef_logp[:, None]).add_(const[:, None])
        if g_div is not None and spec.divergence == "reverse_kl":
            dz.addcmul_(cache["logq_all"], -g_div[:, None])
        elif g_div is not None and spec.divergence == "jsd":
            dz.addcmul_(cache["log_m"], -(g_div * (1.0 - spec.beta))[:, None])
        dz.mul_(p)
        if g_div is not None and spec.divergence == "forward_kl":
            dz.addcmul_(cache["q"], -g_div[:, None])
        dz.scatter_add_(1, cache["targets"][:, None], g_logp[:, None])
        if spec.inv_temperature != 1.0:
            dz.mul_(spec.inv_temperature)
        return dz


def _log_softmax_(logits: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """log_softmax(logits * inv_temperature) in fp32, in place when ``logits`` already is fp32."""
    z = logits if logits.dtype == torch.float32 else logits.float()
    if inv_temperature != 1.0:
        z.mul_(inv_temperature)
    return z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))


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
    for start in range(0, n, chunk_size):
        end = min(n, start + chunk_size)
        z = student.logits(start, end)
        u = teacher.logits(start, end) if (teacher is not None and spec.needs_teacher) else None
        stats, cache = ops.forward(z, u, targets[start:end], spec)
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
        result.grad_hidden = gh if gh is not None else None
        result.grad_weight = None if gw is None else gw.to(dtype)
        result.grad_bias = None if gb is None else gb.to(dtype)
        if n == 0 and gh is not None:
            result.grad_hidden = torch.zeros_like(student.hidden)
    return result


def get_ops(impl: str, device: torch.device):
    """The engine for ``impl``: "torch", "triton" or "auto" (triton on CUDA when installed)."""
    if impl == "auto":
        impl = "triton" if device.type == "cuda" and _triton_available() else "torch"
    if impl == "torch":
        return TorchChunkOps()
    if impl == "triton":
        from .triton_ops import TritonChunkOps

        return TritonChunkOps()
    raise ValueError(f"impl={impl!r} is not one of ('auto', 'torch', 'triton')")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
