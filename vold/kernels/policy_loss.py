"""The per-token math of the VOLD objective, on ``[chunk]`` vectors (never on logits).

Both engines (chunked PyTorch and Triton) reduce each chunk of ``[chunk, V]`` logits to per-token
statistics: the student's log-prob of the sampled token ``logp``, its entropy ``H`` and the
full-vocabulary divergence ``D`` to the teacher. Everything else is a function of those vectors and
lives here, written once. Its derivatives ``dL/dlogp, dL/dH, dL/dD`` come from autograd on the
vectors (cheap: ``[chunk]`` elements); the engines turn them into logit gradients.

Per-token objective (sums run over completion tokens t of sequence i, weight ``m_t`` = mask)::

    r_t      = exp(clamp(logp_t - old_t, -B, B))                 (token level)
             = exp(clamp(mean_{t in i}(logp_t - old_t), -B, B))   (sequence level, GSPO), broadcast to tokens
    pg_t     = -min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i)
               and, with dual-clip c > 1, for A_i < 0: min(pg_t, -c A_i)
    l_t      = pg_t + ref_kl_coef * k(logp_t, ref_t) + distill_coef * w^d_t * D_t - entropy_coef * H_t
    D_t      = exact D(student || teacher) over the vocabulary ("full"), or k(logp_t, teacher_t)
    loss     = sum_t n_t * l_t with the loss_type normalisation n_t (see ``normalization_weights``)

KL estimators of KL(pi || other) from a token sampled from pi, with ``x = logp - other_logp``:
k1 = x, k2 = x^2 / 2, k3 = exp(-x) - 1 + x (Schulman's estimators).

Overflow: every exponentiated log-ratio (the importance ratio, token and sequence level, and k3 for
the reference KL and the distillation term) is clamped first, ``x -> clamp(x, -B, B)`` with
``B = LOG_RATIO_CLAMP = 20`` (e^20 ~ 4.85e8; verl clamps its ratio's log-ratio at the same bound).
The clamped expression is what is differentiated: where ``|x| > B`` the value is that at ``x = +-B``
and the gradient through ``x`` is exactly 0 (``torch.clamp``'s); where ``|x| <= B`` the value and
the gradient are the exact ones. So values and gradients stay finite (``e^B`` times any finite
advantage or coefficient fits fp32 easily), and a ratio beyond e^20 is far outside any PPO clip
range: the clipped branch (gradient 0) is the one selected unless A < 0 without dual clip. The
fractions of clamped tokens are reported as ``ratio_clamp_frac``, ``ref_kl_clamp_frac`` and
``distill_clamp_frac``. k1 and k2 exponentiate nothing and are never clamped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_number, check_positive

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IS_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
DISTILL_ESTIMATORS = ("full", *KL_ESTIMATORS)
METRIC_NAMES = ("loss", "policy_loss", "distill_kl", "entropy", "ref_kl", "ratio", "clip_low", "clip_high",
                "ratio_clamp_frac", "ref_kl_clamp_frac", "distill_clamp_frac")
# Bound on |log-ratio| before any exponentiation (importance ratio, k3): e^20 ~ 4.85e8 (verl's bound for its
# ratio's log). A ratio beyond e^+-20 is far outside every PPO clip range.
LOG_RATIO_CLAMP = 20.0


def clamp_log_ratio(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clamp(x, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), |x| > LOG_RATIO_CLAMP)``; the gradient through a
    clamped element is exactly 0."""
    return x.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), x.detach().abs() > LOG_RATIO_CLAMP


