"""vold.kernels against the independent float64 reference (vold/kernels/reference.py): values and gradients.

fp32 inputs must agree with the float64 reference to ``FP32_TOL`` = 1e-5 of the largest magnitude of
each compared tensor; bf16/fp16 inputs to ``BF16_TOL`` = 1e-3 beyond the rounding of each returned
gradient to the input dtype (see helpers.py), against the reference evaluated on the same rounded
inputs; fp64 inputs compute in fp64 (``FP64_TOL`` = 1e-10). Every test runs on both engines; the Triton engine
runs under the interpreter on the CPU (tests/conftest.py), so shapes stay small (N <= 64, V <= 256).
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    BF16_TOL,
    FP32_TOL,
    FP64_TOL,
    IMPLS,
    assert_rel,
    compare_vold,
    make_vold_inputs,
    max_abs,
    randn,
    reference_cast,
    run_vold,
)

from vold.kernels import (
    FusedLinearDivergence,
    FusedLinearLogprobs,
    VoldLoss,
    fused_linear_divergence,
    fused_linear_logprobs,
    kl_estimate,
    vold_loss,
)
from vold.kernels.reference import (
    kl_estimator,
    leaf64,
    ref_divergence,
    ref_logprobs,
    ref_vold_loss,
)

H, V = 16, 97

# ---------------------------------------------------------------------------------------------------
# fused_linear_logprobs
# ---------------------------------------------------------------------------------------------------

LOGPROB_CASES = {
    "plain": {},
    "entropy": dict(return_entropy=True),
    "bias": dict(bias=True),
    "temperature": dict(temperature=0.7, return_entropy=True),
    "bias_temperature_chunk5": dict(bias=True, temperature=1.3, return_entropy=True, chunk_size=5),
    "vocab_size": dict(vocab_size=61, return_entropy=True, bias=True),
    "flat_tokens": dict(shape=(21,), return_entropy=True),
    "three_leading_dims": dict(shape=(2, 3, 4), return_entropy=True, bias=True),
    "chunk1": dict(chunk_size=1, return_entropy=True),
    "chunk_larger_than_n": dict(chunk_size=1000, return_entropy=True),
    "single_token": dict(shape=(1, 1), return_entropy=True, bias=True),
}


def _logprobs_case(case: dict, impl: str, dtype: torch.dtype, tol: float) -> None:
    case = dict(case)
    shape = case.pop("shape", (3, 7))
    use_bias = case.pop("bias", False)
    return_entropy = case.get("return_entropy", False)
    vocab = case.get("vocab_size") or V
    hidden = randn(*shape, H, dtype=dtype)
    weight = randn(V, H, dtype=dtype)
    bias = randn(V, dtype=dtype) if use_bias else None
    targets = torch.randint(0, vocab, shape)
    g_logp, g_ent = randn(*shape, scale=1.0), randn(*shape, scale=1.0)

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    if impl == "triton" and dtype == torch.float64:
        with pytest.raises(ValueError, match="impl='triton'"):
            fused_linear_logprobs(h, w, targets, bias=b, impl=impl, **case)
        return
    out = fused_linear_logprobs(h, w, targets, bias=b, impl=impl, **case)
    if return_entropy:
        assert isinstance(out, tuple) and len(out) == 2
        logp, entropy = out
    else:
        assert isinstance(out, torch.Tensor)
        logp, entropy = out, None
    acc = torch.promote_types(torch.float32, dtype)
    assert logp.shape == shape and logp.dtype == acc
    objective = (logp * g_logp).sum() + ((entropy * g_ent).sum() if return_entropy else 0.0)
    objective.backward()

    h64, w64, b64 = leaf64(hidden), leaf64(weight), leaf64(bias)
    r_logp, r_entropy = ref_logprobs(h64, w64, targets, b64, case.get("temperature", 1.0), case.get("vocab_size"))
    r_objective = (r_logp * g_logp.double()).sum() + ((r_entropy * g_ent.double()).sum() if return_entropy else 0.0)
    r_objective.backward()

    assert_rel(logp, r_logp, tol, "logp")
    if return_entropy:
        assert entropy.shape == shape and entropy.dtype == acc
        assert_rel(entropy, r_entropy, tol, "entropy")
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert_rel(h.grad, h64.grad, tol, "grad hidden", floor=0.0, rounding=dtype)
    assert_rel(w.grad, w64.grad, tol, "grad weight", floor=0.0, rounding=dtype)
    if bias is not None:
        assert_rel(b.grad, b64.grad, tol, "grad bias", floor=0.0, rounding=dtype)
    if vocab < V:  # rows outside [0, vocab_size) take no part
        assert bool((w.grad[vocab:] == 0).all())
        if bias is not None:
            assert bool((b.grad[vocab:] == 0).all())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", LOGPROB_CASES.values(), ids=LOGPROB_CASES.keys())
def test_logprobs_fp32(impl, case):
    _logprobs_case(case, impl, torch.float32, FP32_TOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "case",
    [dict(return_entropy=True, bias=True, chunk_size=8), dict(temperature=0.8, vocab_size=80, return_entropy=True)],
    ids=["bias_chunk8", "temperature_vocab"],
)
@pytest.mark.parametrize(
    "dtype,tol",
    [(torch.bfloat16, BF16_TOL), (torch.float16, BF16_TOL), (torch.float64, FP64_TOL)],
    ids=["bf16", "fp16", "fp64"],
)
def test_logprobs_other_dtypes(impl, case, dtype, tol):
    _logprobs_case(case, impl, dtype, tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_no_grad(impl):
    hidden, weight = randn(3, 7, H), randn(V, H)
    targets = torch.randint(0, V, (3, 7))
    with torch.no_grad():
        logp, entropy = fused_linear_logprobs(
            hidden.requires_grad_(), weight.requires_grad_(), targets, return_entropy=True, impl=impl
        )
    assert logp.grad_fn is None and not logp.requires_grad
    r_logp, r_entropy = ref_logprobs(leaf64(hidden, False), leaf64(weight, False), targets)
    assert_rel(logp, r_logp, FP32_TOL, "logp")
    assert_rel(entropy, r_entropy, FP32_TOL, "entropy")


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_only_weight_requires_grad(impl):
    """A frozen trunk (hidden without grad) still gets the lm_head's gradient right."""
    hidden, weight = randn(3, 7, H), randn(V, H)
    targets = torch.randint(0, V, (3, 7))
    w = weight.clone().requires_grad_()
    fused_linear_logprobs(hidden, w, targets, impl=impl).sum().backward()
    w64 = leaf64(weight)
    ref_logprobs(leaf64(hidden, False), w64, targets)[0].sum().backward()
    assert_rel(w.grad, w64.grad, FP32_TOL, "grad weight", floor=0.0)


