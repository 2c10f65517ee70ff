"""vold.kernels never returns a silently wrong number (issue 11): each case of the issue with its right value.

1. importance ratio e^89 (token and sequence level): the clipped branch, loss -1.3, gradient exactly 0;
   advantage 0: loss exactly 0 (was NaN = inf * 0);
2. k3 with a log-ratio of -90 (reference KL and distillation): k3 at the clamped log-ratio, finite,
   gradient exactly 0; exact (value and gradient) inside the clamp;
3. bf16 inputs near convergence: logits in fp32, gradients right to 1e-3 of their max beyond their own
   rounding to bf16; teacher = student gives exactly zero divergence and gradient;
4. float64 inputs compute in float64: ``torch.autograd.gradcheck`` of all three public functions.

Engines: torch, torch_compile (chunk sizes that make it compile) and Triton (interpreter on the CPU).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    BF16_TOL,
    FP32_TOL,
    TRITON,
    assert_rel,
    compare_vold,
    make_vold_inputs,
    reference_cast,
    run_vold,
)
from reference import LOG_RATIO_CLAMP, leaf64, ref_divergence, ref_vold_loss

from vold.kernels import fused_linear_divergence, fused_linear_logprobs, kl_estimate, vold_loss
from vold.kernels.policy_loss import LOG_RATIO_CLAMP as KERNEL_CLAMP

ENGINES = ["torch", "torch_compile", TRITON]
LOG_HALF = math.log(0.5)


def test_clamp_bound_is_the_documented_one():
    assert KERNEL_CLAMP == LOG_RATIO_CLAMP == 20.0


def _zero_head(dtype=torch.float32):
    """A 1-token sequence whose student head is all zeros: logp = log 0.5 over V = 2."""
    h = torch.zeros(1, 1, 4, dtype=dtype, requires_grad=True)
    w = torch.zeros(2, 4, dtype=dtype, requires_grad=True)
    return h, w, torch.zeros(1, 1, dtype=torch.long)


def _assert_zero_grads(*tensors):
    for t in tensors:
        assert t.grad is not None
        assert bool(torch.isfinite(t.grad).all()), "gradient has NaN/inf"
        assert bool((t.grad == 0).all()), f"gradient must be exactly 0, got max {t.grad.abs().max().item()}"


# ---------------------------------------------------------------------------------------------------
# 1. importance ratio overflow
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ENGINES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("advantage,loss_value", [(1.0, -1.3), (0.0, 0.0)])
def test_ratio_e89_takes_the_clipped_branch(impl, level, advantage, loss_value):
    h, w, y = _zero_head()
    old = torch.tensor([[LOG_HALF - 89.0]])
    loss, metrics = vold_loss(h, w, y, torch.tensor([advantage]), old, distill_coef=0.0,
                              importance_sampling_level=level, impl=impl, chunk_size=1)
    loss.backward()
    assert loss.item() == pytest.approx(loss_value, abs=1e-6)
    if advantage == 0.0:
        assert loss.item() == 0.0
    _assert_zero_grads(h, w)
    assert metrics["ratio_clamp_frac"].item() == 1.0
    assert metrics["ratio"].item() == pytest.approx(math.exp(LOG_RATIO_CLAMP), rel=1e-6)
    assert metrics["clip_high"].item() == (1.0 if advantage > 0 else 0.0)


@pytest.mark.parametrize("impl", ["torch", TRITON])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_ratio_overflow_in_a_batch_matches_the_clamped_reference(impl, packed, level):
    """Some tokens (and one whole sequence) with log-ratios of +-89..+-300 among ordinary ones: finite
    loss and gradients equal to the float64 reference with the same clamp; the rest is untouched."""
    tensors = make_vold_inputs(B=3, T=5, H=8, V=31, Ht=6, adv_per_token=True, mask="padded")
    tensors.pop("teacher_logprobs")
    old = tensors["old_logprobs"].clone()
    old[0, 0] -= 89.0   # ratio e^89
    old[1, 2] += 300.0  # ratio e^-300
    old[2, :] -= 95.0   # a whole sequence past the bound (sequence level too)
    tensors["old_logprobs"] = old
    tensors = {k: v for k, v in tensors.items() if v is not None}
    options = dict(importance_sampling_level=level, ref_kl_coef=0.05, distill_coef=0.1)
    if packed:
        keep = tensors["mask"] > 0
        lengths = keep.sum(1).tolist()
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        tensors = {k: (v[keep] if v.shape[:2] == keep.shape and "weight" not in k else v)
                   for k, v in tensors.items()}
        tensors["cu_seqlens"] = cu
    kernel = run_vold(vold_loss, tensors, dict(options, impl=impl))
    reference = run_vold(ref_vold_loss, tensors, options, cast=reference_cast())
    assert kernel[1]["ratio_clamp_frac"].item() > 0.0
    compare_vold(kernel, reference, FP32_TOL, required_metrics=("ratio_clamp_frac", "ref_kl_clamp_frac"))


# ---------------------------------------------------------------------------------------------------
# 2. k3 overflow (reference KL and distillation)
# ---------------------------------------------------------------------------------------------------

K3_AT_BOUND = math.expm1(LOG_RATIO_CLAMP) - LOG_RATIO_CLAMP  # k3(-20) = e^20 - 1 - 20


@pytest.mark.parametrize("impl", ENGINES)
@pytest.mark.parametrize("term", ["ref_kl", "distill"])
def test_k3_log_ratio_minus_90_is_clamped(impl, term):
    h, w, y = _zero_head()
    other = torch.tensor([[LOG_HALF + 90.0]])
    if term == "ref_kl":
        kwargs = dict(ref_logprobs=other, ref_kl_coef=0.01, ref_kl_estimator="k3", distill_coef=0.0)
        value_key, frac_key = "ref_kl", "ref_kl_clamp_frac"
    else:
        kwargs = dict(teacher_logprobs=other, distill_coef=0.01, distill_estimator="k3")
        value_key, frac_key = "distill_kl", "distill_clamp_frac"
    loss, metrics = vold_loss(h, w, y, torch.tensor([0.0]), impl=impl, chunk_size=1, **kwargs)
    loss.backward()
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(0.01 * K3_AT_BOUND, rel=1e-6)
    assert metrics[value_key].item() == pytest.approx(K3_AT_BOUND, rel=1e-6)
    assert metrics[frac_key].item() == 1.0
    _assert_zero_grads(h, w)


@pytest.mark.parametrize("x", [-19.5, -5.0, 0.3, 19.5])
def test_k3_is_exact_inside_the_clamp(x):
    logp = torch.tensor([x], dtype=torch.float64, requires_grad=True)
    value = kl_estimate(logp, torch.zeros(1, dtype=torch.float64), "k3")
    value.backward()
    assert value.item() == pytest.approx(math.exp(-x) - 1.0 + x, rel=1e-12)
    assert logp.grad.item() == pytest.approx(1.0 - math.exp(-x), rel=1e-12)


@pytest.mark.parametrize("x", [-1e3, -20.5, 20.5, 1e3])
def test_k3_beyond_the_clamp_is_its_value_at_the_bound(x):
    logp = torch.tensor([x], requires_grad=True)
    value = kl_estimate(logp, torch.zeros(1), "k3")
    value.backward()
    bound = math.copysign(LOG_RATIO_CLAMP, x)
    assert value.item() == pytest.approx(math.exp(-bound) - 1.0 + bound, rel=1e-6)
    assert logp.grad.item() == 0.0


@pytest.mark.parametrize("impl", ["torch", TRITON])
@pytest.mark.parametrize("estimator_term", ["ref_kl", "distill"])
def test_k3_near_the_bound_matches_the_reference(impl, estimator_term):
    """Log-ratios of -19.5 (exact k3 ~ 3e8, inside the clamp) and -25 / +30 (clamped) with ordinary ones."""
    tensors = make_vold_inputs(B=2, T=4, H=8, V=23, Ht=6, mask="ones")
    tensors = {k: v for k, v in tensors.items() if v is not None}
    key = "ref_logprobs" if estimator_term == "ref_kl" else "teacher_logprobs"
    with torch.no_grad():
        logp = fused_linear_logprobs(tensors["student_hidden"], tensors["student_weight"], tensors["targets"],
                                     impl="torch")
    shifted = tensors[key].clone()
    shifted[0, 0] = logp[0, 0] + 19.5
    shifted[0, 1] = logp[0, 1] + 25.0
    shifted[1, 2] = logp[1, 2] - 30.0
    tensors[key] = shifted
    if estimator_term == "ref_kl":
        options = dict(ref_kl_coef=1e-8, ref_kl_estimator="k3", distill_coef=0.1)
        tensors.pop("teacher_logprobs")
    else:
        options = dict(distill_coef=1e-8, distill_estimator="k3")
        tensors.pop("ref_logprobs")
    kernel = run_vold(vold_loss, tensors, dict(options, impl=impl))
    reference = run_vold(ref_vold_loss, tensors, options, cast=reference_cast())
    frac_key = "ref_kl_clamp_frac" if estimator_term == "ref_kl" else "distill_clamp_frac"
    assert kernel[1][frac_key].item() == pytest.approx(2 / 8)
    compare_vold(kernel, reference, FP32_TOL, required_metrics=(frac_key,))


# ---------------------------------------------------------------------------------------------------
# 3. bf16 inputs near convergence: fp32 logits
# ---------------------------------------------------------------------------------------------------


def _issue_case(noise: float, dtype=torch.bfloat16):
    torch.manual_seed(10)
    hs = torch.randn(64, 512).to(dtype)
    ws = (torch.randn(8192, 512) / math.sqrt(512) * 3).to(dtype)
    ht = (hs.float() + noise * torch.randn(64, 512)).to(dtype)
    return hs, ws, ht, ws


@pytest.mark.parametrize("impl", ENGINES)
@pytest.mark.parametrize("noise", [1.0, 0.1, 0.02, 0.0])
def test_bf16_divergence_gradient_near_convergence(impl, noise):
    """Issue 11's case: fused_linear_divergence(hs, Ws, ht, Wt).sum().backward() on bf16 inputs."""
    hs, ws, ht, wt = _issue_case(noise)
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    out = fused_linear_divergence(h, w, ht, wt, impl=impl, chunk_size=64)
    out.sum().backward()
    assert out.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    if noise == 0.0:  # teacher = student: exactly zero divergence and gradient
        assert bool((out == 0).all())
        assert bool((h.grad == 0).all()) and bool((w.grad == 0).all())
        return
    h64, w64 = leaf64(hs), leaf64(ws)
    ref = ref_divergence(h64, w64, leaf64(ht, False), leaf64(wt, False))
    ref.sum().backward()
    assert_rel(out, ref, BF16_TOL, "divergence", floor=0.0)
    assert_rel(h.grad, h64.grad, BF16_TOL, "grad hidden", floor=0.0, rounding=torch.bfloat16)
    assert_rel(w.grad, w64.grad, BF16_TOL, "grad weight", floor=0.0, rounding=torch.bfloat16)


