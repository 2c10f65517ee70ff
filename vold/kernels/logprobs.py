"""``fused_linear_logprobs``: log p(target) (and entropy) of a linear head, without [N, V] logits."""

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


class FusedLinearLogprobsFunction(torch.autograd.Function):
    """Forward keeps only ``[N]`` statistics; backward recomputes each chunk's logits once."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, spec: ChunkSpec, ops, chunk_size: int, transform):
        # An entropy returned for logging only gets grad None (not zeros), so backward skips its term.
        ctx.set_materialize_grads(False)
        result = run_chunks(Head(hidden, weight, bias, transform), None, targets, spec, ops, chunk_size,
                            keep=("logp", "entropy"))
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.spec, ctx.ops, ctx.chunk_size, ctx.transform = spec, ops, chunk_size, transform
        entropy = result.stats.get("entropy", hidden.new_empty(0, dtype=compute_dtype(weight.dtype)))
        if not spec.need_entropy:
            ctx.mark_non_differentiable(entropy)
        return result.stats["logp"], entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, acc = hidden.shape[0], compute_dtype(weight.dtype)
        grad_logp = torch.zeros(n, dtype=acc, device=hidden.device) if grad_logp is None else grad_logp.to(acc)
        use_ent = ctx.spec.need_entropy and grad_entropy is not None
        grad_entropy = grad_entropy.to(acc) if use_ent else None

        def objective(start: int, end: int, stats: dict):
            return grad_logp[start:end], (grad_entropy[start:end] if use_ent else None), None

        result = run_chunks(
            Head(hidden, weight, bias, ctx.transform), None, targets, ctx.spec, ctx.ops, ctx.chunk_size,
            objective=objective, grad_hidden=need_h, grad_weight=need_w, grad_bias=need_b and bias is not None,
            keep=(),
        )
        grads = (cast_grad(name, g, hidden.dtype, upstream=(grad_logp, grad_entropy)) for name, g in
                 (("hidden", result.grad_hidden), ("weight", result.grad_weight), ("bias", result.grad_bias)))
        return *grads, None, None, None, None, None


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    vocab_size: int | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
    check_finite: bool = True,
    process_group=None,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of ``targets`` under ``softmax((hidden @ weight^T + bias) / temperature)``.

    Shapes: ``hidden [..., H]``, ``weight [V, H]``, ``bias [V]``, ``targets [...]`` → ``logp [...]``
    (and ``entropy [...]`` = -sum_j p_j log p_j when ``return_entropy``) in promote(fp32, input dtype):
    fp32 for fp32 / bf16 / fp16 inputs, whose logits are computed with an fp32 accumulation and kept in
    fp32 (never rounded to the input dtype), and fp64 end to end for fp64 inputs (``impl="triton"``
    computes in fp32: fp64 inputs raise ``ValueError`` there). Only ``[chunk, V]``
    logits exist at a time; under ``torch.no_grad()`` nothing is kept for a backward pass.
    Gradients flow to ``hidden``, ``weight`` and ``bias``. ``vocab_size=K`` uses rows ``[0, K)`` only.
    ``process_group``: ``weight``/``bias`` are this rank's equal vocabulary shard (rank r holds rows
    ``[r V_r, (r+1) V_r)``), ``hidden``/``targets`` are replicated; results and the hidden-state gradient
    are identical on every rank, each rank gets its shard's weight gradient (torch engine).
    FSDP2: ``weight``/``bias`` may be ``DTensor``s (``fully_shard`` parameters), gathered once per call with
    ``full_tensor()`` (cast to ``hidden``'s dtype first); their ``.grad`` is a DTensor holding this rank's shard
    of the data-parallel mean gradient (``vold.kernels.dtensor.gather_head``). ``ValueError`` for a DTensor
    ``hidden`` or a DTensor head together with ``process_group``.
    ``logit_scale`` s (Cohere) and ``final_logit_softcapping`` c (Gemma-2) transform the logits before the
    temperature, in TRL's order: ``z' = c tanh(s z / c) / T`` (``s z / T`` without a cap); ``ValueError``
    unless s > 0 and c is None or > 0. In backward, an fp16 gradient beyond fp16's range raises ``ValueError``
    naming the input, unless some upstream gradient element has |g| > 1 (taken as a loss scaler's): then it
    comes back with inf and a ``RuntimeWarning``, torch's rule (``common.cast_grad``).
    """
    weight, bias = gather_head("", hidden, weight, bias, process_group)
    checks.check_linear_head("", hidden, weight, bias, finite=check_finite)
    checks.check_positive("temperature", temperature)
    checks.check_choice("impl", impl, checks.IMPLS)
    transform = checks.logit_transform("", logit_scale, final_logit_softcapping)
    vocab = checks.resolve_vocab(weight, None, vocab_size)
    impl, shard, global_vocab = resolve_shard(process_group, vocab, hidden.device, impl, vocab_size)
    leading = hidden.shape[:-1]
    checks.check_targets(targets, leading, global_vocab)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).long()
    weight, bias = vocab_rows(weight, vocab), vocab_rows(bias, vocab)
    checks.check_chunk_size(chunk_size)
    chunk = chunk_size or default_chunk_size(vocab, hidden.device)
    spec = ChunkSpec(inv_temperature=1.0 / temperature, need_entropy=return_entropy, shard=shard)
    chunk = max(1, chunk)
    ops = get_engine(impl, hidden.device, chunk, weight.dtype)
    logp, entropy = FusedLinearLogprobsFunction.apply(flat_hidden, weight, bias, flat_targets, spec, ops, chunk,
                                                     transform)
    logp = logp.view(leading)
    if return_entropy:
        return logp, entropy.view(leading)
    return logp


class FusedLinearLogprobs(torch.nn.Module):
    """Module form of :func:`fused_linear_logprobs` holding the keyword options."""

    def __init__(self, *, temperature: float = 1.0, return_entropy: bool = False, impl: str = "auto",
                 chunk_size: int | None = None, vocab_size: int | None = None):
        super().__init__()
        self.options = dict(temperature=temperature, return_entropy=return_entropy, impl=impl,
                            chunk_size=chunk_size, vocab_size=vocab_size)

    def forward(self, hidden, weight, targets, bias=None):
        return fused_linear_logprobs(hidden, weight, targets, bias=bias, **self.options)
