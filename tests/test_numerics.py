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
import os

import pytest
import torch
from helpers import (
    BF16_TOL,
    FP32_TOL,
    TRITON,
    TRITON_MISSING,
    assert_rel,
    compare_vold,
    make_vold_inputs,
    reference_cast,
    run_vold,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vold.kernels import fused_linear_divergence, fused_linear_logprobs, kl_estimate, vold_loss
from vold.kernels.policy_loss import LOG_RATIO_CLAMP as KERNEL_CLAMP
from vold.kernels.reference import LOG_RATIO_CLAMP, leaf64, ref_divergence, ref_vold_loss

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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_split_gemm_path_is_exact(monkeypatch, dtype):
    """The CUDA path (bf16 GEMMs with an fp32 output, dz split into bf16 hi + lo), emulated on the CPU:
    ``mm_out_fp32`` replaced by an exactly-accumulated product rounded once to fp32."""
    import vold.kernels.common as common

    monkeypatch.setattr(common, "mm_has_out_dtype", lambda device, dtype: True)
    def mm_out_fp32(a, b, out=None):
        product = (a.double() @ b.double()).float()
        return product if out is None else out.copy_(product)

    monkeypatch.setattr(common, "mm_out_fp32", mm_out_fp32)
    hs, ws, ht, wt = _issue_case(0.02, dtype)
    hs, ws, ht = hs[:16], ws[:2048], ht[:16]
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    bias = torch.randn(2048).to(dtype).requires_grad_()
    out = fused_linear_divergence(h, w, ht, ws, student_bias=bias, impl="torch")
    (out.sum() * 1e-4).backward()  # small dz: fp16 would flush it to subnormals without the power-of-two scale
    h64, w64, b64 = leaf64(hs), leaf64(ws), leaf64(bias)
    ref = ref_divergence(h64, w64, leaf64(ht, False), leaf64(ws, False), s_bias=b64)
    (ref.sum() * 1e-4).backward()
    assert_rel(out, ref, BF16_TOL, "divergence", floor=0.0)
    for name, got, want in (("hidden", h.grad, h64.grad), ("weight", w.grad, w64.grad), ("bias", bias.grad, b64.grad)):
        assert_rel(got, want, BF16_TOL, f"grad {name}", floor=0.0, rounding=dtype)


# ---------------------------------------------------------------------------------------------------
# 4. float64 end to end: gradcheck
# ---------------------------------------------------------------------------------------------------

F64 = torch.float64


def _r64(*shape, generator, scale=0.7):
    return (torch.randn(*shape, generator=generator, dtype=F64) * scale)


def _gradcheck(fn, *inputs):
    inputs = tuple(None if x is None else x.detach().clone().requires_grad_(True) for x in inputs)
    args = tuple(x for x in inputs if x is not None)

    def wrapped(*xs):
        it = iter(xs)
        return fn(*(None if x is None else next(it) for x in inputs))

    assert torch.autograd.gradcheck(wrapped, args, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "torch_compile"])
@pytest.mark.parametrize(
    "case",
    [dict(), dict(temperature=0.7, bias=True), dict(vocab_size=5, bias=True, temperature=1.3),
     dict(logit_scale=1.7, final_logit_softcapping=1.5, bias=True)],
    ids=["plain", "temperature_bias", "vocab_size", "scale_softcap"],
)
def test_gradcheck_logprobs(impl, case):
    case = dict(case)
    g = torch.Generator().manual_seed(1)
    bias = _r64(7, generator=g) if case.pop("bias", False) else None
    vocab = case.get("vocab_size", 7)
    hidden, weight = _r64(2, 3, 4, generator=g), _r64(7, 4, generator=g)
    targets = torch.randint(0, vocab, (2, 3), generator=g)
    out = fused_linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, impl=impl, **case)
    assert out[0].dtype == out[1].dtype == F64
    _gradcheck(lambda h, w, b: fused_linear_logprobs(h, w, targets, bias=b, return_entropy=True, impl=impl,
                                                     chunk_size=6, **case), hidden, weight, bias)