@pytest.mark.parametrize("impl", ["torch", TRITON])
def test_fp16_divergence_gradient_near_convergence(impl):
    hs, ws, ht, wt = _issue_case(0.02, torch.float16)
    hs, ws, ht = hs[:16], ws[:2048], ht[:16]
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    out = fused_linear_divergence(h, w, ht, ws, impl=impl)
    out.sum().backward()
    h64, w64 = leaf64(hs), leaf64(ws)
    ref = ref_divergence(h64, w64, leaf64(ht, False), leaf64(ws, False))
    ref.sum().backward()
    assert_rel(out, ref, BF16_TOL, "divergence", floor=0.0)
    assert_rel(h.grad, h64.grad, BF16_TOL, "grad hidden", floor=0.0, rounding=torch.float16)
    assert_rel(w.grad, w64.grad, BF16_TOL, "grad weight", floor=0.0, rounding=torch.float16)


def test_cuda_split_gemm_path_is_exact(monkeypatch):
    """The CUDA path (bf16 GEMMs with an fp32 output, dz split into bf16 hi + lo), emulated on the CPU:
    ``mm_out_fp32`` replaced by an exactly-accumulated product rounded once to fp32."""
    import vold.kernels.chunked as chunked

    monkeypatch.setattr(chunked, "mm_has_out_dtype", lambda device, dtype: True)
    monkeypatch.setattr(chunked, "mm_out_fp32", lambda a, b: (a.double() @ b.double()).float())
    hs, ws, ht, wt = _issue_case(0.02)
    hs, ws, ht = hs[:16], ws[:2048], ht[:16]
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    bias = torch.randn(2048).bfloat16().requires_grad_()
    out = fused_linear_divergence(h, w, ht, ws, student_bias=bias, impl="torch")
    out.sum().backward()
    h64, w64, b64 = leaf64(hs), leaf64(ws), leaf64(bias)
    ref = ref_divergence(h64, w64, leaf64(ht, False), leaf64(ws, False), s_bias=b64)
    ref.sum().backward()
    assert_rel(out, ref, BF16_TOL, "divergence", floor=0.0)
    for name, got, want in (("hidden", h.grad, h64.grad), ("weight", w.grad, w64.grad), ("bias", bias.grad, b64.grad)):
        assert_rel(got, want, BF16_TOL, f"grad {name}", floor=0.0, rounding=torch.bfloat16)
