"""The Triton engine (``impl="triton"``): per-row softmax statistics and logit gradients, fused, over
``[chunk, V]`` logits.

The GEMMs stay on cuBLAS (``chunked.run_chunks``); the interface is ``engines.Engine``, as in
``engines/torch.py``. Per chunk two kernels run, one program per row:

1. ``_row_stats_kernel`` reads the student logits ``z`` (and the teacher's ``u``) once, in
   ``BLOCK_V`` tiles, with an online softmax: running max ``m``, ``s = sum e^(z-m)``,
   ``a = sum e^(z-m) (z-m)`` (entropy ``H = log s - a/s``), ``b = sum e^(z-m) (z-u)`` (reverse KL
   ``= b/s - lse_z + lse_u``) and ``c = sum e^(u-m_u) (u-z)`` (forward KL ``= c/s_u - lse_u + lse_z``).
   JSD needs ``log m`` per element, so it takes a second sweep once both log-normalisers are known.
2. ``_dlogits_kernel`` sweeps again and overwrites ``z`` *in place* with
   ``dL/dz = [g_logp (onehot - p) + g_ent dH/dz + g_div dD/dz] / T`` (formulas in ``engines/torch.py``),
   in the logits' own dtype, ready for the two backward GEMMs.

All arithmetic is fp32 whatever the logits' dtype. Under ``TRITON_INTERPRET=1`` this runs on the
CPU (one tile per row, so the interpreter's per-iteration cost is paid once), which is how CI tests it.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - exercised only where triton is missing
    raise ImportError(
        "impl='triton' needs the triton package (pip install 'vold[triton]'); use impl='torch' on machines without it"
    ) from error

from ..common import DIVERGENCE_CODE, ChunkSpec, Workspace


@triton.jit
def _row_stats_kernel(
    z_ptr, stride_z, u_ptr, stride_u, y_ptr,
    lse_z_ptr, lse_u_ptr, logp_ptr, teacher_logp_ptr, entropy_ptr, div_ptr, aux_ptr,
    V, inv_t, beta, log_1m_beta, log_beta,
    HAS_TEACHER: tl.constexpr, DIVERGENCE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    u_row = u_ptr + row * stride_u
    m_z = tl.full((), -1.0e30, tl.float32)
    s_z = tl.zeros((), tl.float32)
    a_z = tl.zeros((), tl.float32)
    b_zu = tl.zeros((), tl.float32)
    m_u = tl.full((), -1.0e30, tl.float32)
    s_u = tl.zeros((), tl.float32)
    c_uz = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        valid = offs < V
        z = tl.load(z_row + offs, mask=valid, other=-1.0e30).to(tl.float32) * inv_t
        m_new = tl.maximum(m_z, tl.max(z, axis=0))
        alpha = tl.exp(m_z - m_new)
        e = tl.where(valid, tl.exp(z - m_new), 0.0)
        a_z = alpha * (a_z + s_z * (m_z - m_new)) + tl.sum(tl.where(valid, e * (z - m_new), 0.0), axis=0)
        s_z = alpha * s_z + tl.sum(e, axis=0)
        if HAS_TEACHER:
            u = tl.load(u_row + offs, mask=valid, other=-1.0e30).to(tl.float32) * inv_t
            if DIVERGENCE == 1:
                b_zu = alpha * b_zu + tl.sum(tl.where(valid, e * (z - u), 0.0), axis=0)
            mu_new = tl.maximum(m_u, tl.max(u, axis=0))
            alpha_u = tl.exp(m_u - mu_new)
            e_u = tl.where(valid, tl.exp(u - mu_new), 0.0)
            if DIVERGENCE == 2:
                c_uz = alpha_u * c_uz + tl.sum(tl.where(valid, e_u * (u - z), 0.0), axis=0)
            s_u = alpha_u * s_u + tl.sum(e_u, axis=0)
            m_u = mu_new
        m_z = m_new
    lse_z = m_z + tl.log(s_z)
    y = tl.load(y_ptr + row)
    tl.store(lse_z_ptr + row, lse_z)
    tl.store(logp_ptr + row, tl.load(z_row + y).to(tl.float32) * inv_t - lse_z)
    tl.store(entropy_ptr + row, tl.log(s_z) - a_z / s_z)
    if HAS_TEACHER:
        lse_u = m_u + tl.log(s_u)
        tl.store(lse_u_ptr + row, lse_u)
        tl.store(teacher_logp_ptr + row, tl.load(u_row + y).to(tl.float32) * inv_t - lse_u)
        if DIVERGENCE == 1:
            tl.store(div_ptr + row, b_zu / s_z - lse_z + lse_u)
        if DIVERGENCE == 2:
            tl.store(div_ptr + row, c_uz / s_u - lse_u + lse_z)
        if DIVERGENCE == 3:
            kl_pm = tl.zeros((), tl.float32)
            kl_qm = tl.zeros((), tl.float32)
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                valid = offs < V
                logp = tl.load(z_row + offs, mask=valid, other=0.0).to(tl.float32) * inv_t - lse_z
                logq = tl.load(u_row + offs, mask=valid, other=0.0).to(tl.float32) * inv_t - lse_u
                lo = logp + log_1m_beta
                hi = logq + log_beta
                top = tl.maximum(lo, hi)
                log_m = top + tl.log(tl.exp(lo - top) + tl.exp(hi - top))
                kl_pm += tl.sum(tl.where(valid, tl.exp(logp) * (logp - log_m), 0.0), axis=0)
                kl_qm += tl.sum(tl.where(valid, tl.exp(logq) * (logq - log_m), 0.0), axis=0)
            tl.store(div_ptr + row, beta * kl_qm + (1.0 - beta) * kl_pm)
            tl.store(aux_ptr + row, kl_pm)


@triton.jit
def _dlogits_kernel(
    z_ptr, stride_z, u_ptr, stride_u, y_ptr,
    lse_z_ptr, lse_u_ptr, entropy_ptr, div_ptr, aux_ptr, g_logp_ptr, g_ent_ptr, g_div_ptr,
    V, inv_t, beta, log_1m_beta, log_beta,
    HAS_ENT_GRAD: tl.constexpr, DIVERGENCE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    u_row = u_ptr + row * stride_u
    y = tl.load(y_ptr + row)
    lse_z = tl.load(lse_z_ptr + row)
    g_logp = tl.load(g_logp_ptr + row)
    if HAS_ENT_GRAD:
        g_ent = tl.load(g_ent_ptr + row)
        entropy = tl.load(entropy_ptr + row)
    if DIVERGENCE != 0:
        g_div = tl.load(g_div_ptr + row)
        lse_u = tl.load(lse_u_ptr + row)
    if DIVERGENCE == 1:
        div = tl.load(div_ptr + row)
    if DIVERGENCE == 3:
        kl_pm = tl.load(aux_ptr + row)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        valid = offs < V
        logp = tl.load(z_row + offs, mask=valid, other=0.0).to(tl.float32) * inv_t - lse_z
        p = tl.exp(logp)
        dz = tl.where(offs == y, g_logp, 0.0) - g_logp * p
        if HAS_ENT_GRAD:
            dz -= g_ent * p * (logp + entropy)
        if DIVERGENCE != 0:
            logq = tl.load(u_row + offs, mask=valid, other=0.0).to(tl.float32) * inv_t - lse_u
            if DIVERGENCE == 1:
                dz += g_div * p * (logp - logq - div)
            if DIVERGENCE == 2:
                dz += g_div * (p - tl.exp(logq))
            if DIVERGENCE == 3:
                lo = logp + log_1m_beta
                hi = logq + log_beta
                top = tl.maximum(lo, hi)
                log_m = top + tl.log(tl.exp(lo - top) + tl.exp(hi - top))
                dz += g_div * (1.0 - beta) * p * (logp - log_m - kl_pm)
        tl.store(z_row + offs, (dz * inv_t).to(z_ptr.dtype.element_ty), mask=valid)


def _block_v(vocab: int) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return min(triton.next_power_of_2(vocab), 1 << 16)
    return min(triton.next_power_of_2(vocab), 4096)


def _log_betas(beta: float) -> tuple[float, float]:
    import math

    if 0.0 < beta < 1.0:
        return math.log1p(-beta), math.log(beta)
    return 0.0, 0.0


class TritonEngine:
    """The ``engines.Engine`` of ``impl="triton"`` (as ``engines.torch.TorchEngine``); the backward writes
    dL/dz over the logits."""

    name = "triton"

    def forward(self, z: torch.Tensor, u: torch.Tensor | None, targets: torch.Tensor, spec: ChunkSpec,
                workspace: Workspace | None = None):
        rows, vocab = z.shape
        z = z.contiguous()
        f32 = dict(dtype=torch.float32, device=z.device)
        lse_z, logp, entropy = (torch.empty(rows, **f32) for _ in range(3))
        has_teacher = u is not None
        if has_teacher:
            u = u.contiguous()
            lse_u, teacher_logp, div, aux = (torch.empty(rows, **f32) for _ in range(4))
        else:
            lse_u = teacher_logp = div = aux = lse_z  # never written when HAS_TEACHER is off
        code = DIVERGENCE_CODE[spec.divergence] if has_teacher else 0
        log_1m_beta, log_beta = _log_betas(spec.beta)
        targets = targets.contiguous()
        if rows:
            _row_stats_kernel[(rows,)](
                z, z.stride(0), u if has_teacher else z, (u if has_teacher else z).stride(0), targets,
                lse_z, lse_u, logp, teacher_logp, entropy, div, aux,
                vocab, spec.inv_temperature, spec.beta, log_1m_beta, log_beta,
                HAS_TEACHER=has_teacher, DIVERGENCE=code, BLOCK_V=_block_v(vocab),
            )
        stats = {"logp": logp}
        if spec.need_entropy:
            stats["entropy"] = entropy
        if has_teacher and spec.need_teacher_logp:
            stats["teacher_logp"] = teacher_logp
        if code:
            stats["divergence"] = div
        cache = dict(z=z, u=u, targets=targets, lse_z=lse_z, lse_u=lse_u, entropy=entropy, div=div, aux=aux,
                     code=code)
        return stats, cache

    def backward(self, cache: dict, g_logp, g_ent, g_div, spec: ChunkSpec) -> torch.Tensor:
        z, u = cache["z"], cache["u"]
        rows, vocab = z.shape
        code = cache["code"] if g_div is not None else 0
        log_1m_beta, log_beta = _log_betas(spec.beta)
        g_logp = g_logp.float().contiguous()
        if rows:
            _dlogits_kernel[(rows,)](
                z, z.stride(0), u if u is not None else z, (u if u is not None else z).stride(0), cache["targets"],
                cache["lse_z"], cache["lse_u"], cache["entropy"], cache["div"], cache["aux"],
                g_logp, g_logp if g_ent is None else g_ent.float().contiguous(),
                g_logp if g_div is None else g_div.float().contiguous(),
                vocab, spec.inv_temperature, spec.beta, log_1m_beta, log_beta,
                HAS_ENT_GRAD=g_ent is not None, DIVERGENCE=code, BLOCK_V=_block_v(vocab),
            )
        return z
