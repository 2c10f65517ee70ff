"""The candidates: each builds a ``step()`` that runs one forward + backward of the row's objective on
the shape's :class:`~benchmarks.kernels.inputs.Inputs` and returns the loss (``None`` for the GEMM floor).

Loss rows ("full", "k2"): GRPO clipped loss (token ratio, eps 0.2/0.3, "dapo") + 0.1 x reverse KL, exact
("full", from the teacher's hidden states and lm_head) or the sampled-token k2 from given teacher log-probs.

- naive         full [N, V] logits and autograd: ``vold.kernels.reference.ref_vold_loss(dtype=None)``
- vold_*        vold.kernels.vold_loss with impl torch / torch_compile / triton
- trl           TRL 1.16's chunked kernels assembled as a TRL user would: per-token log-probs from
                ``trl.kernels.ChunkedLogProbFunction`` (TRL's vocabulary tile, 32,768, the one its fused lm_head
                uses) -> the same GRPO clipped loss (vold's per-token ``policy_gradient_loss``, so the formula is
                one); "full" adds 0.1 x the per-token reverse KL of ``ChunkedDivergenceFunction`` (beta = 1),
                "k2" adds 0.1 x (logp - teacher_logp)^2 / 2 with the given teacher log-probs. Masked positions
                are dropped before the projection where TRL drops them (on Triton devices), else scored and
                masked, as TRL's ``add_fused_lm_head`` / ``_chunked_divergence_loss`` do.
- liger*        LigerFusedLinearGRPOLoss + 0.1 x LigerFusedLinearJSDLoss(beta=1), eager or compiled ("full" only)
- gemm_floor    only the unavoidable GEMMs, chunked with vold's chunk size

Log-prob pass rows ("logp": under no_grad, the old-policy / reference / teacher pass; "logp_grad": forward +
backward of the masked mean of the log-probs): vold's ``fused_linear_logprobs`` (impl per vold_* row) vs
TRL's ``ChunkedLogProbFunction``, and the GEMM floor (1 GEMM without grad, 3 with).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vold.kernels.reference import ref_vold_loss

from .config import DISTILL_COEF, EPSILON_HIGH, EPSILON_LOW, IMPLS, LOSS_TYPE, VOLD_ENGINE, Settings
from .inputs import Inputs

Step = Callable[[], "torch.Tensor | None"]


def vold_chunk_size(n: int, v: int, device: torch.device, override: int | None) -> int:
    """The chunk (rows) vold uses for ``n`` active tokens: its own rule unless overridden, at most ``n``."""
    if override:
        return max(1, min(n, override))
    from vold.kernels.common import default_chunk_size

    return max(1, min(n, default_chunk_size(v, device)))


def _objective_step(loss_fn: Callable, inp: Inputs, estimator: str, **options) -> Step:
    """One forward + backward of the row's objective through ``loss_fn`` (``vold_loss`` or the reference
    ``ref_vold_loss``, which take the same arguments); ``options``: the function's own (engine, dtype)."""
    teacher = (dict(teacher_hidden=inp.t_hidden, teacher_weight=inp.t_weight) if estimator == "full"
               else dict(teacher_logprobs=inp.teacher_logprobs))

    def step() -> torch.Tensor:
        loss, _ = loss_fn(
            inp.s_hidden, inp.s_weight, inp.targets, inp.advantages, inp.old_logprobs, inp.mask, **teacher,
            loss_type=LOSS_TYPE, epsilon_low=EPSILON_LOW, epsilon_high=EPSILON_HIGH, distill_coef=DISTILL_COEF,
            distill_estimator=estimator, **options,
        )
        loss.backward()
        return loss.detach()

    return step


def _vold_step(inp: Inputs, estimator: str, impl: str, s: Settings) -> Step:
    from vold.kernels import vold_loss

    return _objective_step(vold_loss, inp, estimator, impl=impl, chunk_size=s.chunk_size)


def _naive_step(inp: Inputs, estimator: str) -> Step:
    """The float64 oracle run in the working precision (``dtype=None``: GEMMs in the inputs' dtype, logits
    upcast to fp32, full ``[N, V]`` logits and autograd; the loss alone, no metrics), as a training script
    without fused kernels would."""
    return _objective_step(ref_vold_loss, inp, estimator, dtype=None, metrics=False)