@pytest.mark.parametrize(
    "case",
    [
        dict(divergence="reverse_kl"),
        dict(divergence="forward_kl", temperature=0.7, bias=True),
        dict(divergence="jsd", beta=0.3, bias=True),
        dict(divergence="jsd", beta=0.7, vocab_size=5, temperature=1.4),
    ],
    ids=["reverse", "forward_temperature_bias", "jsd", "jsd_vocab_size"],
)
def test_gradcheck_divergence(case):
    case = dict(case)
    g = torch.Generator().manual_seed(2)
    bias = _r64(7, generator=g) if case.pop("bias", False) else None
    sh, sw = _r64(2, 3, 4, generator=g), _r64(7, 4, generator=g)
    th, tw, tb = _r64(2, 3, 5, generator=g), _r64(7, 5, generator=g), _r64(7, generator=g)
    out = fused_linear_divergence(sh, sw, th, tw, student_bias=bias, teacher_bias=tb, impl="torch", **case)
    assert out.dtype == F64
    _gradcheck(lambda h, w, b: fused_linear_divergence(h, w, th, tw, student_bias=b, teacher_bias=tb, impl="torch",
                                                       chunk_size=4, **case), sh, sw, bias)


VOLD_GRADCHECK_CASES = {
    "grpo_token_full_reverse": dict(loss_type="grpo", ref_kl_coef=0.1, entropy_coef=0.05, distill_coef=0.5),
    "bnpo_sequence_full_forward": dict(loss_type="bnpo", importance_sampling_level="sequence",
                                       divergence="forward_kl", distill_coef=0.5),
    "dr_grpo_token_jsd_temperature": dict(loss_type="dr_grpo", divergence="jsd", jsd_beta=0.3, temperature=0.7,
                                          distill_coef=0.5, _bias=True),
    "dapo_sequence_k1_dual_clip": dict(importance_sampling_level="sequence", distill_estimator="k1",
                                       clip_ratio_c=2.0, ref_kl_coef=0.1, ref_kl_estimator="k2"),
    "dapo_token_k2_from_head": dict(distill_estimator="k2", distill_coef=0.5, _no_teacher_logprobs=True),
    "grpo_sequence_k3_vocab_size": dict(loss_type="grpo", importance_sampling_level="sequence",
                                        distill_estimator="k3", distill_coef=0.3, ref_kl_coef=0.1,
                                        ref_kl_estimator="k1", vocab_size=5, _bias=True),
    "dapo_token_full_packed": dict(distill_coef=0.5, entropy_coef=0.05, _packed=True, temperature=1.3),
    "grpo_sequence_k3_packed": dict(loss_type="grpo", importance_sampling_level="sequence",
                                    distill_estimator="k3", distill_coef=0.3, _packed=True),
    "dapo_token_full_softcap": dict(distill_coef=0.5, entropy_coef=0.05, student_logit_scale=1.5,
                                    student_final_logit_softcapping=1.2, teacher_final_logit_softcapping=0.9),
}
# old_logprobs=None (on-policy: ratio = exp(logp - logp.detach()) = 1 with the gradient of logp) is left out:
# its value does not move with logp, so finite differences cannot see the gradient it defines.


# every case on the torch engine; the packed ones (whole-chunk, so compiled) on torch_compile too
_VOLD_GRADCHECK_PARAMS = [pytest.param("torch", case, id=f"torch-{name}")
                          for name, case in VOLD_GRADCHECK_CASES.items()]
_VOLD_GRADCHECK_PARAMS += [pytest.param("torch_compile", case, id=f"torch_compile-{name}")
                           for name, case in VOLD_GRADCHECK_CASES.items() if case.get("_packed")]


@pytest.mark.parametrize("impl,case", _VOLD_GRADCHECK_PARAMS)
def test_gradcheck_vold_loss(impl, case):
    options = {k: v for k, v in case.items() if not k.startswith("_")}
    g = torch.Generator().manual_seed(3)
    B, T, H, V = 2, 3, 4, 7
    vocab = options.get("vocab_size", V)
    sh, sw = _r64(B, T, H, generator=g), _r64(V, H, generator=g)
    bias = _r64(V, generator=g) if case.get("_bias") else None
    targets = torch.randint(0, vocab, (B, T), generator=g)
    with torch.no_grad():
        logp = fused_linear_logprobs(sh, sw, targets, bias=bias, vocab_size=vocab, impl="torch")
    tensors = dict(
        targets=targets, advantages=torch.tensor([0.8, -0.6], dtype=F64),
        mask=torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=F64),
        teacher_hidden=_r64(B, T, 5, generator=g), teacher_weight=_r64(V, 5, generator=g),
        ref_logprobs=logp + 0.4 * torch.randn(B, T, generator=g, dtype=F64),
        teacher_logprobs=logp + 0.4 * torch.randn(B, T, generator=g, dtype=F64),
    )
    # ratios in [e^-0.9, e^0.9], away from the clip kinks by > 1e-3
    tensors["old_logprobs"] = logp - torch.tensor([[0.5, -0.9, 0.0], [0.05, 0.7, -0.4]], dtype=F64)
    if case.get("_no_teacher_logprobs"):
        tensors.pop("teacher_logprobs")
    if case.get("_packed"):
        keep = tensors.pop("mask") > 0
        tensors = {k: (v[keep] if v.shape[:2] == keep.shape else v) for k, v in tensors.items()}
        tensors["cu_seqlens"] = torch.tensor([0, 2, 5])
        sh = sh[keep]
    chunk = sh.reshape(-1, H).shape[0] if case.get("_packed") else 4
    loss, _ = vold_loss(sh, sw, student_bias=bias, impl=impl, chunk_size=chunk, **tensors, **options)
    assert loss.dtype == F64
    _gradcheck(lambda h, w, b: vold_loss(h, w, student_bias=b, impl=impl, chunk_size=chunk, **tensors,
                                         **options)[0], sh, sw, bias)


