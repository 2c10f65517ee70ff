"""The naive baseline: the VOLD objective written out with full ``[N, V]`` logits and plain autograd.

This is the only second copy of the formula in the repository, kept on purpose: it is what a user
writes without fused kernels, and the point of comparison of ``benchmarks.kernels``. It runs in the
working dtype (fp32 on CPU, bf16 GEMMs + fp32 softmax on GPU), like a training script would.
``tests/reference.py`` (the float64 oracle of the test suite) is not used here: its float64 logits
would make the baseline about twice as slow and twice as large as what a user would run; the pytest
cases in ``benchmarks/test_bench_kernels.py`` check this file against it instead.

Objective (per token t of sequence i, masked tokens m_t = 1)::

    r_t  = exp(logp_t - old_t)
    pg_t = -min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i)
    D_t  = sum_j p_j (log p_j - log q_j)                 (distill_estimator="full", reverse KL)
         = (logp_t - teacher_logp_t)^2 / 2                (distill_estimator="k2")
    loss = sum_t m_t (pg_t + distill_coef D_t) / max(sum_t m_t, 1)     (loss_type "dapo")
"""

from __future__ import annotations

import torch


def naive_vold_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.3,
    distill_coef: float = 0.1,
    distill_estimator: str = "full",
) -> torch.Tensor:
    """GRPO clipped loss + ``distill_coef`` * reverse KL, token mean over the mask ("dapo").

    Shapes: ``student_hidden [B, T, H]``, ``student_weight [V, H]``, ``targets/old_logprobs/mask
    [B, T]``, ``advantages [B]``, ``teacher_hidden [B, T, Ht]``, ``teacher_weight [V, Ht]``,
    ``teacher_logprobs [B, T]`` (for ``"k2"``). Returns the scalar fp32 loss.
    """
    logits = (student_hidden @ student_weight.t()).float()  # [B, T, V]
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(logp - old_logprobs)
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    pg = -torch.min(ratio * adv, ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high) * adv)
    if distill_estimator == "full":
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("distill_estimator='full' needs teacher_hidden and teacher_weight")
        with torch.no_grad():
            logq_all = torch.log_softmax((teacher_hidden @ teacher_weight.t()).float(), dim=-1)
        distill = (logp_all.exp() * (logp_all - logq_all)).sum(-1)
    elif distill_estimator == "k2":
        if teacher_logprobs is None:
            raise ValueError("distill_estimator='k2' needs teacher_logprobs")
        distill = 0.5 * (logp - teacher_logprobs) ** 2
    else:
        raise ValueError(f"distill_estimator={distill_estimator!r} is not 'full' or 'k2'")
    m = mask.float()
    return ((pg + distill_coef * distill) * m).sum() / m.sum().clamp(min=1.0)


@torch.no_grad()
def chunked_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """log softmax(hidden @ weight^T)[target] per row, fp32 ``[N]``, ``chunk`` rows at a time (input making)."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        logits = (hidden[start:start + chunk] @ weight.t()).float()
        picked = logits.gather(1, targets[start:start + chunk, None]).squeeze(1)
        out[start:start + chunk] = picked - torch.logsumexp(logits, dim=-1)
    return out
