"""``fused_linear_divergence``: exact full-vocabulary divergence between two linear heads."""

from __future__ import annotations

import torch

from . import checks
from .chunked import run_chunks
from .common import (
    ChunkSpec,
    Head,
    cast_grad,
    compute_dtype,
    default_chunk_size,
    resolve_shard,
    vocab_rows,
)
from .dtensor import gather_head
from .engines import get_engine


class FusedLinearDivergenceFunction(torch.autograd.Function):
    """Forward keeps only ``[N]`` divergences; backward recomputes both chunks' logits."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, spec: ChunkSpec, ops, chunk_size: int,
                transforms):
        dummy = torch.zeros(s_hidden.shape[0], dtype=torch.long, device=s_hidden.device)
        student = Head(s_hidden, s_weight, s_bias, transforms[0])
        teacher = Head(t_hidden, t_weight, t_bias, transforms[1])
        result = run_chunks(student, teacher, dummy, spec, ops, chunk_size, keep=("divergence",))
        ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias)
        ctx.spec, ctx.ops, ctx.chunk_size, ctx.transforms = spec, ops, chunk_size, transforms
        return result.stats["divergence"]

    @staticmethod
    def backward(ctx, grad_div):
        s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = compute_dtype(s_weight.dtype)
        grad_div = grad_div.to(acc)
        zeros = torch.zeros(s_hidden.shape[0], dtype=acc, device=s_hidden.device)
        dummy = torch.zeros(s_hidden.shape[0], dtype=torch.long, device=s_hidden.device)

        def objective(start: int, end: int, stats: dict):
            return zeros[start:end], None, grad_div[start:end]

        result = run_chunks(
            Head(s_hidden, s_weight, s_bias, ctx.transforms[0]), Head(t_hidden, t_weight, t_bias, ctx.transforms[1]),
            dummy, ctx.spec, ctx.ops,
            ctx.chunk_size, objective=objective, grad_hidden=need_h, grad_weight=need_w,
            grad_bias=need_b and s_bias is not None, keep=(),
        )
        grads = (cast_grad(name, g, s_hidden.dtype, upstream=(grad_div,)) for name, g in (
            ("student_hidden", result.grad_hidden), ("student_weight", result.grad_weight),
            ("student_bias", result.grad_bias)))
        return *grads, None, None, None, None, None, None, None


def divergence_spec(divergence: str, beta: float, temperature: float, *, beta_name: str = "beta",
                    **extra) -> ChunkSpec:
    """Validate a divergence choice (``beta_name``: the caller's name of beta, in the error); JSD with beta 0 or 1
    is exactly forward or reverse KL."""
    checks.check_choice("divergence", divergence, checks.DIVERGENCES)
    checks.check_positive("temperature", temperature)
    if divergence == "jsd":
        checks.check_number(beta_name, beta, ge=0, le=1, note=" for divergence='jsd'")
        divergence = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(float(beta), "jsd")
    return ChunkSpec(inv_temperature=1.0 / temperature, divergence=divergence, beta=beta, **extra)


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
    check_finite: bool = True,
    process_group=None,
    student_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_final_logit_softcapping: float | None = None,
) -> torch.Tensor:
    """Exact per-token divergence between student p and teacher q over the whole vocabulary.

    ``p = softmax((student_hidden @ student_weight^T + b_s) / T)``, ``q`` likewise for the teacher.
    Shapes: ``student_hidden [..., Hs]``, ``student_weight [V, Hs]``, ``teacher_hidden [..., Ht]``,
    ``teacher_weight [V, Ht]`` (Hs may differ from Ht) → ``[...]`` in promote(fp32, input dtype) (fp32 for
    fp32 / bf16 / fp16 inputs, with both heads' logits accumulated and kept in fp32; fp64 for fp64 inputs):

    - ``"reverse_kl"``: KL(p || q) = sum_j p_j (log p_j - log q_j)   (VOLD's distillation term)
    - ``"forward_kl"``: KL(q || p) = sum_j q_j (log q_j - log p_j)
    - ``"jsd"``: beta KL(q || m) + (1 - beta) KL(p || m), m = beta q + (1 - beta) p
      (Liger-Kernel's generalised JSD: beta = 0 is forward KL, beta = 1 reverse KL)

    Gradients flow to the student only; the teacher is frozen. Heads with different V need
    ``vocab_size=`` (rows ``[0, vocab_size)`` of both are compared), else ``ValueError``.
    ``process_group``: both weights are this rank's equal vocabulary shard (see ``fused_linear_logprobs``).
    Either head's weight/bias may be an FSDP2 ``DTensor``, gathered once per call (see ``fused_linear_logprobs``).
    ``{student,teacher}_logit_scale`` s and ``{student,teacher}_final_logit_softcapping`` c transform each
    head's logits before the temperature, in TRL's order: ``z' = c tanh(s z / c) / T``.
    In backward, an fp16 gradient beyond fp16's range raises ``ValueError`` naming the input, unless some
    upstream gradient element has |g| > 1 (taken as a loss scaler's): then it comes back with inf, torch's
    rule, with a ``RuntimeWarning`` (``common.cast_grad``).
    """
    student_weight, student_bias = gather_head("student_", student_hidden, student_weight, student_bias, process_group)
    teacher_weight, teacher_bias = gather_head("teacher_", teacher_hidden, teacher_weight, teacher_bias, process_group)
    checks.check_linear_head("student_", student_hidden, student_weight, student_bias, finite=check_finite)
    checks.check_linear_head("teacher_", teacher_hidden, teacher_weight, teacher_bias, finite=check_finite)
    checks.check_choice("impl", impl, checks.IMPLS)
    transforms = (checks.logit_transform("student_", student_logit_scale, student_final_logit_softcapping),
                  checks.logit_transform("teacher_", teacher_logit_scale, teacher_final_logit_softcapping))
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden {tuple(teacher_hidden.shape)} "
            "must have the same leading (token) dims"
        )
    vocab = checks.resolve_vocab(student_weight, teacher_weight, vocab_size)
    impl, shard, _ = resolve_shard(process_group, vocab, student_hidden.device, impl, vocab_size)
    spec = divergence_spec(divergence, beta, temperature, shard=shard)
    leading = student_hidden.shape[:-1]
    s_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    t_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    s_bias = vocab_rows(student_bias, vocab)
    t_bias = None if teacher_bias is None else vocab_rows(teacher_bias, vocab).detach()
    checks.check_chunk_size(chunk_size)
    chunk = chunk_size or default_chunk_size(vocab, s_hidden.device)
    chunk = max(1, chunk)
    out = FusedLinearDivergenceFunction.apply(
        s_hidden, vocab_rows(student_weight, vocab), s_bias,
        t_hidden, vocab_rows(teacher_weight, vocab).detach(), t_bias,
        spec, get_engine(impl, s_hidden.device, chunk, torch.promote_types(student_weight.dtype, teacher_weight.dtype)),
        chunk, transforms,
    )
    return out.view(leading)


class FusedLinearDivergence(torch.nn.Module):
    """Module form of :func:`fused_linear_divergence` holding the keyword options."""

    def __init__(self, *, divergence: str = "reverse_kl", beta: float = 0.5, temperature: float = 1.0,
                 impl: str = "auto", chunk_size: int | None = None, vocab_size: int | None = None):
        super().__init__()
        self.options = dict(divergence=divergence, beta=beta, temperature=temperature, impl=impl,
                            chunk_size=chunk_size, vocab_size=vocab_size)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight,
                student_bias=None, teacher_bias=None):
        return fused_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                       student_bias=student_bias, teacher_bias=teacher_bias, **self.options)
