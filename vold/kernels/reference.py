"""The float64 oracle of ``vold.kernels``: one full-logits implementation of every public function,
written from the formulas.

This module is part of the library's contract: the tests, ``benchmarks.accuracy`` and the benchmark's
naive row all use it, and it imports only torch (nothing of ``vold``; ``tests/test_layers.py`` checks).
Every function materialises the full ``[N, V]`` logits, takes ``log_softmax`` over the whole vocabulary
and lets torch autograd produce the gradients. It is meant to be slow and obviously right, and to be
read next to the docstrings of ``vold.kernels``.

Call these functions with float64 leaf tensors (``leaf64`` below) and differentiate the results
with autograd to get the reference gradients. Inputs of any float dtype are upcast to float64 with
a differentiable cast, so an fp32 leaf works too (its gradient then comes back rounded to fp32).

``dtype=None`` (``full_log_softmax``, ``ref_logprobs``, ``ref_divergence``, ``ref_vold_loss``) computes in
the working precision a training script without fused kernels would use instead: each GEMM in the inputs'
dtype, its logits upcast to ``promote(float32, dtype)`` and everything after in that dtype. That is the
benchmark's "naive" row (``benchmarks.kernels``: what a user writes, full ``[N, V]`` logits and autograd).

Conventions (the same as the docstrings of ``vold.kernels``):

- ``p = softmax((h_s W_s^T + b_s) / T)`` is the student, ``q`` likewise the teacher;
- reverse KL = KL(p || q), forward KL = KL(q || p);
- generalised JSD (Liger-Kernel's): ``m = beta q + (1 - beta) p``,
  ``JSD = beta KL(q || m) + (1 - beta) KL(p || m)``, and by convention beta = 0 is forward KL(q || p)
  and beta = 1 is reverse KL(p || q) (the formula itself would give 0 at both ends);
- KL estimators of KL(pi || other) from a token sampled from pi, x = logp - other_logp:
  k1 = x, k2 = x^2 / 2, k3 = exp(-x) - 1 + x;
- every exponentiated log-ratio (the importance ratio, token or sequence level, and k3's x) is first
  clamped to [-20, 20] (``LOG_RATIO_CLAMP``, the documented bound of vold.kernels): the value beyond
  the bound is that at the bound and the gradient through a clamped log-ratio is 0.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
LOG_RATIO_CLAMP = 20.0
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def half_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of ``dtype`` at ``|x|``: the largest error of rounding ``x`` to ``dtype`` (subnormals:
    half their constant spacing ``eps * tiny``)."""
    info = torch.finfo(dtype)
    mantissa_bits = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24, torch.float64: 53}[dtype]
    exponent = torch.floor(torch.log2(x.detach().double().abs().clamp(min=info.tiny)))
    return torch.pow(2.0, exponent - mantissa_bits).clamp(min=info.eps * info.tiny / 2)


def leaf64(x: torch.Tensor | None, requires_grad: bool = True) -> torch.Tensor | None:
    """A detached float64 copy of ``x`` (a leaf that records gradients when ``requires_grad``)."""
    if x is None:
        return None
    y = x.detach().to(torch.float64).clone()
    return y.requires_grad_(requires_grad and y.is_floating_point())