def test_logprobs_module_form():
    hidden, weight, bias = randn(3, 7, H), randn(V, H), randn(V)
    targets = torch.randint(0, V, (3, 7))
    module = FusedLinearLogprobs(temperature=0.9, return_entropy=True, impl="torch", chunk_size=4)
    logp, entropy = module(hidden, weight, targets, bias=bias)
    logp2, entropy2 = fused_linear_logprobs(
        hidden, weight, targets, bias=bias, temperature=0.9, return_entropy=True, impl="torch", chunk_size=4
    )
    assert torch.equal(logp, logp2) and torch.equal(entropy, entropy2)


def test_logprobs_auto_impl_on_cpu_matches_torch():
    hidden, weight = randn(3, 7, H), randn(V, H)
    targets = torch.randint(0, V, (3, 7))
    auto = fused_linear_logprobs(hidden, weight, targets, impl="auto")
    torch_ = fused_linear_logprobs(hidden, weight, targets, impl="torch")
    assert_rel(auto, torch_, FP32_TOL, "auto vs torch")


# ---------------------------------------------------------------------------------------------------
# fused_linear_divergence
# ---------------------------------------------------------------------------------------------------

DIVERGENCE_CASES = {
    "default_reverse": {},
    "reverse_kl": dict(divergence="reverse_kl"),
    "forward_kl": dict(divergence="forward_kl"),
    "jsd_default_beta": dict(divergence="jsd"),
    "jsd_beta0.3": dict(divergence="jsd", beta=0.3),
    "jsd_beta0": dict(divergence="jsd", beta=0.0),
    "jsd_beta1": dict(divergence="jsd", beta=1.0),
    "reverse_biases_temperature": dict(divergence="reverse_kl", bias=True, teacher_bias=True, temperature=0.8),
    "forward_biases_temperature_chunk4": dict(
        divergence="forward_kl", bias=True, teacher_bias=True, temperature=1.5, chunk_size=4
    ),
    "jsd_everything_chunk1": dict(
        divergence="jsd", beta=0.7, bias=True, teacher_bias=True, temperature=0.6, chunk_size=1
    ),
    "teacher_vocab_bigger": dict(divergence="reverse_kl", Vt=110, vocab_size=V, teacher_bias=True),
    "student_vocab_bigger": dict(divergence="jsd", beta=0.3, Vs=120, vocab_size=V, bias=True),
    "common_prefix_vocab": dict(divergence="forward_kl", vocab_size=50),
    "flat_tokens": dict(divergence="reverse_kl", shape=(21,)),
}