def kl_estimate_clamped(
    logp: torch.Tensor, other_logp: torch.Tensor, estimator: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(kl_estimate(...), clamped [N] bool or None)``: k3 is evaluated at the clamped log-ratio."""
    x = logp - other_logp
    if estimator == "k1":
        return x, None
    if estimator == "k2":
        return 0.5 * x * x, None
    if estimator == "k3":
        xc, clamped = clamp_log_ratio(x)
        return torch.expm1(-xc) + xc, clamped
    raise ValueError(f"estimator={estimator!r} is not one of {KL_ESTIMATORS}")


def kl_estimate(logp: torch.Tensor, other_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || other) from tokens sampled from pi (Schulman, "Approximating KL
    divergence", 2020), with ``x = logp - other_logp``:

    - ``"k1"``: ``x``;  ``"k2"``: ``x^2 / 2``;
    - ``"k3"``: ``e^{-x'} - 1 + x'`` with ``x' = clamp(x, -20, 20)`` (``LOG_RATIO_CLAMP``): exact for
      ``|x| <= 20``, the value at the bound (gradient 0) beyond it, so never inf/NaN.

    Shapes: any, broadcast; returns the promoted float dtype. Raises ``ValueError`` for another estimator.
    """
    return kl_estimate_clamped(logp, other_logp, estimator)[0]


@dataclass(frozen=True)
class PolicyLossConfig:
    """Options of the VOLD objective (see ``vold_loss`` for their meaning)."""

    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.3
    clip_ratio_c: float | None = None
    importance_sampling_level: str = "token"
    ref_kl_coef: float = 0.0
    ref_kl_estimator: str = "k3"
    distill_coef: float = 0.1  # vold_loss's default (one source: the trainer reads it from vold_loss)
    distill_estimator: str = "full"
    entropy_coef: float = 0.0


def normalization_weights(
    mask: torch.Tensor,
    seq_index: torch.Tensor,
    num_seqs: int,
    loss_type: str,
    *,
    max_completion_length: int | None,
    token_normalizer: float | None,
) -> torch.Tensor:
    """Per-token weights ``n_t`` so that ``loss = sum_t n_t * l_t`` reproduces TRL's GRPOTrainer.

    ``mask [N]`` (0/1 or weights), ``seq_index [N]`` in ``[0, num_seqs)``. With L_i = sum of mask in
    sequence i and B = num_seqs:

    - grpo:    n_t = m_t / (B * max(L_i, 1))          mean over tokens, then over sequences
    - bnpo:    n_t = m_t / max(sum_t m_t, 1)          mean over all tokens of this batch, or
               n_t = m_t / token_normalizer           when given: the token count of the whole batch that
                                                      this micro-batch is a part of (exact accumulation)
    - dr_grpo: n_t = m_t / (B * max_completion_length)  constant denominator (Dr. GRPO)
    - dapo:    n_t = m_t / token_normalizer           global token count (default: this batch's)
    """
    mask = mask if mask.is_floating_point() else mask.float()
    if loss_type == "grpo":
        lengths = torch.zeros(num_seqs, dtype=mask.dtype, device=mask.device).index_add_(0, seq_index, mask)
        return mask / (num_seqs * lengths.clamp(min=1.0)[seq_index])
    if loss_type in ("bnpo", "dapo") and token_normalizer is None:
        return mask / mask.sum().clamp(min=1.0)
    if loss_type in ("bnpo", "dapo"):
        return mask / check_positive("token_normalizer", token_normalizer)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length > 0 (the padded length T by default)")
        length = check_number("max_completion_length", max_completion_length, gt=0,
                              note=" for loss_type='dr_grpo' (the padded length T by default)")
        return mask / (num_seqs * length)
    raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}")


