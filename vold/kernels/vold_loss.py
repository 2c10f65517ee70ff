"""``vold_loss``: GRPO + reference KL + teacher distillation in one pass over the vocabulary per chunk.

The student's logits are computed once per chunk and serve the policy ratio, the entropy and the
divergence to the teacher; the loss is a scalar, so its gradients are computed in the forward pass
(Liger-style) and the backward pass only scales them by the incoming gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from . import checks
from .chunked import run_chunks
from .common import (
    ChunkSpec,
    Head,
    LogitTransform,
    cast_grad,
    compute_dtype,
    default_chunk_size,
    resolve_shard,
    vocab_rows,
)
from .divergence import divergence_spec
from .dtensor import gather_head
from .engines import get_engine
from .policy_loss import (
    DISTILL_ESTIMATORS,
    IS_LEVELS,
    KL_ESTIMATORS,
    LOSS_TYPES,
    PolicyLossConfig,
    TokenInputs,
    normalization_weights,
    token_objective,
)


@dataclass
class _Call:
    """Everything non-differentiable one call of the autograd function needs."""

    inputs: TokenInputs
    cfg: PolicyLossConfig
    spec: ChunkSpec
    ops: object
    chunk_size: int
    metric_names: tuple[str, ...] = ()
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    student_transform: LogitTransform = LogitTransform()
    teacher_transform: LogitTransform = LogitTransform()


class VoldLossFunction(torch.autograd.Function):
    """Scalar loss; gradients for the student's hidden states, weight and bias made in forward."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, targets, call: _Call):
        cfg, inputs = call.cfg, call.inputs
        student = Head(s_hidden, s_weight, s_bias, call.student_transform)
        teacher = None if t_hidden is None else Head(t_hidden, t_weight, t_bias, call.teacher_transform)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        sequence_level = cfg.importance_sampling_level == "sequence"
        total = torch.zeros((), dtype=call.inputs.norm.dtype, device=s_hidden.device)
        sums: dict[str, torch.Tensor] = {}

        def add(parts: dict[str, torch.Tensor]) -> None:
            for key, value in parts.items():
                sums[key] = sums[key] + value if key in sums else value

        g_policy = None
        if sequence_level:
            # The sequence ratio couples all tokens of a sequence: a forward-only pre-pass gives every
            # token's logp, then the clipped term and its per-token derivative are evaluated at once.
            logp_spec = replace(call.spec, need_entropy=False, divergence=None, need_teacher_logp=False)
            logp_all = run_chunks(student, None, targets, logp_spec, call.ops, call.chunk_size,
                                  keep=("logp",)).stats["logp"]
            loss_pg, g_policy, _, _, parts = token_objective(cfg, inputs, logp_all, None, None, include_local=False)
            total = total + loss_pg
            parts.pop("loss")
            add(parts)

        def objective(start: int, end: int, stats: dict):
            nonlocal total
            chunk_inputs = inputs.slice(start, end)
            if chunk_inputs.teacher_logp is None and "teacher_logp" in stats:
                chunk_inputs.teacher_logp = stats["teacher_logp"]
            loss, g_logp, g_ent, g_div, parts = token_objective(
                cfg, chunk_inputs, stats["logp"], stats.get("entropy"), stats.get("divergence"),
                include_policy=not sequence_level,
            )
            if g_policy is not None:
                g_logp = g_logp + g_policy[start:end]
            total = total + loss
            parts.pop("loss")
            add(parts)
            # Zero coefficients skip their terms in the logit gradient entirely.
            use_div = cfg.distill_coef != 0.0 and cfg.distill_estimator == "full"
            return g_logp, (g_ent if cfg.entropy_coef != 0.0 else None), (g_div if use_div else None)

        result = run_chunks(
            student, teacher, targets, call.spec, call.ops, call.chunk_size, objective=objective,
            grad_hidden=need_h, grad_weight=need_w, grad_bias=need_b and s_bias is not None, keep=(),
        )
        denom = inputs.mask.sum().clamp(min=1.0)
        call.metrics["loss"] = total.detach()
        for key, value in sums.items():
            call.metrics[key] = value if key == "policy_loss" else value / denom
        for key in call.metric_names:  # an all-masked batch still reports every metric (as 0)
            call.metrics.setdefault(key, torch.zeros((), dtype=total.dtype, device=s_hidden.device))
        # fp16 inputs: the gradients stay in fp32 until backward has scaled them (cast_grad)
        ctx.save_for_backward(result.grad_hidden, result.grad_weight, result.grad_bias)
        ctx.input_dtype = s_weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        gh, gw, gb = ctx.saved_tensors
        scale = grad_output.to(torch.promote_types(grad_output.dtype, torch.float32))
        # ``loss.backward()`` (upstream gradient 1) gets the gradients made in the forward as they are; g * 1 was
        # a full pass over dW and a fresh [V, H] tensor: 0.25 s, 2 % of the step, at V = 151936, H = 896 on the
        # 2-core CPU. The test costs a device sync on an accelerator, where the multiply is cheap: there it is done.
        # What reaches the caller is then the saved tensor itself (the weight and bias go in unsliced when the whole
        # vocabulary counts: ``vocab_rows``). Autograd keeps that right: ``.grad`` takes it over only when the graph
        # is freed (with retain_graph, AccumulateGrad copies it); ``torch.autograd.grad`` with retain_graph returns it;
        # changing it in place bumps its version, so a later backward of this graph raises autograd's "modified by
        # an inplace operation" error instead of using it (test:
        # test_vold_loss_unit_upstream_gradient_is_not_aliased_across_backwards). Only a change through ``.data``,
        # which autograd does not track by design, would pass unseen.
        # Not while a graph is built (create_graph=True): there g * scale is how the result depends on grad_output.
        unit = grad_output.device.type == "cpu" and not torch.is_grad_enabled() and bool(grad_output == 1)

        def scaled(name, g):
            g = None if g is None else (g if unit else (g * scale).to(g.dtype))
            return cast_grad(name, g, ctx.input_dtype, upstream=(grad_output,))

        return (scaled("student_hidden", gh), scaled("student_weight", gw), scaled("student_bias", gb),
                None, None, None, None, None)