def _divergence_case(case: dict, impl: str, dtype: torch.dtype, tol: float) -> None:
    case = dict(case)
    shape = case.pop("shape", (3, 7))
    vs, vt = case.pop("Vs", V), case.pop("Vt", V)
    use_bias, use_t_bias = case.pop("bias", False), case.pop("teacher_bias", False)
    hs, ht = 16, 12  # Hs != Ht
    s_hidden, s_weight = randn(*shape, hs, dtype=dtype), randn(vs, hs, dtype=dtype)
    t_hidden, t_weight = randn(*shape, ht, scale=0.8, dtype=dtype), randn(vt, ht, scale=0.8, dtype=dtype)
    s_bias = randn(vs, dtype=dtype) if use_bias else None
    t_bias = randn(vt, dtype=dtype) if use_t_bias else None
    cot = randn(*shape, scale=1.0)

    sh, sw = s_hidden.clone().requires_grad_(), s_weight.clone().requires_grad_()
    sb = None if s_bias is None else s_bias.clone().requires_grad_()
    th, tw = t_hidden.clone().requires_grad_(), t_weight.clone().requires_grad_()  # must get no gradient
    out = fused_linear_divergence(sh, sw, th, tw, student_bias=sb, teacher_bias=t_bias, impl=impl, **case)
    assert out.shape == shape and out.dtype == torch.promote_types(torch.float32, dtype)
    (out * cot).sum().backward()
    assert th.grad is None and tw.grad is None, "the teacher must be frozen"

    sh64, sw64, sb64 = leaf64(s_hidden), leaf64(s_weight), leaf64(s_bias)
    ref = ref_divergence(
        sh64, sw64, leaf64(t_hidden, False), leaf64(t_weight, False),
        case.get("divergence", "reverse_kl"), case.get("beta", 0.5), sb64, leaf64(t_bias, False),
        case.get("temperature", 1.0), case.get("vocab_size"),
    )
    (ref * cot.double()).sum().backward()
    assert_rel(out, ref, tol, "divergence")
    assert_rel(sh.grad, sh64.grad, tol, "grad student_hidden", floor=0.0, rounding=dtype)
    assert_rel(sw.grad, sw64.grad, tol, "grad student_weight", floor=0.0, rounding=dtype)
    if sb is not None:
        assert_rel(sb.grad, sb64.grad, tol, "grad student_bias", floor=0.0, rounding=dtype)
    vocab = case.get("vocab_size") or vs
    if vocab < vs:
        assert bool((sw.grad[vocab:] == 0).all())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", DIVERGENCE_CASES.values(), ids=DIVERGENCE_CASES.keys())
def test_divergence_fp32(impl, case):
    _divergence_case(case, impl, torch.float32, FP32_TOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "case",
    [
        dict(divergence="reverse_kl", bias=True, teacher_bias=True),
        dict(divergence="forward_kl", temperature=0.7),
        dict(divergence="jsd", beta=0.3, chunk_size=5),
    ],
    ids=["reverse", "forward", "jsd"],
)
def test_divergence_bf16(impl, case):
    _divergence_case(case, impl, torch.bfloat16, BF16_TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_jsd_endpoints_are_the_kls(impl):
    """Liger's convention: jsd with beta=0 is forward KL(q||p), beta=1 reverse KL(p||q)."""
    s_h, s_w, t_h, t_w = randn(21, 16), randn(V, 16), randn(21, 12), randn(V, 12)
    fwd = fused_linear_divergence(s_h, s_w, t_h, t_w, divergence="forward_kl", impl=impl)
    rev = fused_linear_divergence(s_h, s_w, t_h, t_w, divergence="reverse_kl", impl=impl)
    jsd0 = fused_linear_divergence(s_h, s_w, t_h, t_w, divergence="jsd", beta=0.0, impl=impl)
    jsd1 = fused_linear_divergence(s_h, s_w, t_h, t_w, divergence="jsd", beta=1.0, impl=impl)
    assert_rel(jsd0, fwd, FP32_TOL, "jsd(0) vs forward KL")
    assert_rel(jsd1, rev, FP32_TOL, "jsd(1) vs reverse KL")
    assert not torch.allclose(fwd, rev)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.4)])
def test_divergence_is_nonnegative_and_zero_for_identical_heads(impl, divergence, beta):
    s_h, s_w = randn(21, 16), randn(V, 16)
    t_h, t_w = randn(21, 12), randn(V, 12)
    d = fused_linear_divergence(s_h, s_w, t_h, t_w, divergence=divergence, beta=beta, impl=impl)
    assert bool((d > 0).all())
    h = s_h.clone().requires_grad_()
    same = fused_linear_divergence(h, s_w, s_h, s_w, divergence=divergence, beta=beta, impl=impl)
    same.sum().backward()
    assert max(max_abs(same), max_abs(h.grad)) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "divergence,beta,temperature",
    [("reverse_kl", 0.5, 1.0), ("forward_kl", 0.5, 1.0), ("jsd", 0.3, 1.0), ("jsd", 0.7, 0.5)],
    ids=["reverse_kl", "forward_kl", "jsd0.3", "jsd0.7_t0.5"],
)
@pytest.mark.parametrize("n,vocab", [(64, 256), (32, 32768)], ids=["V256", "V32768"])
def test_divergence_precision_wider_vocab(impl, divergence, beta, temperature, n, vocab):
    """The 1e-5 contract with more rows and a real vocabulary size (still well conditioned: logits std ~1).

    Catches cancellation in an engine's fp32 math, e.g. KL(p||q) formed as sum p log p - sum p log q
    (two sums of size ~log V whose difference is the small KL) instead of sum p (log p - log q).
    """
    g = torch.Generator().manual_seed(11)
    s_h, s_w = randn(n, 16, generator=g), randn(vocab, 16, generator=g)
    t_h, t_w = randn(n, 12, generator=g), randn(vocab, 12, generator=g)
    cot = torch.randn(n, generator=g)
    h, w = s_h.clone().requires_grad_(), s_w.clone().requires_grad_()
    out = fused_linear_divergence(h, w, t_h, t_w, divergence=divergence, beta=beta, temperature=temperature,
                                  impl=impl)
    (out * cot).sum().backward()
    h64, w64 = leaf64(s_h), leaf64(s_w)
    ref = ref_divergence(h64, w64, leaf64(t_h, False), leaf64(t_w, False), divergence, beta, temperature=temperature)
    (ref * cot.double()).sum().backward()
    assert_rel(out, ref, FP32_TOL, "divergence")
    assert_rel(h.grad, h64.grad, FP32_TOL, "grad student_hidden", floor=0.0)
    assert_rel(w.grad, w64.grad, FP32_TOL, "grad student_weight", floor=0.0)