def _liger_step(inp: Inputs, compiled: bool, s: Settings) -> Step:
    """GRPO (no ref model, beta=0) + 0.1 * reverse KL via JSD(beta=1), as a TRL user would combine them."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss, LigerFusedLinearJSDLoss

    grpo = LigerFusedLinearGRPOLoss(
        beta=0.0, compiled=compiled, use_ref_model=False, chunk_size=s.liger_grpo_chunk,
        epsilon_low=EPSILON_LOW, epsilon_high=EPSILON_HIGH, loss_type=LOSS_TYPE,
    )
    jsd = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0, compiled=compiled, chunk_size=s.liger_jsd_chunk,
    )
    h, ht = inp.s_hidden.shape[-1], inp.t_hidden.shape[-1]
    labels = inp.targets.masked_fill(inp.mask == 0, -100).reshape(-1)
    t_hidden = inp.t_hidden.reshape(-1, ht)

    def step() -> torch.Tensor:
        pg, _ = grpo(inp.s_hidden, inp.s_weight, inp.targets, inp.mask, inp.advantages,
                     old_per_token_logps=inp.old_logprobs)
        kl = jsd(inp.s_hidden.view(-1, h), inp.s_weight, t_hidden, inp.t_weight, labels)
        loss = pg + DISTILL_COEF * kl
        loss.backward()
        return loss.detach()

    return step


def _vold_logp_step(inp: Inputs, estimator: str, impl: str, s: Settings) -> Step:
    """vold's fused_linear_logprobs alone: no_grad ("logp") or forward + backward of the masked mean."""
    from vold.kernels import fused_linear_logprobs

    def logp() -> torch.Tensor:
        return fused_linear_logprobs(inp.s_hidden, inp.s_weight, inp.targets, impl=impl, chunk_size=s.chunk_size)

    return _logp_pass(logp, inp, estimator)


def _logp_pass(logp: Callable[[], torch.Tensor], inp: Inputs, estimator: str) -> Step:
    """The log-prob pass of a row: ``logp()`` [B, T] under no_grad for "logp", else forward + backward of
    ``sum(mask * logp) / sum(mask)``; returns that masked mean."""
    count = inp.mask.sum().clamp(min=1.0)

    def step() -> torch.Tensor:
        if estimator == "logp":
            with torch.no_grad():
                return (logp() * inp.mask).sum() / count
        loss = (logp() * inp.mask).sum() / count
        loss.backward()
        return loss.detach()

    return step


TRL_VOCAB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE: the vocabulary tile of TRL's fused lm_head


def trl_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs ``[N]`` (fp32) of ``hidden [N, H] @ weight[V, H]^T`` at ``targets [N]`` by TRL's
    ``ChunkedLogProbFunction``, called as TRL's fused lm_head calls it (no bias, temperature 1, no soft cap,
    logit scale 1, only the log-probs requested)."""
    from trl.kernels import ChunkedLogProbFunction

    logp, *_ = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, TRL_VOCAB_CHUNK, None, 1.0,
                                            ("log_probs",))
    return logp.float()


def _trl_compacts(device: torch.device) -> bool:
    """TRL's own rule: masked positions are dropped before the projection on Triton devices only."""
    from trl.kernels.chunked_logprob import _use_triton

    return bool(_use_triton(device))


