"""An independent float64 oracle for ``vold.kernels``, written from the formulas.

Nothing here imports ``vold``: every function materialises the full ``[N, V]`` logits in float64,
takes ``log_softmax`` over the whole vocabulary and lets torch autograd produce the gradients. It is
meant to be slow and obviously right, and to be read next to the docstrings of ``vold.kernels``.

Call these functions with float64 leaf tensors (``leaf64`` below) and differentiate the results
with autograd to get the reference gradients. Inputs of any float dtype are upcast to float64 with
a differentiable cast, so an fp32 leaf works too (its gradient then comes back rounded to fp32).

Conventions (the same as the docstrings of ``vold.kernels``):

- ``p = softmax((h_s W_s^T + b_s) / T)`` is the student, ``q`` likewise the teacher;
- reverse KL = KL(p || q), forward KL = KL(q || p);
- generalised JSD (Liger-Kernel's): ``m = beta q + (1 - beta) p``,
  ``JSD = beta KL(q || m) + (1 - beta) KL(p || m)``, and by convention beta = 0 is forward KL(q || p)
  and beta = 1 is reverse KL(p || q) (the formula itself would give 0 at both ends);
- KL estimators of KL(pi || other) from a token sampled from pi, x = logp - other_logp:
  k1 = x, k2 = x^2 / 2, k3 = exp(-x) - 1 + x.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def leaf64(x: torch.Tensor | None, requires_grad: bool = True) -> torch.Tensor | None:
    """A detached float64 copy of ``x`` (a leaf that records gradients when ``requires_grad``)."""
    if x is None:
        return None
    y = x.detach().to(torch.float64).clone()
    return y.requires_grad_(requires_grad and y.is_floating_point())


def full_log_softmax(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """``log_softmax((hidden @ weight[:K]^T + bias[:K]) / temperature)`` in float64, shape ``[..., K]``."""
    k = weight.shape[0] if vocab_size is None else vocab_size
    logits = hidden.to(torch.float64) @ weight.to(torch.float64)[:k].T
    if bias is not None:
        logits = logits + bias.to(torch.float64)[:k]
    return torch.log_softmax(logits / temperature, dim=-1)


def kl_from_log_probs(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_j a_j (log a_j - log b_j) over the last dim."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def divergence_from_log_probs(logp: torch.Tensor, logq: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """Per-row divergence between student log-probs ``logp`` and teacher log-probs ``logq``."""
    if divergence == "reverse_kl":
        return kl_from_log_probs(logp, logq)
    if divergence == "forward_kl":
        return kl_from_log_probs(logq, logp)
    if divergence == "jsd":
        if beta == 0.0:
            return kl_from_log_probs(logq, logp)
        if beta == 1.0:
            return kl_from_log_probs(logp, logq)
        m = beta * logq.exp() + (1.0 - beta) * logp.exp()
        log_m = m.log()
        return beta * kl_from_log_probs(logq, log_m) + (1.0 - beta) * kl_from_log_probs(logp, log_m)
    raise ValueError(f"unknown divergence {divergence!r}")


def kl_estimator(logp: torch.Tensor, other_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Schulman's sampled-token estimators of KL(pi || other)."""
    x = logp.to(torch.float64) - other_logp.to(torch.float64)
    if estimator == "k1":
        return x
    if estimator == "k2":
        return x * x / 2.0
    if estimator == "k3":
        return torch.exp(-x) - 1.0 + x
    raise ValueError(f"unknown estimator {estimator!r}")


def ref_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(target), entropy)``, both shaped like ``targets``, float64."""
    logp_all = full_log_softmax(hidden, weight, bias, temperature, vocab_size)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def ref_divergence(
    s_hidden: torch.Tensor,
    s_weight: torch.Tensor,
    t_hidden: torch.Tensor,
    t_weight: torch.Tensor,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    s_bias: torch.Tensor | None = None,
    t_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Exact per-token divergence between student and teacher heads over the whole vocabulary."""
    if vocab_size is None and s_weight.shape[0] != t_weight.shape[0]:
        raise ValueError("student and teacher vocabularies differ; pass vocab_size")
    logp = full_log_softmax(s_hidden, s_weight, s_bias, temperature, vocab_size)
    logq = full_log_softmax(t_hidden, t_weight, t_bias, temperature, vocab_size)
    return divergence_from_log_probs(logp, logq, divergence, beta)