def test_divergence_module_form():
    s_h, s_w, t_h, t_w = randn(3, 7, 16), randn(V, 16), randn(3, 7, 12), randn(V, 12)
    module = FusedLinearDivergence(divergence="jsd", beta=0.3, temperature=0.9, impl="torch", chunk_size=5)
    a = module(s_h, s_w, t_h, t_w)
    b = fused_linear_divergence(s_h, s_w, t_h, t_w, divergence="jsd", beta=0.3, temperature=0.9, impl="torch",
                                chunk_size=5)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# vold_loss
# ---------------------------------------------------------------------------------------------------

# id -> (vold_loss options, make_vold_inputs options, extra tensors passed: "teacher_logprobs" and/or
# "no_teacher_head" / "no_old" / "no_ref")
VOLD_CASES: dict[str, tuple[dict, dict, tuple[str, ...]]] = {
    # policy term alone, every loss_type, token and sequence level
    **{
        f"{lt}_{level}": (
            dict(loss_type=lt, importance_sampling_level=level, distill_coef=0.0), {}, ("no_teacher_head",)
        )
        for lt in ("grpo", "bnpo", "dr_grpo", "dapo")
        for level in ("token", "sequence")
    },
    "dr_grpo_max_completion_length": (dict(loss_type="dr_grpo", max_completion_length=11, distill_coef=0.0), {}, ()),
    "dapo_token_normalizer": (dict(loss_type="dapo", token_normalizer=37.0, distill_coef=0.0), {}, ()),
    "asymmetric_epsilons": (dict(epsilon_low=0.1, epsilon_high=0.5, distill_coef=0.0), {}, ()),
    "dual_clip": (dict(clip_ratio_c=3.0, distill_coef=0.0), dict(ratio_spread=2.0), ()),
    "dual_clip_grpo_per_token_adv": (dict(loss_type="grpo", clip_ratio_c=2.0), dict(adv_per_token=True), ()),
    "dual_clip_sequence": (
        dict(clip_ratio_c=1.5, importance_sampling_level="sequence", loss_type="grpo"), dict(ratio_spread=2.5), ()
    ),
    "on_policy_token": (dict(loss_type="bnpo"), dict(old=False), ()),
    "on_policy_sequence": (dict(loss_type="grpo", importance_sampling_level="sequence"), dict(old=False), ()),
    # reference KL
    "ref_k1": (dict(ref_kl_coef=0.05, ref_kl_estimator="k1"), {}, ()),
    "ref_k2": (dict(ref_kl_coef=0.05, ref_kl_estimator="k2"), {}, ()),
    "ref_k3": (dict(ref_kl_coef=0.05, ref_kl_estimator="k3", loss_type="grpo"), {}, ()),
    "ref_k3_sequence": (dict(ref_kl_coef=0.2, importance_sampling_level="sequence"), {}, ()),
    # distillation, exact over the vocabulary
    "full_reverse_kl": (dict(distill_coef=0.1), {}, ()),
    "full_reverse_kl_coef1": (dict(distill_coef=1.0, loss_type="grpo"), {}, ()),
    "full_forward_kl": (dict(distill_coef=0.3, divergence="forward_kl"), {}, ()),
    "full_jsd_0.3": (dict(distill_coef=0.3, divergence="jsd", jsd_beta=0.3), {}, ()),
    "full_jsd_0": (dict(distill_coef=0.3, divergence="jsd", jsd_beta=0.0), {}, ()),
    "full_jsd_1": (dict(distill_coef=0.3, divergence="jsd", jsd_beta=1.0), {}, ()),
    "full_teacher_bias_temperature": (dict(distill_coef=0.5, temperature=0.7), dict(teacher_bias=True, bias=True), ()),
    # distillation, sampled-token estimators
    **{
        f"{est}_teacher_logprobs": (dict(distill_coef=0.2, distill_estimator=est), {}, ("teacher_logprobs",))
        for est in ("k1", "k2", "k3")
    },
    **{
        f"{est}_teacher_head": (dict(distill_coef=0.2, distill_estimator=est, temperature=1.3), {}, ())
        for est in ("k1", "k2", "k3")
    },
    "k3_teacher_logprobs_no_head": (
        dict(distill_coef=0.2, distill_estimator="k3"), {}, ("teacher_logprobs", "no_teacher_head")
    ),
    "distill_mask_per_sequence": (dict(distill_coef=0.5), dict(distill_mask="seq"), ()),
    "distill_mask_per_token": (dict(distill_coef=0.5, distill_estimator="k2"), dict(distill_mask="token"), ()),
    # entropy bonus, temperature, vocabulary restriction
    "entropy_bonus": (dict(entropy_coef=0.01), {}, ()),
    "entropy_bonus_large": (dict(entropy_coef=0.3, loss_type="grpo", distill_coef=0.0), {}, ("no_teacher_head",)),
    "temperature": (dict(temperature=0.7, distill_coef=0.2, entropy_coef=0.05), {}, ()),
    "teacher_vocab_bigger": (dict(vocab_size=V, distill_coef=0.3), dict(Vt=110, teacher_bias=True), ()),
    "student_vocab_bigger": (dict(vocab_size=V, distill_coef=0.3), dict(V=120, Vt=V, bias=True), ()),
    "common_prefix_vocab": (dict(vocab_size=60, divergence="forward_kl"), dict(vocab=60), ()),
    # chunking, advantages and masks
    "chunk1": (dict(chunk_size=1, ref_kl_coef=0.1, entropy_coef=0.01), {}, ()),
    "chunk4_sequence": (dict(chunk_size=4, importance_sampling_level="sequence", loss_type="grpo"), {}, ()),
    "chunk5_jsd": (dict(chunk_size=5, divergence="jsd", jsd_beta=0.6), {}, ()),
    "advantages_per_token": (dict(loss_type="grpo"), dict(adv_per_token=True), ()),
    "fractional_mask": (dict(loss_type="grpo", ref_kl_coef=0.05), dict(mask="fractional"), ()),
    "fractional_mask_sequence": (dict(importance_sampling_level="sequence"), dict(mask="fractional"), ()),
    "student_bias": (dict(), dict(bias=True), ()),
    "everything": (
        dict(loss_type="grpo", importance_sampling_level="sequence", clip_ratio_c=2.5, epsilon_low=0.15,
             epsilon_high=0.4, ref_kl_coef=0.05, ref_kl_estimator="k2", distill_coef=0.4, divergence="jsd",
             jsd_beta=0.3, entropy_coef=0.02, temperature=0.9, vocab_size=V, chunk_size=6),
        dict(bias=True, teacher_bias=True, Vt=103, adv_per_token=True, distill_mask="seq"),
        (),
    ),
}


