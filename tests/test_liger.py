"""An external oracle nobody here wrote: Liger-Kernel's chunked GRPO and JSD losses (compiled=False).

- ``LigerFusedLinearGRPOLoss``: TRL's GRPO loss types with the same normalisations as ``vold_loss``
  (grpo: mean over each sequence's tokens then over the B sequences; bnpo: over all unmasked tokens;
  dr_grpo: / (B * max_completion_length); dapo: / number of unmasked tokens in this batch, single
  process). Liger's KL penalty is k3 of KL(pi || ref) (``k3_loss_fn(ref, logp) = e^(ref - logp) -
  (ref - logp) - 1``) weighted by its ``beta``, i.e. our ``ref_kl_coef`` with ``ref_kl_estimator="k3"``.
  Liger returns ``(loss, [kl_mean if beta != 0, clip_fraction])`` with means over unmasked tokens;
  its clip fraction is ``(r < 1 - eps_low & A < 0) | (r > 1 + eps_high & A > 0)``, our clip_low + clip_high.
- ``LigerFusedLinearJSDLoss``: with ``weight_hard_loss=0, weight_soft_loss=1`` the loss is
  ``sum_t [y_t != ignore_index] JSD_beta(p_t, q_t) / max(#non-ignored tokens, 1)``, where Liger's
  beta = 1 is KL(p || q) (reverse KL), beta = 0 is KL(q || p) (forward KL).

Both engines of vold and Liger compute in fp32, so they are compared to each other to ``FP32_TOL``
relative to the largest magnitude (as everywhere in this suite); the float64 reference is checked
against Liger too, so the oracle and the external oracle vouch for each other.
"""

from __future__ import annotations

import pytest
import torch
from helpers import FP32_TOL, IMPLS, assert_rel, make_vold_inputs, randn, reference_cast, run_vold

from vold.kernels import fused_linear_divergence, vold_loss
from vold.kernels.reference import leaf64, ref_divergence, ref_vold_loss

chunked_loss = pytest.importorskip("liger_kernel.chunked_loss")
LigerFusedLinearGRPOLoss = chunked_loss.LigerFusedLinearGRPOLoss
LigerFusedLinearJSDLoss = chunked_loss.LigerFusedLinearJSDLoss

B, T = 4, 6
V_JSD = 97


def _liger_grpo(tensors: dict, *, beta: float, loss_type: str, level: str, eps_low: float, eps_high: float,
                temperature: float):
    h = tensors["student_hidden"].clone().requires_grad_()
    w = tensors["student_weight"].clone().requires_grad_()
    b = tensors["student_bias"].clone().requires_grad_()
    liger = LigerFusedLinearGRPOLoss(
        beta=beta, compiled=False, use_ref_model=beta != 0.0, chunk_size=2, epsilon_low=eps_low,
        epsilon_high=eps_high, loss_type=loss_type, max_completion_length=T, importance_sampling_level=level,
        temperature=temperature,
    )
    loss, metrics = liger(
        h, w, tensors["targets"], tensors["mask"], tensors["advantages"], bias=b,
        ref_per_token_logps=tensors["ref_logprobs"] if beta != 0.0 else None,
        old_per_token_logps=tensors.get("old_logprobs"),
    )
    loss.backward()
    return loss.detach(), [m.detach() for m in metrics], {"student_hidden": h.grad, "student_weight": w.grad,
                                                          "student_bias": b.grad}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("ref_kl", [False, True], ids=["no_ref_kl", "ref_kl_k3"])