def trl_loss(inp: Inputs, estimator: str) -> torch.Tensor:
    """The row's objective from TRL's chunked kernels (see the module docstring); returns the scalar loss."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    from vold.kernels.policy_loss import PolicyLossConfig, kl_estimate, normalization_weights, policy_gradient_loss

    b, t, h = inp.s_hidden.shape
    mask = inp.mask.reshape(-1)
    keep = mask != 0 if _trl_compacts(inp.s_hidden.device) else torch.ones_like(mask, dtype=torch.bool)
    hidden = inp.s_hidden.reshape(-1, h)[keep]
    targets = inp.targets.reshape(-1)[keep]
    m = mask[keep]
    logp = trl_logprobs(hidden, inp.s_weight, targets)
    advantages = inp.advantages[:, None].expand(b, t).reshape(-1)[keep]
    cfg = PolicyLossConfig(loss_type=LOSS_TYPE, epsilon_low=EPSILON_LOW, epsilon_high=EPSILON_HIGH)
    pg, *_ = policy_gradient_loss(cfg, logp, inp.old_logprobs.reshape(-1)[keep], advantages, mask=m)
    if estimator == "full":
        t_hidden = inp.t_hidden.reshape(-1, inp.t_hidden.shape[-1])[keep]
        distill, _ = ChunkedDivergenceFunction.apply(hidden, inp.s_weight, None, t_hidden, inp.t_weight, None, 1.0)
    else:
        distill = kl_estimate(logp, inp.teacher_logprobs.reshape(-1)[keep], "k2")
    weights = normalization_weights(m, torch.zeros_like(targets), 1, LOSS_TYPE, max_completion_length=None,
                                    token_normalizer=None)
    return (weights * (pg + DISTILL_COEF * distill.float())).sum()


def _trl_step(inp: Inputs, estimator: str) -> Step:
    if estimator in ("logp", "logp_grad"):
        b, t, h = inp.s_hidden.shape
        return _logp_pass(lambda: trl_logprobs(inp.s_hidden.reshape(-1, h), inp.s_weight,
                                               inp.targets.reshape(-1)).view(b, t), inp, estimator)

    def step() -> torch.Tensor:
        loss = trl_loss(inp, estimator)
        loss.backward()
        return loss.detach()

    return step


def _gemm_step(inp: Inputs, estimator: str, chunk: int) -> Step:
    """The GEMMs any implementation must do, ``chunk`` rows at a time, with the student logits standing
    in for dL/dlogits: teacher logits ("full" only), student logits, then (except for the no-grad "logp"
    pass) dX = dZ W and dW += dZ^T X. So 4 GEMMs for "full", 3 for "k2" and "logp_grad", 1 for "logp"."""
    h, ht = inp.s_hidden.shape[-1], inp.t_hidden.shape[-1]
    x, w = inp.s_hidden.detach().reshape(-1, h), inp.s_weight.detach()
    xt, wt = inp.t_hidden.reshape(-1, ht), inp.t_weight
    n, v = inp.n_active, w.shape[0]
    backward = estimator != "logp"

    def step() -> None:
        rows = min(chunk, n)
        z = torch.empty(rows, v, dtype=w.dtype, device=w.device)
        u = torch.empty(rows, v, dtype=w.dtype, device=w.device) if estimator == "full" else None
        dx = torch.empty(n, h, dtype=w.dtype, device=w.device) if backward else None
        dw = torch.zeros_like(w) if backward else None
        for start in range(0, n, rows):
            end = min(n, start + rows)
            if u is not None:
                torch.mm(xt[start:end], wt.t(), out=u[: end - start])
            zc = z[: end - start]
            torch.mm(x[start:end], w.t(), out=zc)
            if backward:
                torch.mm(zc, w, out=dx[start:end])
                dw.addmm_(zc.t(), x[start:end])
        return None

    return step


def build_step(impl: str, estimator: str, inp: Inputs, s: Settings) -> Step:
    """The forward+backward callable of one row."""
    device = torch.device(s.device)
    if impl == "naive":
        return _naive_step(inp, estimator)
    if impl in VOLD_ENGINE:
        if estimator in ("logp", "logp_grad"):
            return _vold_logp_step(inp, estimator, VOLD_ENGINE[impl], s)
        return _vold_step(inp, estimator, VOLD_ENGINE[impl], s)
    if impl == "trl":
        return _trl_step(inp, estimator)
    if impl in ("liger", "liger_compiled"):
        return _liger_step(inp, impl == "liger_compiled", s)
    if impl == "gemm_floor":
        return _gemm_step(inp, estimator, vold_chunk_size(inp.n_active, inp.s_weight.shape[0], device, s.chunk_size))
    if impl == "gemm_unchunked":
        return _gemm_step(inp, estimator, inp.n_active)
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")