def working_dtype(weight: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of the logits and statistics: ``dtype``, or for None ``promote(float32, weight.dtype)``."""
    return torch.promote_types(torch.float32, weight.dtype) if dtype is None else dtype


def full_log_softmax(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    dtype: torch.dtype | None = torch.float64,
) -> torch.Tensor:
    """``log_softmax(f(hidden @ weight[:K]^T + bias[:K]) / temperature)`` in float64, shape ``[..., K]``,
    with ``f(z) = c tanh(s z / c)`` (``s = logit_scale``, ``c = final_logit_softcapping``; ``s z`` if c is None).
    ``dtype``: the inputs are cast to it before the GEMM; None: the GEMM runs in the inputs' dtype and the
    logits are upcast after it (``working_dtype``). A scale of 1 and a temperature of 1 are skipped (exact)."""
    k = weight.shape[0] if vocab_size is None else vocab_size
    if dtype is None:
        dt = working_dtype(weight, None)
        logits = (hidden @ weight[:k].T).to(dt)
    else:
        dt = dtype
        logits = hidden.to(dt) @ weight.to(dt)[:k].T
    if bias is not None:
        logits = logits + bias.to(dt)[:k]
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if final_logit_softcapping is not None:
        logits = final_logit_softcapping * torch.tanh(logits / final_logit_softcapping)
    return torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)


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


def kl_estimator(
    logp: torch.Tensor, other_logp: torch.Tensor, estimator: str, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Schulman's sampled-token estimators of KL(pi || other) in ``dtype``; k3 at the clamped log-ratio."""
    x = logp.to(dtype) - other_logp.to(dtype)
    if estimator == "k1":
        return x
    if estimator == "k2":
        return x * x / 2.0
    if estimator == "k3":
        x = torch.clamp(x, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return torch.exp(-x) - 1.0 + x
    raise ValueError(f"unknown estimator {estimator!r}")


def ref_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    dtype: torch.dtype | None = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(target), entropy)``, both shaped like ``targets``, float64 (``dtype``)."""
    logp_all = full_log_softmax(hidden, weight, bias, temperature, vocab_size, logit_scale, final_logit_softcapping,
                                dtype)
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
    student_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_final_logit_softcapping: float | None = None,
    dtype: torch.dtype | None = torch.float64,
) -> torch.Tensor:
    """Exact per-token divergence between student and teacher heads over the whole vocabulary (``dtype``)."""
    if vocab_size is None and s_weight.shape[0] != t_weight.shape[0]:
        raise ValueError("student and teacher vocabularies differ; pass vocab_size")
    dt = torch.promote_types(working_dtype(s_weight, dtype), working_dtype(t_weight, dtype))
    logp = full_log_softmax(s_hidden, s_weight, s_bias, temperature, vocab_size, student_logit_scale,
                            student_final_logit_softcapping, dtype).to(dt)
    logq = full_log_softmax(t_hidden, t_weight, t_bias, temperature, vocab_size, teacher_logit_scale,
                            teacher_final_logit_softcapping, dtype).to(dt)
    return divergence_from_log_probs(logp, logq, divergence, beta)


def _sequences(num_tokens: int, num_seqs: int, cu_seqlens: torch.Tensor | None, seq_len: int) -> list[range]:
    """Token index ranges of each sequence in the flattened token order."""
    if cu_seqlens is None:
        return [range(i * seq_len, (i + 1) * seq_len) for i in range(num_seqs)]
    cu = [int(c) for c in cu_seqlens.tolist()]
    assert cu[0] == 0 and cu[-1] == num_tokens
    return [range(cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def _per_sequence_to_tokens(values: list[torch.Tensor], seqs: list[range],
                            dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Concatenate one scalar per sequence, repeated over that sequence's tokens."""
    pieces = [v.reshape(1).expand(len(s)) for v, s in zip(values, seqs, strict=True)]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=dtype)