def test_vold_loss_matches_liger_grpo(impl, loss_type, level, ref_kl):
    tensors = make_vold_inputs(B=B, T=T, bias=True)
    tensors = {k: v for k, v in tensors.items() if k not in ("teacher_logprobs", "distill_mask")}
    beta = 0.05 if ref_kl else 0.0
    temperature = 0.9 if ref_kl else 1.0
    eps_low, eps_high = 0.15, 0.35  # asymmetric
    l_loss, l_metrics, l_grads = _liger_grpo(tensors, beta=beta, loss_type=loss_type, level=level,
                                             eps_low=eps_low, eps_high=eps_high, temperature=temperature)
    options = dict(loss_type=loss_type, importance_sampling_level=level, epsilon_low=eps_low, epsilon_high=eps_high,
                   ref_kl_coef=beta, ref_kl_estimator="k3", distill_coef=0.0, max_completion_length=T,
                   temperature=temperature)
    heads = {k: v for k, v in tensors.items() if not k.startswith("teacher_")}
    v_loss, v_metrics, v_grads = run_vold(vold_loss, heads, dict(options, impl=impl))

    assert_rel(v_loss, l_loss, FP32_TOL, "loss vs Liger")
    for key in v_grads:
        assert_rel(v_grads[key], l_grads[key], FP32_TOL, f"grad {key} vs Liger", floor=0.0)
    assert_rel(v_metrics["clip_low"] + v_metrics["clip_high"], l_metrics[-1], FP32_TOL, "clip fraction vs Liger")
    if ref_kl:
        assert_rel(v_metrics["ref_kl"], l_metrics[0], FP32_TOL, "ref_kl vs Liger")
    # the independent float64 oracle agrees with Liger too
    r_loss, _, r_grads = run_vold(ref_vold_loss, heads, options, cast=reference_cast())
    assert_rel(l_loss, r_loss, FP32_TOL, "Liger loss vs reference")
    assert_rel(l_grads["student_weight"], r_grads["student_weight"], FP32_TOL, "Liger grad weight vs ref", floor=0.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_vold_loss_matches_liger_grpo_on_policy(impl, loss_type):
    """old_logprobs=None: ratio 1 with the gradient of logp (Liger: old = logp.detach())."""
    tensors = make_vold_inputs(B=B, T=T, bias=True, old=False)
    tensors = {k: v for k, v in tensors.items()
               if v is not None and k not in ("teacher_logprobs", "distill_mask") and not k.startswith("teacher_")}
    l_loss, l_metrics, l_grads = _liger_grpo(tensors, beta=0.1, loss_type=loss_type, level="token", eps_low=0.2,
                                             eps_high=0.2, temperature=1.0)
    v_loss, v_metrics, v_grads = run_vold(
        vold_loss, tensors,
        dict(loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.2, ref_kl_coef=0.1, distill_coef=0.0, impl=impl),
    )
    assert_rel(v_loss, l_loss, FP32_TOL, "loss vs Liger")
    for key in v_grads:
        assert_rel(v_grads[key], l_grads[key], FP32_TOL, f"grad {key} vs Liger", floor=0.0)
    assert_rel(v_metrics["ref_kl"], l_metrics[0], FP32_TOL, "ref_kl vs Liger")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "beta,divergence",
    [(1.0, "reverse_kl"), (1.0, "jsd"), (0.0, "forward_kl"), (0.3, "jsd"), (0.5, "jsd")],
    ids=["beta1_reverse_kl", "beta1_jsd", "beta0_forward_kl", "beta0.3_jsd", "beta0.5_jsd"],
)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_divergence_matches_liger_jsd(impl, beta, divergence, temperature):
    n, hs, ht = 24, 16, 12
    s_h, s_w, s_b = randn(n, hs), randn(V_JSD, hs), randn(V_JSD)
    t_h, t_w, t_b = randn(n, ht), randn(V_JSD, ht), randn(V_JSD)
    labels = torch.randint(0, V_JSD, (n,))
    labels[[0, 5, 6, 17]] = -100  # ignored tokens
    valid = labels != -100

    lh, lw, lb = (x.clone().requires_grad_() for x in (s_h, s_w, s_b))
    liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, ignore_index=-100,
                                    temperature=temperature, compiled=False, chunk_size=8)
    l_loss = liger(lh, lw, t_h, t_w, labels, lb, t_b)
    l_loss.backward()

    vh, vw, vb = (x.clone().requires_grad_() for x in (s_h, s_w, s_b))
    d = fused_linear_divergence(vh, vw, t_h, t_w, divergence=divergence, beta=beta, student_bias=vb, teacher_bias=t_b,
                                temperature=temperature, impl=impl, chunk_size=7)
    v_loss = (d * valid).sum() / valid.sum().clamp(min=1)  # Liger's normalisation: per non-ignored token
    v_loss.backward()

    assert_rel(v_loss, l_loss, FP32_TOL, "loss vs Liger")
    assert_rel(vh.grad, lh.grad, FP32_TOL, "grad hidden vs Liger", floor=0.0)
    assert_rel(vw.grad, lw.grad, FP32_TOL, "grad weight vs Liger", floor=0.0)
    assert_rel(vb.grad, lb.grad, FP32_TOL, "grad bias vs Liger", floor=0.0)

    ref = ref_divergence(leaf64(s_h, False), leaf64(s_w, False), leaf64(t_h, False), leaf64(t_w, False), divergence,
                         beta, leaf64(s_b, False), leaf64(t_b, False), temperature)
    assert_rel(l_loss, (ref * valid).sum() / valid.sum(), FP32_TOL, "Liger loss vs reference")