def _vold_case_inputs(inputs: dict, extras: tuple[str, ...]) -> dict:
    tensors = dict(inputs)
    if "teacher_logprobs" not in extras:
        tensors.pop("teacher_logprobs")
    if "no_teacher_head" in extras:
        for key in ("teacher_hidden", "teacher_weight", "teacher_bias"):
            tensors.pop(key)
    return {k: v for k, v in tensors.items() if v is not None}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", VOLD_CASES.values(), ids=VOLD_CASES.keys())
def test_vold_loss_fp32(impl, case):
    options, input_options, extras = case
    tensors = _vold_case_inputs(make_vold_inputs(**input_options), extras)
    required = []
    if options.get("ref_kl_coef", 0.0):
        required.append("ref_kl")
    if options.get("distill_coef", 0.1):
        required.append("distill_kl")
    kernel = run_vold(vold_loss, tensors, dict(options, impl=impl))
    reference = run_vold(ref_vold_loss, tensors, options, cast=reference_cast())
    compare_vold(kernel, reference, FP32_TOL, required_metrics=required)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "case",
    [
        (dict(loss_type="grpo", ref_kl_coef=0.05, distill_coef=0.3, entropy_coef=0.01), dict(bias=True)),
        (dict(importance_sampling_level="sequence", divergence="jsd", jsd_beta=0.3, chunk_size=4), {}),
        (dict(distill_estimator="k3", clip_ratio_c=3.0, temperature=0.8), dict(adv_per_token=True)),
    ],
    ids=["grpo_full", "sequence_jsd", "k3_dual_clip"],
)
def test_vold_loss_bf16(impl, case):
    options, input_options = case
    tensors = make_vold_inputs(**input_options)
    tensors.pop("teacher_logprobs")
    tensors = {k: v for k, v in tensors.items() if v is not None}
    bf16 = torch.bfloat16
    head_keys = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight",
                 "teacher_bias")
    low = {k: (v.to(bf16) if k in head_keys else v) for k, v in tensors.items()}
    kernel = run_vold(vold_loss, low, dict(options, impl=impl))
    for key, grad in kernel[2].items():
        assert grad.dtype == bf16, key
    reference = run_vold(ref_vold_loss, low, options, cast=reference_cast())
    compare_vold(kernel, reference, BF16_TOL)