def _sequences(num_tokens: int, num_seqs: int, cu_seqlens: torch.Tensor | None, seq_len: int) -> list[range]:
    """Token index ranges of each sequence in the flattened token order."""
    if cu_seqlens is None:
        return [range(i * seq_len, (i + 1) * seq_len) for i in range(num_seqs)]
    cu = [int(c) for c in cu_seqlens.tolist()]
    assert cu[0] == 0 and cu[-1] == num_tokens
    return [range(cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def _per_sequence_to_tokens(values: list[torch.Tensor], seqs: list[range]) -> torch.Tensor:
    """Concatenate one scalar per sequence, repeated over that sequence's tokens."""
    pieces = [v.reshape(1).expand(len(s)) for v, s in zip(values, seqs, strict=True)]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float64)


def _to_tokens(name: str, value: torch.Tensor | None, seqs: list[range], token_shape: tuple) -> torch.Tensor | None:
    """A per-sequence ``[B]`` or per-token tensor, as float64 ``[N]`` over tokens."""
    if value is None:
        return None
    value = value.to(torch.float64)
    if tuple(value.shape) == (len(seqs),):
        return _per_sequence_to_tokens([value[i] for i in range(len(seqs))], seqs)
    if tuple(value.shape) == tuple(token_shape):
        return value.reshape(-1)
    raise ValueError(f"{name} has shape {tuple(value.shape)}")


def ref_vold_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    distill_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.3,
    clip_ratio_c: float | None = None,
    importance_sampling_level: str = "token",
    ref_kl_coef: float = 0.0,
    ref_kl_estimator: str = "k3",
    distill_coef: float = 0.1,
    distill_estimator: str = "full",
    divergence: str = "reverse_kl",
    jsd_beta: float = 0.5,
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    max_completion_length: int | None = None,
    token_normalizer: float | None = None,
    vocab_size: int | None = None,
    impl: str | None = None,  # accepted (and ignored) so that tests can pass vold_loss's kwargs unchanged
    chunk_size: int | None = None,
    check_finite: bool | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The VOLD objective in float64 from full logits. Returns ``(loss, metrics)``.

    Per token t of sequence i (m_t = mask, L_i = sum of m over sequence i, B = number of sequences)::

        r_t  = exp(logp_t - old_t)                                       (token level)
             = exp(sum_{s in i} m_s (logp_s - old_s) / max(L_i, 1))       (sequence level, all t in i)
        pg_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t);  dual clip: A_t < 0 -> min(pg_t, -c A_t)
        l_t  = pg_t + ref_kl_coef k(logp_t, ref_t) + distill_coef w_t D_t - entropy_coef H_t
        loss = sum_t n_t l_t

    with n_t = m_t / (B max(L_i, 1)) [grpo],
    m_t / (B max_completion_length) [dr_grpo], m_t / token_normalizer or m_t / max(sum m, 1) [bnpo, dapo].
    """
    del impl, chunk_size, check_finite
    f64 = torch.float64
    if cu_seqlens is None:
        num_seqs, seq_len = student_hidden.shape[:2]
        token_shape = tuple(student_hidden.shape[:2])
        if max_completion_length is None:
            max_completion_length = seq_len
    else:
        num_seqs, seq_len = cu_seqlens.numel() - 1, 0
        token_shape = tuple(student_hidden.shape[:1])
    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    n_tokens = h.shape[0]
    seqs = _sequences(n_tokens, num_seqs, cu_seqlens, seq_len)
    y = targets.reshape(-1).long()
    m = torch.ones(n_tokens, dtype=f64) if mask is None else mask.reshape(-1).to(f64)
    adv = _to_tokens("advantages", advantages, seqs, token_shape)
    w_distill = _to_tokens("distill_mask", distill_mask, seqs, token_shape)

    # Student: full log-softmax over the (restricted) vocabulary.
    logp_all = full_log_softmax(h, student_weight, student_bias, temperature, vocab_size)
    logp = logp_all.gather(1, y[:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(1)

    # Teacher head (frozen).
    has_teacher = teacher_hidden is not None and teacher_weight is not None
    logq_all = None
    if has_teacher:
        if vocab_size is None and teacher_weight.shape[0] != student_weight.shape[0]:
            raise ValueError("student and teacher vocabularies differ; pass vocab_size")
        t_h = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
        t_b = None if teacher_bias is None else teacher_bias.detach()
        logq_all = full_log_softmax(t_h, teacher_weight.detach(), t_b, temperature, vocab_size)

    # Importance ratio.
    old = logp.detach() if old_logprobs is None else old_logprobs.reshape(-1).to(f64)
    log_ratio = logp - old
    if importance_sampling_level == "token":
        pass
    elif importance_sampling_level == "sequence":
        means = []
        for s in seqs:
            idx = slice(s.start, s.stop)
            length = m[idx].sum()
            means.append((m[idx] * log_ratio[idx]).sum() / torch.clamp(length, min=1.0))
        log_ratio = _per_sequence_to_tokens(means, seqs)
    else:
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}")
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    pg = -torch.min(ratio * adv, clipped * adv)
    if clip_ratio_c is not None:
        pg = torch.where(adv < 0, torch.min(pg, -clip_ratio_c * adv), pg)

    per_token = pg
    metrics_tokens: dict[str, torch.Tensor] = {"entropy": entropy, "ratio": ratio}
    metrics_tokens["clip_low"] = ((ratio < 1.0 - epsilon_low) & (adv < 0)).to(f64)
    metrics_tokens["clip_high"] = ((ratio > 1.0 + epsilon_high) & (adv > 0)).to(f64)

    # Reference-model KL.
    if ref_logprobs is not None:
        ref_kl = kl_estimator(logp, ref_logprobs.reshape(-1), ref_kl_estimator)
        metrics_tokens["ref_kl"] = ref_kl
        per_token = per_token + ref_kl_coef * ref_kl
    elif ref_kl_coef != 0.0:
        raise ValueError("ref_kl_coef != 0 needs ref_logprobs")

    # Distillation term D_t.
    distill = None
    if distill_estimator == "full":
        if logq_all is not None:
            distill = divergence_from_log_probs(logp_all, logq_all, divergence, jsd_beta)
    else:
        if teacher_logprobs is not None:
            teacher_logp = teacher_logprobs.reshape(-1).to(f64)
        elif logq_all is not None:
            teacher_logp = logq_all.gather(1, y[:, None]).squeeze(1)
        else:
            teacher_logp = None
        if teacher_logp is not None:
            distill = kl_estimator(logp, teacher_logp, distill_estimator)
    if distill is not None:
        metrics_tokens["distill_kl"] = distill
        weighted = distill if w_distill is None else w_distill * distill
        per_token = per_token + distill_coef * weighted
    elif distill_coef != 0.0:
        raise ValueError("distill_coef != 0 needs a teacher")

    per_token = per_token - entropy_coef * entropy

    # Normalisation n_t.
    total_mask = torch.clamp(m.sum(), min=1.0)
    if loss_type == "grpo":
        n = _per_sequence_to_tokens(
            [1.0 / (num_seqs * torch.clamp(m[s.start:s.stop].sum(), min=1.0)) for s in seqs], seqs
        ) * m
    elif loss_type == "dr_grpo":
        n = m / (num_seqs * max_completion_length)
    elif loss_type in ("bnpo", "dapo"):
        n = m / (total_mask if token_normalizer is None else token_normalizer)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")

    loss = (n * per_token).sum()
    metrics = {"loss": loss.detach(), "policy_loss": (n * pg).sum().detach()}
    for key, value in metrics_tokens.items():
        metrics[key] = ((m * value).sum() / total_mask).detach()
    return loss, metrics