@pytest.mark.parametrize("fn", ["logprobs", "divergence", "vold_loss"])
def test_triton_float64_is_a_clear_error(fn):
    pytest.importorskip("triton")
    h, w, y = torch.zeros(1, 1, 4, dtype=F64), torch.zeros(3, 4, dtype=F64), torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="impl='triton'"):
        if fn == "logprobs":
            fused_linear_logprobs(h, w, y, impl="triton")
        elif fn == "divergence":
            fused_linear_divergence(h, w, h, w, impl="triton")
        else:
            vold_loss(h, w, y, torch.zeros(1, dtype=F64), teacher_hidden=h, teacher_weight=w, impl="triton")


# ---------------------------------------------------------------------------------------------------
# 5. fuzzing the kinds: extreme but legal inputs give finite outputs and gradients, or a ValueError
# ---------------------------------------------------------------------------------------------------

FUZZ_SETTINGS = settings(max_examples=int(os.environ.get("VOLD_FUZZ_EXAMPLES", "40")), deadline=None,
                         suppress_health_check=[HealthCheck.too_slow])
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
# Arguments whose name a ValueError may carry for a fuzzed input (a -inf teacher log-prob on a token that
# counts: the sampled-token KL to a teacher that gives the token probability 0 is +inf, not a number).
NAMED_ARGUMENTS = ("teacher_logprobs", "ref_logprobs", "old_logprobs")