def _per_token(name: str, value: torch.Tensor | None, num_seqs: int, seq_index: torch.Tensor,
               token_shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
    """Broadcast a per-sequence ``[B]`` tensor to tokens, or flatten a per-token one (as ``dtype``)."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.shape == (num_seqs,):
        return value.to(dtype)[seq_index]
    if value.shape == token_shape:
        return value.reshape(-1).to(dtype)
    raise ValueError(f"{name} must be [B={num_seqs}] per sequence or {tuple(token_shape)} per token, "
                     f"got {tuple(value.shape)}")


def vold_loss(
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
    impl: str = "auto",
    chunk_size: int | None = None,
    check_finite: bool = True,
    process_group=None,
    student_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_final_logit_softcapping: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The VOLD stage-2 objective: GRPO + ref KL + distill_coef * D(student || teacher) - entropy bonus.

    Layouts (H = hidden size, V = vocabulary):

    - padded (default): ``student_hidden [B, T, H]``, ``targets/mask/old_logprobs/ref_logprobs/
      teacher_logprobs [B, T]``, ``teacher_hidden [B, T, Ht]``;
    - packed (``cu_seqlens [B+1]`` given, sequence i = tokens ``cu[i]:cu[i+1]``): ``[N, H]`` and ``[N]``.

    ``advantages`` and ``distill_mask`` are per sequence ``[B]`` or per token. ``targets`` are the
    sampled token ids; hidden states are the ones that predict them (already shifted). Per token t
    of sequence i (see ``policy_loss`` for the formulas)::

        l_t  = pg_t(ratio, A_i; epsilon_low, epsilon_high, clip_ratio_c)
             + ref_kl_coef * k(logp_t, ref_t) + distill_coef * w^d_t * D_t - entropy_coef * H_t
        loss = sum_t n_t l_t           n_t from loss_type: grpo | bnpo | dr_grpo | dapo (TRL's)

    ``D_t`` is the exact full-vocabulary ``divergence`` (``distill_estimator="full"``; reverse KL by
    default, needs ``teacher_hidden``/``teacher_weight``) or the sampled-token estimate k1/k2/k3 of
    KL(student || teacher) from ``teacher_logprobs`` (or, if absent, from the teacher's head).
    ``old_logprobs=None`` means on-policy (ratio 1, gradient of logp). Returns ``(loss, metrics)``;
    metrics are detached scalar tensors (means over masked tokens; ``policy_loss`` normalised like
    the loss). Only ``[chunk, V]`` logits exist at a time; gradients reach the student only.
    ``process_group``: vocab-parallel lm_heads, each rank passing its equal vocabulary shard of both
    weights and the replicated hidden states (see ``fused_linear_logprobs``).
    Either head's weight/bias may be an FSDP2 ``DTensor``, gathered once per call (see ``fused_linear_logprobs``).

    ``{student,teacher}_logit_scale`` s and ``{student,teacher}_final_logit_softcapping`` c transform each
    head's logits before the temperature, in TRL's order: ``z' = c tanh(s z / c) / T`` (Gemma-2 / Cohere heads).

    Overflow: the importance log-ratio (token, or the sequence mean for ``"sequence"``) and k3's log-ratio
    (``ref_kl_estimator``/``distill_estimator="k3"``) are clamped to +-20 (``LOG_RATIO_CLAMP``) before
    ``exp``: exact inside, the value at the bound with gradient 0 outside, so loss and gradients are finite
    for any finite log-probs (metrics ``ratio_clamp_frac``, ``ref_kl_clamp_frac``, ``distill_clamp_frac``:
    masked fraction of clamped tokens). Dtypes: per-token math, loss and metrics in promote(fp32, heads'
    dtype): fp32 for fp32/bf16/fp16 heads (logits accumulated and kept in fp32), fp64 for fp64 heads.
    ``mask`` and ``distill_mask`` are weights in ``[0, inf)`` (0/1 or fractional; ``mask`` 0 drops a token).
    ``epsilon_low`` in ``[0, 1)``, ``epsilon_high >= 0``, ``clip_ratio_c > 1`` or None; every scalar option a
    finite real number or one-element tensor (``checks.check_number``: ``TypeError`` naming it otherwise).
    Raises ``ValueError`` (naming the argument) for bad shapes/options, a negative ``mask`` or ``distill_mask``
    weight (of a token that counts, for ``distill_mask``), NaN/inf in hidden states, ``mask`` or in
    the log-probs/advantages of tokens that count (``check_finite``), fp64 with ``impl="triton"``, and,
    in backward, an fp16 gradient beyond fp16's range, unless the upstream gradient is > 1 (taken as a loss
    scaler's: the gradient then comes back with inf and a ``RuntimeWarning``, torch's rule; see ``common.cast_grad``).
    """
    student_weight, student_bias = gather_head("student_", student_hidden, student_weight, student_bias, process_group)
    teacher_weight, teacher_bias = gather_head("teacher_", teacher_hidden, teacher_weight, teacher_bias, process_group)
    for name, value, choices in (
        ("loss_type", loss_type, LOSS_TYPES), ("importance_sampling_level", importance_sampling_level, IS_LEVELS),
        ("ref_kl_estimator", ref_kl_estimator, KL_ESTIMATORS),
        ("distill_estimator", distill_estimator, DISTILL_ESTIMATORS), ("impl", impl, checks.IMPLS),
    ):
        checks.check_choice(name, value, choices)
    # PPO/GRPO's clip range [1 - epsilon_low, 1 + epsilon_high] (TRL's epsilon/epsilon_high, verl's
    # clip_ratio_low/high): epsilon_low >= 1 makes the lower bound <= 0, below every ratio exp(.) > 0.
    epsilon_low = checks.check_number("epsilon_low", epsilon_low, ge=0, lt=1,
                                      note=" (lower clip bound 1 - epsilon_low > 0)")
    epsilon_high = checks.check_number("epsilon_high", epsilon_high, ge=0)
    if clip_ratio_c is not None:
        clip_ratio_c = checks.check_number("clip_ratio_c", clip_ratio_c, gt=1, note=" (dual-clip)")
    ref_kl_coef = checks.check_finite_scalar("ref_kl_coef", ref_kl_coef)
    distill_coef = checks.check_finite_scalar("distill_coef", distill_coef)
    entropy_coef = checks.check_finite_scalar("entropy_coef", entropy_coef)
    checks.check_chunk_size(chunk_size)
    student_transform = checks.logit_transform("student_", student_logit_scale, student_final_logit_softcapping)
    teacher_transform = checks.logit_transform("teacher_", teacher_logit_scale, teacher_final_logit_softcapping)
    checks.check_linear_head("student_", student_hidden, student_weight, student_bias, finite=check_finite)
    has_teacher_head = teacher_hidden is not None or teacher_weight is not None
    if has_teacher_head:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("teacher_hidden and teacher_weight must be given together")
        checks.check_linear_head("teacher_", teacher_hidden, teacher_weight, teacher_bias, finite=check_finite)
    vocab = checks.resolve_vocab(student_weight, teacher_weight if has_teacher_head else None, vocab_size)
    impl, shard, global_vocab = resolve_shard(process_group, vocab, student_hidden.device, impl, vocab_size)

    # ---- layout: flatten to N tokens with a sequence index -------------------------------------
    if cu_seqlens is None:
        if student_hidden.dim() != 3:
            raise ValueError(f"student_hidden must be [B, T, H] (or pass cu_seqlens for [N, H]), "
                             f"got {tuple(student_hidden.shape)}")
        num_seqs, seq_len = student_hidden.shape[:2]
        token_shape = student_hidden.shape[:2]
        seq_index = torch.arange(num_seqs, device=student_hidden.device).repeat_interleave(seq_len)
        if max_completion_length is None:
            max_completion_length = seq_len
    else:
        if student_hidden.dim() != 2:
            raise ValueError(
                f"with cu_seqlens, student_hidden must be packed [N, H], got {tuple(student_hidden.shape)}"
            )
        token_shape = student_hidden.shape[:1]
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(f"cu_seqlens must be an integer [B+1] tensor, got {tuple(cu_seqlens.shape)}")
        lengths = cu_seqlens.diff()
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != token_shape[0] or bool((lengths < 0).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to N={token_shape[0]}, got {cu_seqlens.tolist()}")
        num_seqs = lengths.numel()
        seq_index = torch.arange(num_seqs, device=student_hidden.device).repeat_interleave(lengths.long())
    checks.check_targets(targets, token_shape, global_vocab)
    if mask is None:
        mask = torch.ones(token_shape, device=student_hidden.device)
    else:
        checks.check_same_shape("mask", mask, token_shape)
        checks.check_weights("mask", mask, finite=check_finite)
    for name, value in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs),
                        ("teacher_logprobs", teacher_logprobs)):
        checks.check_same_shape(name, value, token_shape)
    if has_teacher_head and teacher_hidden.shape[:-1] != token_shape:
        raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} must have token dims {tuple(token_shape)}")

    if distill_coef != 0.0:
        if distill_estimator == "full" and not has_teacher_head:
            raise ValueError("distill_estimator='full' needs teacher_hidden and teacher_weight (or set distill_coef=0)")
        if distill_estimator != "full":
            if teacher_logprobs is None and not has_teacher_head:
                raise ValueError(
                    f"distill_estimator={distill_estimator!r} needs teacher_logprobs or the teacher's head"
                )
            if divergence != "reverse_kl":
                raise ValueError(f"distill_estimator={distill_estimator!r} estimates reverse KL; "
                                 f"divergence={divergence!r} needs distill_estimator='full'")
    if ref_kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("ref_kl_coef != 0 needs ref_logprobs")

    # Per-token math in promote(fp32, the heads' dtypes): fp32, or fp64 end to end for fp64 inputs.
    acc = compute_dtype(student_weight.dtype)
    if has_teacher_head:
        acc = torch.promote_types(acc, teacher_weight.dtype)
    flat_mask = mask.reshape(-1).to(acc)
    norm = normalization_weights(flat_mask, seq_index, num_seqs, loss_type,
                                 max_completion_length=max_completion_length, token_normalizer=token_normalizer)
    flat_adv = _per_token("advantages", advantages, num_seqs, seq_index, token_shape, acc)
    flat_dmask = _per_token("distill_mask", distill_mask, num_seqs, seq_index, token_shape, acc)

    # ---- keep only tokens that count (mask != 0); padding never reaches the vocabulary ----------
    active = flat_mask.nonzero().view(-1)

    def pick(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.reshape(-1).index_select(0, active)

    inputs = TokenInputs(
        norm=norm.index_select(0, active), mask=pick(flat_mask), advantages=pick(flat_adv),
        old_logp=pick(None if old_logprobs is None else old_logprobs.to(acc)),
        ref_logp=pick(None if ref_logprobs is None else ref_logprobs.to(acc)),
        teacher_logp=pick(None if teacher_logprobs is None else teacher_logprobs.to(acc)),
        distill_weight=pick(flat_dmask), seq_index=pick(seq_index), num_seqs=num_seqs,
    )
    if check_finite:
        for name, value in (("advantages", inputs.advantages), ("old_logprobs", inputs.old_logp),
                            ("ref_logprobs", inputs.ref_logp), ("teacher_logprobs", inputs.teacher_logp)):
            if value is not None:
                checks.check_finite(name, value)
    if inputs.distill_weight is not None:  # the tokens that count; >= 0 always, finite with check_finite
        checks.check_weights("distill_mask", inputs.distill_weight, finite=check_finite)

    h_dim = student_hidden.shape[-1]
    s_hidden = student_hidden.reshape(-1, h_dim).index_select(0, active)
    s_targets = targets.reshape(-1).long().index_select(0, active)
    t_hidden = t_weight = t_bias = None
    use_full = distill_estimator == "full" and has_teacher_head
    need_teacher_logp = distill_estimator != "full" and teacher_logprobs is None and has_teacher_head
    if use_full or need_teacher_logp:
        t_hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, active)
        t_weight = vocab_rows(teacher_weight.detach(), vocab)
        t_bias = None if teacher_bias is None else vocab_rows(teacher_bias.detach(), vocab)
    if use_full:
        spec = divergence_spec(divergence, jsd_beta, temperature, beta_name="jsd_beta", need_entropy=True,
                               shard=shard)
    else:
        checks.check_positive("temperature", temperature)
        spec = ChunkSpec(inv_temperature=1.0 / temperature, need_entropy=True, need_teacher_logp=need_teacher_logp,
                         shard=shard)
    cfg = PolicyLossConfig(
        loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high, clip_ratio_c=clip_ratio_c,
        importance_sampling_level=importance_sampling_level, ref_kl_coef=ref_kl_coef,
        ref_kl_estimator=ref_kl_estimator, distill_coef=distill_coef, distill_estimator=distill_estimator,
        entropy_coef=entropy_coef,
    )
    chunk = max(1, chunk_size or default_chunk_size(vocab, s_hidden.device))
    metric_names = ("loss", "policy_loss", "entropy", "ratio", "clip_low", "clip_high", "ratio_clamp_frac")
    if ref_kl_coef != 0.0:
        metric_names += ("ref_kl", "ref_kl_clamp_frac")
    if use_full or need_teacher_logp or (distill_estimator != "full" and teacher_logprobs is not None):
        metric_names += ("distill_kl",)
    if distill_estimator != "full" and (need_teacher_logp or teacher_logprobs is not None):
        metric_names += ("distill_clamp_frac",)
    ops = get_engine(impl, s_hidden.device, chunk, acc)
    call = _Call(inputs=inputs, cfg=cfg, spec=spec, ops=ops, chunk_size=chunk, metric_names=metric_names,
                 student_transform=student_transform, teacher_transform=teacher_transform)
    loss = VoldLossFunction.apply(s_hidden, vocab_rows(student_weight, vocab), vocab_rows(student_bias, vocab),
                                  t_hidden, t_weight, t_bias, s_targets, call)
    return loss, call.metrics


class VoldLoss(torch.nn.Module):
    """Module form of :func:`vold_loss`: keyword options fixed at construction."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, student_hidden, student_weight, targets, advantages, old_logprobs=None, mask=None, **tensors):
        return vold_loss(student_hidden, student_weight, targets, advantages, old_logprobs, mask,
                         **tensors, **self.options)