def _pack(tensors: dict, lengths: list[int]) -> tuple[dict, torch.Tensor]:
    """Packed ``[N, ...]`` copies of the valid (first ``lengths[i]``) tokens of each padded row."""
    keep = torch.zeros(tensors["targets"].shape, dtype=torch.bool)
    for i, n in enumerate(lengths):
        keep[i, :n] = True
    packed = {}
    for key, value in tensors.items():
        if key in ("student_weight", "teacher_weight", "student_bias", "teacher_bias") or value.dim() == 1:
            packed[key] = value  # heads and per-sequence [B] tensors
        else:
            packed[key] = value[keep]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return packed, cu


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_vold_loss_packed_matches_padded(impl, loss_type, level):
    B, T = 4, 6
    lengths = [5, 0, 6, 2]  # an empty sequence too (still counts in B)
    tensors = make_vold_inputs(B=B, T=T, bias=True, distill_mask="token", mask="ones")
    tensors.pop("teacher_logprobs")
    tensors["mask"] = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()
    tensors = {k: v for k, v in tensors.items() if v is not None}
    options = dict(loss_type=loss_type, importance_sampling_level=level, ref_kl_coef=0.05, distill_coef=0.3,
                   entropy_coef=0.01, max_completion_length=T, chunk_size=3, impl=impl)
    padded = run_vold(vold_loss, tensors, options)
    packed_tensors, cu = _pack(tensors, lengths)
    packed_tensors.pop("mask")  # packed: every token counts
    packed = run_vold(vold_loss, dict(packed_tensors, cu_seqlens=cu), options)

    assert_rel(packed[0], padded[0], FP32_TOL, "loss")
    for key in padded[1]:
        assert_rel(packed[1][key], padded[1][key], FP32_TOL, f"metric {key}")
    valid = tensors["mask"].bool()
    g_pad, g_pack = padded[2], packed[2]
    assert bool((g_pad["student_hidden"][~valid] == 0).all()), "padding must get exactly zero gradient"
    assert_rel(g_pack["student_hidden"], g_pad["student_hidden"][valid], FP32_TOL, "grad hidden", floor=0.0)
    assert_rel(g_pack["student_weight"], g_pad["student_weight"], FP32_TOL, "grad weight", floor=0.0)
    assert_rel(g_pack["student_bias"], g_pad["student_bias"], FP32_TOL, "grad bias", floor=0.0)

    ref_options = {k: v for k, v in options.items() if k != "impl"}
    reference = run_vold(ref_vold_loss, dict(packed_tensors, cu_seqlens=cu), ref_options, cast=reference_cast())
    compare_vold(packed, reference, FP32_TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_vold_loss_masked_tokens_do_not_leak(impl):
    """Garbage (huge, finite) in masked positions of every per-token input changes nothing."""
    tensors = make_vold_inputs(adv_per_token=True, distill_mask="token")
    tensors = {k: v for k, v in tensors.items() if v is not None}
    options = dict(loss_type="grpo", ref_kl_coef=0.1, distill_coef=0.2, distill_estimator="k3",
                   importance_sampling_level="sequence", impl=impl)
    clean = run_vold(vold_loss, tensors, options)
    dirty_tensors = dict(tensors)
    masked = tensors["mask"] == 0
    assert bool(masked.any())
    for key, garbage in (("old_logprobs", -1e4), ("ref_logprobs", 1e4), ("teacher_logprobs", -1e4),
                         ("advantages", 1e6), ("distill_mask", 1e6)):
        dirty_tensors[key] = torch.where(masked, torch.full_like(tensors[key], garbage), tensors[key])
    dirty = run_vold(vold_loss, dirty_tensors, options)
    assert torch.equal(clean[0], dirty[0])
    for key in clean[1]:
        assert torch.equal(clean[1][key], dirty[1][key]), key
    for key in clean[2]:
        assert torch.equal(clean[2][key], dirty[2][key]), key


@pytest.mark.parametrize("impl", IMPLS)
def test_vold_loss_upstream_gradient_and_frozen_teacher(impl):
    tensors = {k: v for k, v in make_vold_inputs(bias=True, teacher_bias=True).items() if v is not None}
    tensors.pop("teacher_logprobs")
    options = dict(ref_kl_coef=0.05, distill_coef=0.3, impl=impl)
    base = run_vold(vold_loss, tensors, options)

    leaves = {k: (v.clone().requires_grad_() if v.is_floating_point() and "mask" not in k else v)
              for k, v in tensors.items()}
    loss, _ = vold_loss(**leaves, **options)
    (2.5 * loss).backward()
    for key in ("student_hidden", "student_weight", "student_bias"):
        assert_rel(leaves[key].grad, 2.5 * base[2][key], FP32_TOL, f"scaled grad {key}", floor=0.0)
    for key in ("teacher_hidden", "teacher_weight", "teacher_bias", "advantages", "old_logprobs", "ref_logprobs"):
        assert leaves[key].grad is None, f"{key} must not receive a gradient"


@pytest.mark.parametrize("impl", IMPLS)
def test_vold_loss_unit_upstream_gradient_is_not_aliased_across_backwards(impl):
    """``loss.backward()`` hands the gradients made in the forward to autograd without the ``g * 1`` pass. With
    the graph kept, a second backward must still see them unchanged: after the first, ``.grad`` is zeroed in
    place (as ``optimizer.zero_grad(set_to_none=False)`` does) and must come back equal, and accumulate."""
    tensors = {k: v for k, v in make_vold_inputs(bias=True).items() if v is not None}
    tensors.pop("teacher_logprobs")
    options = dict(ref_kl_coef=0.05, distill_coef=0.3, impl=impl)
    base = run_vold(vold_loss, tensors, options)
    keys = ("student_hidden", "student_weight", "student_bias")
    leaves = {k: (v.clone().requires_grad_() if k in keys else v) for k, v in tensors.items()}
    loss, _ = vold_loss(**leaves, **options)
    loss.backward(retain_graph=True)
    first = {k: leaves[k].grad.clone() for k in keys}
    for key in keys:
        assert_rel(first[key], base[2][key], FP32_TOL, f"grad {key}", floor=0.0)
        leaves[key].grad.zero_()
    loss.backward(retain_graph=True)
    for key in keys:
        assert torch.equal(leaves[key].grad, first[key]), key
    loss.backward()
    for key in keys:
        assert torch.allclose(leaves[key].grad, 2 * first[key], rtol=1e-6, atol=0), key
    # torch.autograd.grad returns what reaches the leaf uncopied (with the whole vocabulary, the weight's gradient
    # made in the forward): on a kept graph a second call still gives the same values, and after the first result
    # is changed in place (as clipping does) the next call either is still right or raises autograd's in-place
    # error, never a silently changed gradient
    params = [leaves[k] for k in keys]
    loss, _ = vold_loss(**leaves, **options)
    once = torch.autograd.grad(loss, params, retain_graph=True)
    again = torch.autograd.grad(loss, params, retain_graph=True)
    for key, g in zip(keys, again, strict=True):
        assert torch.equal(g, first[key]), key
    for g in once:
        g.mul_(0.5)
    try:
        third = torch.autograd.grad(loss, params)
    except RuntimeError as error:
        assert "modified by an inplace operation" in str(error), error
    else:
        for key, g in zip(keys, third, strict=True):
            assert torch.equal(g, first[key]), key
    # create_graph=True: the gradient is g * v, differentiable in the upstream gradient v, also at v = 1 (the
    # shortcut returned the forward's gradient, with no dependence on v: "element 0 of tensors does not require grad")
    for value in (1.0, 2.0):
        v = torch.tensor(value, requires_grad=True)
        loss, _ = vold_loss(**leaves, **options)
        g = torch.autograd.grad(loss, leaves["student_weight"], grad_outputs=v, create_graph=True)[0]
        (dv,) = torch.autograd.grad((g * first["student_weight"]).sum(), v)
        assert_rel(dv, (first["student_weight"] ** 2).sum(), FP32_TOL, f"d/dv at v={value}")


@pytest.mark.parametrize("impl", IMPLS)
def test_vold_loss_no_grad(impl):
    tensors = {k: v for k, v in make_vold_inputs().items() if v is not None}
    tensors.pop("teacher_logprobs")
    with torch.no_grad():
        loss, metrics = vold_loss(**tensors, impl=impl)
    ref_loss, ref_metrics = ref_vold_loss(**{k: reference_cast()(v) if v.is_floating_point() else v
                                             for k, v in tensors.items()})
    assert_rel(loss, ref_loss, FP32_TOL, "loss")
    assert_rel(metrics["distill_kl"], ref_metrics["distill_kl"], FP32_TOL, "distill_kl")


def test_vold_loss_module_form():
    tensors = {k: v for k, v in make_vold_inputs().items() if v is not None}
    tensors.pop("teacher_logprobs")
    options = dict(loss_type="grpo", ref_kl_coef=0.05, distill_coef=0.2, impl="torch", chunk_size=4)
    module = VoldLoss(**options)
    positional = [tensors.pop(k) for k in ("student_hidden", "student_weight", "targets", "advantages",
                                           "old_logprobs", "mask")]
    a, ma = module(*positional, **tensors)
    b, mb = vold_loss(*positional, **tensors, **options)
    assert torch.equal(a, b)
    assert ma.keys() == mb.keys()


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimate_matches_reference(estimator):
    logp = -torch.rand(50, dtype=torch.float64) * 5
    other = -torch.rand(50, dtype=torch.float64) * 5
    assert_rel(kl_estimate(logp, other, estimator), kl_estimator(logp, other, estimator), 1e-12, estimator)
    if estimator != "k1":
        assert bool((kl_estimate(logp, other, estimator) >= 0).all())


def test_reference_sanity():
    """The oracle itself: reverse KL and its k1 estimator agree in expectation over sampled tokens."""
    g = torch.Generator().manual_seed(1)
    s_h, s_w = randn(1, 8, generator=g, dtype=torch.float64), randn(13, 8, generator=g, dtype=torch.float64)
    t_h, t_w = randn(1, 8, generator=g, dtype=torch.float64), randn(13, 8, generator=g, dtype=torch.float64)
    exact = ref_divergence(s_h, s_w, t_h, t_w, "reverse_kl")
    logp_all = torch.log_softmax(s_h @ s_w.T, -1)[0]
    logq_all = torch.log_softmax(t_h @ t_w.T, -1)[0]
    for est in ("k1", "k3"):
        expectation = (logp_all.exp() * kl_estimator(logp_all, logq_all, est)).sum()
        assert_rel(expectation, exact[0], 1e-12, est)


# ---------------------------------------------------------------------------------------------------
# A realistic shape (torch engine): N = 2048 tokens, V = 32768, H = 64, fp32
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_realistic_shape_torch_engine():
    B, T, H_big, V_big, Ht = 4, 512, 64, 32768, 48
    g = torch.Generator().manual_seed(3)
    hidden = randn(B, T, H_big, scale=0.4, generator=g)
    weight = randn(V_big, H_big, scale=0.4, generator=g)
    targets = torch.randint(0, V_big, (B, T), generator=g)

    # fused_linear_logprobs with entropy
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, entropy = fused_linear_logprobs(h, w, targets, return_entropy=True, impl="torch")
    cot = randn(B, T, scale=1.0, generator=g)
    (logp * cot + 0.1 * entropy).sum().backward()
    h64, w64 = leaf64(hidden), leaf64(weight)
    r_logp, r_entropy = ref_logprobs(h64, w64, targets)
    (r_logp * cot.double() + 0.1 * r_entropy).sum().backward()
    assert_rel(logp, r_logp, FP32_TOL, "logp")
    assert_rel(entropy, r_entropy, FP32_TOL, "entropy")
    assert_rel(h.grad, h64.grad, FP32_TOL, "grad hidden", floor=0.0)
    assert_rel(w.grad, w64.grad, FP32_TOL, "grad weight", floor=0.0)
    del h64, w64, r_logp, r_entropy

    # vold_loss: GRPO + ref KL + full reverse KL to a teacher + entropy bonus
    with torch.no_grad():
        true_logp = logp.double()
    tensors = dict(
        student_hidden=hidden, student_weight=weight, targets=targets,
        advantages=torch.tensor([1.0, -0.5, 0.3, -1.2]),
        old_logprobs=(true_logp - (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5)).float(),
        ref_logprobs=(true_logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float(),
        mask=(torch.arange(T)[None, :] < torch.tensor([512, 300, 411, 77])[:, None]).float(),
        teacher_hidden=randn(B, T, Ht, scale=0.5, generator=g), teacher_weight=randn(V_big, Ht, scale=0.5, generator=g),
    )
    options = dict(loss_type="grpo", ref_kl_coef=0.05, distill_coef=0.2, entropy_coef=0.01)
    kernel = run_vold(vold_loss, tensors, dict(options, impl="torch"))
    reference = run_vold(ref_vold_loss, tensors, options, cast=reference_cast())
    compare_vold(kernel, reference, FP32_TOL, required_metrics=("ref_kl", "distill_kl"))


@pytest.mark.slow
@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
def test_realistic_shape_divergence_torch_engine(divergence, beta):
    n, h_dim, ht_dim, vocab = 2048, 64, 48, 32768
    g = torch.Generator().manual_seed(5)
    s_h, s_w = randn(n, h_dim, scale=0.4, generator=g), randn(vocab, h_dim, scale=0.4, generator=g)
    t_h, t_w = randn(n, ht_dim, scale=0.5, generator=g), randn(vocab, ht_dim, scale=0.5, generator=g)
    cot = torch.randn(n, generator=g)
    h, w = s_h.clone().requires_grad_(), s_w.clone().requires_grad_()
    out = fused_linear_divergence(h, w, t_h, t_w, divergence=divergence, beta=beta, impl="torch")
    (out * cot).sum().backward()
    h64, w64 = leaf64(s_h), leaf64(s_w)
    ref = ref_divergence(h64, w64, leaf64(t_h, False), leaf64(t_w, False), divergence, beta)
    (ref * cot.double()).sum().backward()
    assert_rel(out, ref, FP32_TOL, "divergence")
    assert_rel(h.grad, h64.grad, FP32_TOL, "grad student_hidden", floor=0.0)
    assert_rel(w.grad, w64.grad, FP32_TOL, "grad student_weight", floor=0.0)