@st.composite
def extreme_problems(draw):
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    V = draw(st.sampled_from([1, 2, 5, 9]))  # V = 1: a single vocabulary row
    H = draw(st.integers(1, 6))
    logits = draw(st.sampled_from(["normal", "equal", "scaled"]))
    scale = draw(st.sampled_from([1.0, 1e2, 1e3, 1e4])) if logits == "scaled" else 1.0
    offsets = {name: draw(st.sampled_from([0.0, 0.5, -1e3, 1e3, 89.0, -89.0, 19.9, -19.9]))
               for name in ("old", "ref", "teacher")}
    teacher_inf = draw(st.sampled_from(["none", "masked", "unmasked"]))
    estimator = draw(st.sampled_from(["full", "k1", "k2", "k3"]))
    options = dict(
        loss_type=draw(st.sampled_from(["grpo", "bnpo", "dr_grpo", "dapo"])),
        importance_sampling_level=draw(st.sampled_from(["token", "sequence"])),
        clip_ratio_c=draw(st.sampled_from([None, 3.0])),
        ref_kl_coef=draw(st.sampled_from([0.0, 0.1])),
        ref_kl_estimator=draw(st.sampled_from(["k1", "k2", "k3"])),
        distill_coef=draw(st.sampled_from([0.0, 0.1, 1.0])),
        distill_estimator=estimator,
        entropy_coef=draw(st.sampled_from([0.0, 0.01])),
        temperature=draw(st.sampled_from([1.0, 0.5, 2.0])),
        chunk_size=draw(st.integers(1, B * T + 1)),
    )
    if estimator == "full":
        options["divergence"] = draw(st.sampled_from(["reverse_kl", "forward_kl", "jsd"]))
    zero_advantages = draw(st.sampled_from(["none", "some", "all"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dtype, B, T, V, H, logits, scale, offsets, teacher_inf, options, zero_advantages, seed


def _extreme_inputs(dtype, B, T, V, H, logits, scale, offsets, teacher_inf, zero_advantages, seed):
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    hidden = torch.randn(B, T, H, generator=g, dtype=F64)
    weight = torch.randn(V, H, generator=g, dtype=F64)
    if logits == "equal":
        weight = weight[:1].expand(V, H).clone()  # every row the same: all logits equal
    elif logits == "scaled":  # logits of size ~scale (entries of hidden and weight ~sqrt(scale / H))
        hidden, weight = hidden * math.sqrt(scale / H), weight * math.sqrt(scale / H) * 1.7
    t_hidden, t_weight = torch.randn(B, T, H, generator=g, dtype=F64), torch.randn(V, H, generator=g, dtype=F64)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) < 0.7).to(F64)
    mask[0, 0] = 1.0
    with torch.no_grad():
        logp = ref_logprobs_of(hidden.to(dt), weight.to(dt), targets)
    jitter = torch.randn(B, T, generator=g, dtype=F64) * 0.3
    teacher = logp + offsets["teacher"] + jitter
    if teacher_inf == "masked" and bool((mask == 0).any()):
        teacher[mask == 0] = -math.inf
    elif teacher_inf == "unmasked":
        teacher[0, 0] = -math.inf
    advantages = torch.randn(B, generator=g, dtype=F64)
    if zero_advantages == "all":
        advantages.zero_()
    elif zero_advantages == "some":
        advantages[0] = 0.0
    return dict(
        student_hidden=hidden.to(dt), student_weight=weight.to(dt), targets=targets, advantages=advantages,
        old_logprobs=logp + offsets["old"] - jitter, mask=mask, ref_logprobs=logp + offsets["ref"] + jitter,
        teacher_logprobs=teacher, teacher_hidden=t_hidden.to(dt), teacher_weight=t_weight.to(dt),
    )


def ref_logprobs_of(hidden, weight, targets):
    return torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(-1, targets[..., None])[..., 0]


def _check_finite_or_named_error(impl, problem):
    dtype, B, T, V, H, logits, scale, offsets, teacher_inf, options, zero_advantages, seed = problem
    tensors = _extreme_inputs(dtype, B, T, V, H, logits, scale, offsets, teacher_inf, zero_advantages, seed)
    if options["distill_estimator"] == "full":
        tensors.pop("teacher_logprobs")  # unused by the exact divergence
    h = tensors.pop("student_hidden").requires_grad_(True)
    w = tensors.pop("student_weight").requires_grad_(True)
    try:
        loss, metrics = vold_loss(h, w, impl=impl, **tensors, **options)
        loss.backward()
    except ValueError as error:
        if "overflows float16" in str(error):  # a finite gradient beyond fp16's range: named, not inf
            assert dtype == "fp16" and ("student_hidden" in str(error) or "student_weight" in str(error))
            return
        assert any(name in str(error) for name in NAMED_ARGUMENTS), f"unnamed ValueError: {error}"
        assert teacher_inf == "unmasked", f"unexpected ValueError: {error}"
        return
    assert math.isfinite(loss.item()), f"loss {loss.item()}"
    for key, value in metrics.items():
        assert math.isfinite(value.item()), f"metric {key} = {value.item()}"
    for name, grad in (("student_hidden", h.grad), ("student_weight", w.grad)):
        assert grad is not None and grad.dtype == DTYPES[dtype], name
        assert bool(torch.isfinite(grad).all()), f"grad {name} has NaN/inf"
    # fused_linear_logprobs / fused_linear_divergence on the same heads
    hs, ws = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    logp, entropy = fused_linear_logprobs(hs, ws, tensors["targets"], return_entropy=True, impl=impl,
                                          temperature=options["temperature"])
    div = fused_linear_divergence(hs, ws, tensors["teacher_hidden"], tensors["teacher_weight"], impl=impl,
                                  divergence=options.get("divergence", "reverse_kl"),
                                  temperature=options["temperature"])
    try:
        (logp.sum() + entropy.sum() + div.sum()).backward()
    except ValueError as error:
        assert dtype == "fp16" and "overflows float16" in str(error), str(error)
        return
    for name, value in (("logp", logp), ("entropy", entropy), ("divergence", div), ("grad hidden", hs.grad),
                        ("grad weight", ws.grad)):
        assert bool(torch.isfinite(value).all()), f"{name} has NaN/inf"


@FUZZ_SETTINGS
@given(problem=extreme_problems())
def test_fuzz_extreme_inputs_torch(problem):
    _check_finite_or_named_error("torch", problem)


@settings(FUZZ_SETTINGS, max_examples=int(os.environ.get("VOLD_FUZZ_EXAMPLES", "10")))
@given(problem=extreme_problems().filter(lambda p: p[0] != "fp64"))
@pytest.mark.skipif(TRITON_MISSING, reason="triton is not installed")
def test_fuzz_extreme_inputs_triton(problem):
    _check_finite_or_named_error("triton", problem)


@pytest.mark.slow
@settings(FUZZ_SETTINGS, max_examples=int(os.environ.get("VOLD_FUZZ_EXAMPLES", "6")))
@given(problem=extreme_problems())
def test_fuzz_extreme_inputs_torch_compile(problem):
    _check_finite_or_named_error("torch_compile", problem)


@pytest.mark.parametrize("impl", ["torch", TRITON])
def test_fp16_gradient_beyond_its_range_is_a_named_error(impl):
    """Ratio e^19.9 (inside the clamp) with A < 0 on the unclipped branch: the exact gradient, ~4e8, is
    finite but does not fit fp16: a ValueError naming the input, never an inf gradient."""
    h = torch.full((1, 1, 2), 0.5, dtype=torch.float16, requires_grad=True)
    w = torch.tensor([[1.0, -1.0], [0.5, 2.0]], dtype=torch.float16, requires_grad=True)
    y = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        logp = fused_linear_logprobs(h, w, y, impl=impl)
    loss, _ = vold_loss(h, w, y, torch.tensor([-1.0]), logp - 19.9, distill_coef=0.0, impl=impl)
    assert math.isfinite(loss.item())
    with pytest.raises(ValueError, match="student_(hidden|weight) overflows float16"):
        loss.backward()
    # the same gradient in bf16 fits
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    loss, _ = vold_loss(hb, wb, y, torch.tensor([-1.0]), logp - 19.9, distill_coef=0.0, impl=impl)
    loss.backward()
    assert bool(torch.isfinite(hb.grad).all()) and float(hb.grad.abs().max()) > 1e7


@pytest.mark.parametrize("impl", ["torch", TRITON])
def test_fp16_overflow_of_a_scaled_backward_is_inf_for_the_loss_scaler(impl):
    """fp16 training scales the loss up (torch.amp.GradScaler, DeepSpeed's fp16 dynamic loss scaler: from 2^16)
    and relies on torch's rule that an overflowing gradient comes back as inf: it then skips the step and lowers
    its scale. A ValueError there stopped the run at its first overflow. So a backward scaled up (upstream
    gradient > 1) returns inf, in all three functions; one not scaled up still raises (the test above)."""
    torch.manual_seed(0)
    h = (torch.randn(1, 4, 8) * 4).half().requires_grad_()
    w = (torch.randn(16, 8) * 4).half().requires_grad_()
    ht, wt = torch.randn(1, 4, 8).half(), torch.randn(16, 8).half()
    y = torch.randint(0, 16, (1, 4))
    with torch.no_grad():
        old = fused_linear_logprobs(h, w, y, impl=impl)
    losses = {
        "vold_loss": lambda: vold_loss(h, w, y, torch.tensor([1.0]), old, teacher_hidden=ht, teacher_weight=wt,
                                       impl=impl)[0],
        "fused_linear_logprobs": lambda: fused_linear_logprobs(h, w, y, impl=impl).sum(),
        "fused_linear_divergence": lambda: fused_linear_divergence(h, w, ht, wt, impl=impl).sum(),
    }
    for name, loss_fn in losses.items():
        h.grad = w.grad = None
        loss_fn().backward()
        unscaled = max(float(h.grad.abs().max()), float(w.grad.abs().max()))
        assert 0 < unscaled < 65504 and bool(torch.isfinite(h.grad).all()), name
        h.grad = w.grad = None
        with pytest.warns(RuntimeWarning, match=r"overflows float16 and is returned as inf: the backward was scaled"):
            (loss_fn() * 2.0**16).backward()  # the scaled gradient, ~2^16 x unscaled, is beyond fp16's range
        assert 65504 / 2.0**16 < unscaled, name  # (so some element overflows)
        grads = torch.cat([h.grad.flatten(), w.grad.flatten()]).float()
        assert bool(torch.isinf(grads).any()) and not bool(torch.isnan(grads).any()), name