def policy_gradient_loss(
    cfg: PolicyLossConfig,
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    mask: torch.Tensor,
    seq_index: torch.Tensor | None = None,
    num_seqs: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate per token. Returns ``(pg [N], ratio [N], clipped_low [N], clipped_high [N], clamped [N])``.

Token level works on any subset of tokens; sequence level needs every token of each sequence
    (``seq_index``/``num_seqs`` given) since r_i = exp(mean over the sequence of logp - old). The
    log-ratio (the sequence mean at sequence level) is clamped to +-LOG_RATIO_CLAMP before ``exp``;
    ``clamped [N]`` marks the tokens where that happened.
    """
    log_ratio = logp - (logp.detach() if old_logp is None else old_logp)
    if cfg.importance_sampling_level == "sequence":
        m = mask
        sums = torch.zeros(num_seqs, dtype=log_ratio.dtype, device=logp.device).index_add(0, seq_index, log_ratio * m)
        lengths = torch.zeros(num_seqs, dtype=m.dtype, device=m.device).index_add_(0, seq_index, m)
        log_ratio = (sums / lengths.clamp(min=1.0))[seq_index]
    log_ratio, clamped = clamp_log_ratio(log_ratio)
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)
    pg = -torch.min(ratio * advantages, clipped * advantages)
    if cfg.clip_ratio_c is not None:
        pg = torch.where(advantages < 0, torch.min(pg, -cfg.clip_ratio_c * advantages), pg)
    clip_low = (ratio < 1.0 - cfg.epsilon_low) & (advantages < 0)
    clip_high = (ratio > 1.0 + cfg.epsilon_high) & (advantages > 0)
    return pg, ratio.detach(), clip_low, clip_high, clamped


@dataclass
class TokenInputs:
    """Per-token inputs of one chunk (or of all tokens), already restricted to active tokens."""

    norm: torch.Tensor  # n_t, loss_type normalisation times mask
    mask: torch.Tensor  # m_t, for metric means
    advantages: torch.Tensor
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    teacher_logp: torch.Tensor | None = None  # sampled-token estimators: given, or from the teacher's head
    distill_weight: torch.Tensor | None = None  # w^d_t, e.g. 1 - reward per sequence
    seq_index: torch.Tensor | None = None
    num_seqs: int = 0

    def slice(self, start: int, end: int) -> TokenInputs:
        def cut(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[start:end]

        return TokenInputs(
            norm=self.norm[start:end],
            mask=self.mask[start:end],
            advantages=self.advantages[start:end],
            old_logp=cut(self.old_logp),
            ref_logp=cut(self.ref_logp),
            teacher_logp=cut(self.teacher_logp),
            distill_weight=cut(self.distill_weight),
        )


def _leaf(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach().requires_grad_(True)


def token_objective(
    cfg: PolicyLossConfig,
    inputs: TokenInputs,
    logp: torch.Tensor,
    entropy: torch.Tensor | None,
    divergence: torch.Tensor | None,
    *,
    include_policy: bool = True,
    include_local: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, dict[str, torch.Tensor]]:
    """Loss of these tokens and its derivatives w.r.t. ``logp``, ``entropy`` and ``divergence``.

    Returns ``(loss, dL/dlogp, dL/dH or None, dL/dD or None, sums)`` where ``sums`` holds masked sums
    of each metric (divided by the mask total once all chunks are done). No host synchronisation.
    ``include_policy``/``include_local`` select the clipped policy term and the per-token rest (KL
    terms, entropy): sequence-level importance sampling evaluates the first on all tokens at once.
    """
    with torch.enable_grad():
        logp_leaf, ent_leaf, div_leaf = _leaf(logp), _leaf(entropy), _leaf(divergence)
        m = inputs.mask
        per_token = torch.zeros_like(logp_leaf)
        sums: dict[str, torch.Tensor] = {}
        if include_policy:
            pg, ratio, low, high, clamped = policy_gradient_loss(
                cfg, logp_leaf, inputs.old_logp, inputs.advantages, mask=m,
                seq_index=inputs.seq_index, num_seqs=inputs.num_seqs,
            )
            per_token = per_token + pg
            sums["policy_loss"] = (inputs.norm * pg).sum().detach()
            sums["ratio"] = (m * ratio).sum()
            sums["clip_low"] = (m * low).sum()
            sums["clip_high"] = (m * high).sum()
            sums["ratio_clamp_frac"] = (m * clamped).sum()
        if include_local and cfg.ref_kl_coef != 0.0 and inputs.ref_logp is not None:
            ref_kl, clamped = kl_estimate_clamped(logp_leaf, inputs.ref_logp, cfg.ref_kl_estimator)
            per_token = per_token + cfg.ref_kl_coef * ref_kl
            sums["ref_kl"] = (m * ref_kl).sum().detach()
            sums["ref_kl_clamp_frac"] = (m * clamped).sum() if clamped is not None else m.new_zeros(())
        distill = None
        if not include_local:
            pass
        elif cfg.distill_estimator == "full":
            distill = div_leaf
        elif inputs.teacher_logp is not None:
            distill, clamped = kl_estimate_clamped(logp_leaf, inputs.teacher_logp, cfg.distill_estimator)
            sums["distill_clamp_frac"] = (m * clamped).sum() if clamped is not None else m.new_zeros(())
        if distill is not None:
            sums["distill_kl"] = (m * distill).sum().detach()
            if cfg.distill_coef != 0.0:
                weighted = distill if inputs.distill_weight is None else distill * inputs.distill_weight
                per_token = per_token + cfg.distill_coef * weighted
        if include_local and ent_leaf is not None:
            sums["entropy"] = (m * ent_leaf).sum().detach()
            if cfg.entropy_coef != 0.0:
                per_token = per_token - cfg.entropy_coef * ent_leaf
        loss = (inputs.norm * per_token).sum()
        leaves = [x for x in (logp_leaf, ent_leaf, div_leaf) if x is not None]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else [None] * len(leaves)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads, strict=True)]
    g_logp = grads.pop(0)
    g_ent = grads.pop(0) if ent_leaf is not None else None
    g_div = grads.pop(0) if div_leaf is not None else None
    sums["loss"] = loss.detach()
    return loss.detach(), g_logp, g_ent, g_div, sums
