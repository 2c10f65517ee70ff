"""``logit_scale`` (Cohere) and ``final_logit_softcapping`` (Gemma-2) for student and teacher in all three
functions: ``z' = c tanh(s z / c) / T`` (TRL's order), values and gradients against the float64 reference, on
every engine (Triton under the interpreter; torch_compile with chunk sizes that make it compile)."""

from __future__ import annotations

import pytest
import torch
from helpers import FP32_TOL, TRITON, assert_rel, compare_vold, make_vold_inputs, randn, reference_cast, run_vold

from vold.kernels import fused_linear_divergence, fused_linear_logprobs, vold_loss
from vold.kernels.reference import leaf64, ref_divergence, ref_logprobs, ref_vold_loss

ENGINES = ["torch", "torch_compile", TRITON]
# (logit_scale, final_logit_softcapping): Cohere-like scale, Gemma-2's cap of 30 with logits that reach it
# (hidden/weight scaled up so |z| ~ 30-60: the cap's curvature matters), both, and a tight cap of 3
TRANSFORMS = {"scale": (0.0625, None), "cap30": (1.0, 30.0), "scale_cap": (2.0, 30.0), "cap3": (0.7, 3.0)}


@pytest.mark.parametrize("impl", ENGINES)
@pytest.mark.parametrize("transform", TRANSFORMS.values(), ids=TRANSFORMS.keys())
def test_logprobs_transform(impl, transform):
    scale, cap = transform
    g = torch.Generator().manual_seed(5)
    hidden, weight = randn(3, 7, 16, generator=g, scale=2.5), randn(97, 16, generator=g, scale=2.5)
    bias = randn(97, generator=g)
    targets = torch.randint(0, 97, (3, 7), generator=g)
    h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    logp, entropy = fused_linear_logprobs(h, w, targets, bias=b, temperature=0.8, return_entropy=True, impl=impl,
                                          chunk_size=7, logit_scale=scale, final_logit_softcapping=cap)
    (logp.sum() + 0.3 * entropy.sum()).backward()
    h64, w64, b64 = leaf64(hidden), leaf64(weight), leaf64(bias)
    r_logp, r_entropy = ref_logprobs(h64, w64, targets, b64, 0.8, None, scale, cap)
    (r_logp.sum() + 0.3 * r_entropy.sum()).backward()
    assert_rel(logp, r_logp, FP32_TOL, "logp")
    assert_rel(entropy, r_entropy, FP32_TOL, "entropy")
    for name, got, want in (("hidden", h.grad, h64.grad), ("weight", w.grad, w64.grad), ("bias", b.grad, b64.grad)):
        assert_rel(got, want, FP32_TOL, f"grad {name}", floor=0.0)


@pytest.mark.parametrize("impl", ENGINES)
@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
def test_divergence_transforms_per_head(impl, divergence, beta):
    """Student: scale 2 and cap 30; teacher: scale 0.5 and cap 3 (each head its own transform)."""
    g = torch.Generator().manual_seed(6)
    sh, sw = randn(21, 16, generator=g, scale=2.5), randn(97, 16, generator=g, scale=2.5)
    th, tw = randn(21, 12, generator=g, scale=2.0), randn(97, 12, generator=g, scale=2.0)
    kwargs = dict(student_logit_scale=2.0, student_final_logit_softcapping=30.0, teacher_logit_scale=0.5,
                  teacher_final_logit_softcapping=3.0)
    h, w = sh.clone().requires_grad_(), sw.clone().requires_grad_()
    out = fused_linear_divergence(h, w, th, tw, divergence=divergence, beta=beta, temperature=1.3, impl=impl,
                                  chunk_size=7, **kwargs)
    out.sum().backward()
    h64, w64 = leaf64(sh), leaf64(sw)
    ref = ref_divergence(h64, w64, leaf64(th, False), leaf64(tw, False), divergence, beta, temperature=1.3, **kwargs)
    ref.sum().backward()
    assert_rel(out, ref, FP32_TOL, "divergence")
    assert_rel(h.grad, h64.grad, FP32_TOL, "grad hidden", floor=0.0)
    assert_rel(w.grad, w64.grad, FP32_TOL, "grad weight", floor=0.0)


@pytest.mark.parametrize("impl", ENGINES)
@pytest.mark.parametrize(
    "options",
    [dict(distill_coef=0.5, entropy_coef=0.05, ref_kl_coef=0.1),
     dict(distill_coef=0.5, distill_estimator="k3", importance_sampling_level="sequence"),
     dict(distill_coef=0.5, divergence="jsd", jsd_beta=0.3, temperature=0.7, importance_sampling_level="sequence")],
    ids=["full_reverse", "k3_from_teacher_head_sequence", "jsd_sequence"],
)
def test_vold_loss_transforms(impl, options):
    tensors = make_vold_inputs(B=3, T=7, H=16, V=97, Ht=12, bias=True, teacher_bias=True)
    tensors.pop("teacher_logprobs")
    for key in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight"):
        tensors[key] = tensors[key] * 5.0  # logits of size ~10-40: the caps bend them
    tensors = {k: v for k, v in tensors.items() if v is not None}
    options = dict(options, student_logit_scale=1.5, student_final_logit_softcapping=30.0,
                   teacher_logit_scale=0.8, teacher_final_logit_softcapping=5.0)
    kernel = run_vold(vold_loss, tensors, dict(options, impl=impl, chunk_size=4))
    reference = run_vold(ref_vold_loss, tensors, options, cast=reference_cast())
    compare_vold(kernel, reference, FP32_TOL)


def test_transforms_change_the_distribution_and_identity_is_the_default():
    g = torch.Generator().manual_seed(7)
    h, w = randn(5, 8, generator=g, scale=3.0), randn(11, 8, generator=g, scale=3.0)
    y = torch.randint(0, 11, (5,), generator=g)
    plain = fused_linear_logprobs(h, w, y, impl="torch")
    assert torch.equal(plain, fused_linear_logprobs(h, w, y, impl="torch", logit_scale=1.0))
    assert not torch.allclose(plain, fused_linear_logprobs(h, w, y, impl="torch", final_logit_softcapping=2.0))
    # scale s without a cap is temperature 1/s
    torch.testing.assert_close(fused_linear_logprobs(h, w, y, impl="torch", logit_scale=0.5),
                               fused_linear_logprobs(h, w, y, impl="torch", temperature=2.0))


@pytest.mark.parametrize(
    "kwargs,name",
    [(dict(logit_scale=0.0), "logit_scale"), (dict(logit_scale=float("inf")), "logit_scale"),
     (dict(final_logit_softcapping=-1.0), "final_logit_softcapping"),
     (dict(final_logit_softcapping=0.0), "final_logit_softcapping")],
)
def test_bad_transform_arguments_are_named(kwargs, name):
    h, w, y = torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=name):
        fused_linear_logprobs(h, w, y, **kwargs)
    prefixed = {f"teacher_{k}": v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=f"teacher_{name}"):
        fused_linear_divergence(h, w, h, w, **prefixed)
    with pytest.raises(ValueError, match=f"teacher_{name}"):
        vold_loss(h[None], w, y[None], torch.zeros(1), teacher_hidden=h[None], teacher_weight=w, **prefixed)