def _to_tokens(name: str, value: torch.Tensor | None, seqs: list[range], token_shape: tuple,
               dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
    """A per-sequence ``[B]`` or per-token tensor, as ``[N]`` over tokens in ``dtype``."""
    if value is None:
        return None
    value = value.to(dtype)
    if tuple(value.shape) == (len(seqs),):
        return _per_sequence_to_tokens([value[i] for i in range(len(seqs))], seqs, dtype)
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
    student_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_final_logit_softcapping: float | None = None,
    dtype: torch.dtype | None = torch.float64,
    metrics: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The VOLD objective in float64 (``dtype``; None: the working precision, see the module docstring) from
    full logits. Returns ``(loss, metrics)``; ``metrics=False``: ``(loss, {})``, and the entropy (a pass over
    ``[N, V]``) is computed only when ``entropy_coef != 0`` (the benchmark's naive row: the loss alone). The
    entropy is differentiated only when ``entropy_coef != 0`` (its term is otherwise exactly 0: no graph of
    two more ``[N, V]`` tensors is kept for it).

    Per token t of sequence i (m_t = mask, L_i = sum of m over sequence i, B = number of sequences)::

        r_t  = exp(clamp(x_t, -20, 20)), x_t = logp_t - old_t                    (token level)
             x_t = sum_{s in i} m_s (logp_s - old_s) / max(L_i, 1)               (sequence level, all t in i)
        pg_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t);  dual clip: A_t < 0 -> min(pg_t, -c A_t)
        l_t  = pg_t + ref_kl_coef k(logp_t, ref_t) + distill_coef w_t D_t - entropy_coef H_t
        loss = sum_t n_t l_t

    with n_t = m_t / (B max(L_i, 1)) [grpo],
    m_t / (B max_completion_length) [dr_grpo], m_t / token_normalizer or m_t / max(sum m, 1) [bnpo, dapo].
    """
    del impl, chunk_size, check_finite
    dt = working_dtype(student_weight, dtype)
    if teacher_weight is not None:
        dt = torch.promote_types(dt, working_dtype(teacher_weight, dtype))
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
    m = torch.ones(n_tokens, dtype=dt, device=h.device) if mask is None else mask.reshape(-1).to(dt)
    adv = _to_tokens("advantages", advantages, seqs, token_shape, dt)
    w_distill = _to_tokens("distill_mask", distill_mask, seqs, token_shape, dt)

    # Student: full log-softmax over the (restricted) vocabulary.
    logp_all = full_log_softmax(h, student_weight, student_bias, temperature, vocab_size, student_logit_scale,
                                student_final_logit_softcapping, dtype).to(dt)
    logp = logp_all.gather(1, y[:, None]).squeeze(1)
    entropy = torch.zeros_like(logp)
    if metrics or entropy_coef != 0.0:
        with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_coef != 0.0):
            entropy = -(logp_all.exp() * logp_all).sum(1)

    # Teacher head (frozen).
    has_teacher = teacher_hidden is not None and teacher_weight is not None
    logq_all = None
    if has_teacher:
        if vocab_size is None and teacher_weight.shape[0] != student_weight.shape[0]:
            raise ValueError("student and teacher vocabularies differ; pass vocab_size")
        t_h = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
        t_b = None if teacher_bias is None else teacher_bias.detach()
        logq_all = full_log_softmax(t_h, teacher_weight.detach(), t_b, temperature, vocab_size, teacher_logit_scale,
                                    teacher_final_logit_softcapping, dtype).to(dt)

    # Importance ratio.
    old = logp.detach() if old_logprobs is None else old_logprobs.reshape(-1).to(dt)
    log_ratio = logp - old
    if importance_sampling_level == "token":
        pass
    elif importance_sampling_level == "sequence":
        means = []
        for s in seqs:
            idx = slice(s.start, s.stop)
            length = m[idx].sum()
            means.append((m[idx] * log_ratio[idx]).sum() / torch.clamp(length, min=1.0))
        log_ratio = _per_sequence_to_tokens(means, seqs, dt)
    else:
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}")
    ratio_clamped = (log_ratio.detach().abs() > LOG_RATIO_CLAMP).to(dt)
    ratio = torch.exp(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    pg = -torch.min(ratio * adv, clipped * adv)
    if clip_ratio_c is not None:
        pg = torch.where(adv < 0, torch.min(pg, -clip_ratio_c * adv), pg)

    per_token = pg
    metrics_tokens: dict[str, torch.Tensor] = {"entropy": entropy, "ratio": ratio, "ratio_clamp_frac": ratio_clamped}
    metrics_tokens["clip_low"] = ((ratio < 1.0 - epsilon_low) & (adv < 0)).to(dt)
    metrics_tokens["clip_high"] = ((ratio > 1.0 + epsilon_high) & (adv > 0)).to(dt)

    # Reference-model KL.
    if ref_logprobs is not None:
        ref_kl = kl_estimator(logp, ref_logprobs.reshape(-1), ref_kl_estimator, dt)
        metrics_tokens["ref_kl"] = ref_kl
        x = (logp - ref_logprobs.reshape(-1).to(dt)).detach()
        metrics_tokens["ref_kl_clamp_frac"] = ((x.abs() > LOG_RATIO_CLAMP) & (ref_kl_estimator == "k3")).to(dt)
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
            teacher_logp = teacher_logprobs.reshape(-1).to(dt)
        elif logq_all is not None:
            teacher_logp = logq_all.gather(1, y[:, None]).squeeze(1)
        else:
            teacher_logp = None
        if teacher_logp is not None:
            distill = kl_estimator(logp, teacher_logp, distill_estimator, dt)
            x = (logp - teacher_logp).detach()
            metrics_tokens["distill_clamp_frac"] = ((x.abs() > LOG_RATIO_CLAMP) & (distill_estimator == "k3")).to(dt)
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
            [1.0 / (num_seqs * torch.clamp(m[s.start:s.stop].sum(), min=1.0)) for s in seqs], seqs, dt
        ) * m
    elif loss_type == "dr_grpo":
        n = m / (num_seqs * max_completion_length)
    elif loss_type in ("bnpo", "dapo"):
        n = m / (total_mask if token_normalizer is None else token_normalizer)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")

    loss = (n * per_token).sum()
    if not metrics:
        return loss, {}
    out = {"loss": loss.detach(), "policy_loss": (n * pg).sum().detach()}
    for key, value in metrics_tokens.items():
        out[key] = ((m * value).sum() / total_mask).detach()
    return loss, out
