"""Hypothesis property tests: random shapes, chunk sizes and masks against the float64 reference.

Torch engine only (for speed). Shapes: B 1-4, T 1-9, V 5-70, H 1-12; chunk sizes from 1 to past N
(so most do not divide N); masks are arbitrary bit patterns, so fully masked rows, a single unmasked
token and the all-masked batch all occur; the options of ``vold_loss`` are drawn too.
Set ``VOLD_HYPOTHESIS_EXAMPLES`` to run more examples than the default 25. The examples are the same on every
run (tests/conftest.py loads a derandomized profile); ``--hypothesis-profile=vold-hunt`` draws new ones.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import (
    FP32_TOL,
    assert_rel,
    compare_vold,
    max_abs,
    randn,
    reference_cast,
    run_vold,
    unit_gradient_scale,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vold.kernels import fused_linear_logprobs, vold_loss
from vold.kernels.reference import leaf64, ref_logprobs, ref_vold_loss

# VOLD_HYPOTHESIS_EXAMPLES=500 for a longer hunt.
SETTINGS = settings(max_examples=int(os.environ.get("VOLD_HYPOTHESIS_EXAMPLES", "25")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def vold_problems(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 9))
    V = draw(st.integers(5, 70))
    H = draw(st.integers(1, 12))
    Ht = draw(st.integers(1, 12))
    n = B * T
    mask_bits = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    seed = draw(st.integers(0, 2**31 - 1))

    estimator = draw(st.sampled_from(["full", "k1", "k2", "k3"]))
    options = dict(
        loss_type=draw(st.sampled_from(["grpo", "bnpo", "dr_grpo", "dapo"])),
        importance_sampling_level=draw(st.sampled_from(["token", "sequence"])),
        epsilon_low=draw(st.sampled_from([0.1, 0.2])),
        epsilon_high=draw(st.sampled_from([0.2, 0.28, 0.5])),
        clip_ratio_c=draw(st.sampled_from([None, 1.5, 3.0])),
        ref_kl_coef=draw(st.sampled_from([0.0, 0.1])),
        ref_kl_estimator=draw(st.sampled_from(["k1", "k2", "k3"])),
        distill_coef=draw(st.sampled_from([0.0, 0.1, 1.0])),
        distill_estimator=estimator,
        entropy_coef=draw(st.sampled_from([0.0, 0.05])),
        temperature=draw(st.sampled_from([1.0, 0.7, 1.4])),
        chunk_size=draw(st.integers(1, n + 2)),
    )
    if estimator == "full":
        options["divergence"] = draw(st.sampled_from(["reverse_kl", "forward_kl", "jsd"]))
        options["jsd_beta"] = draw(st.sampled_from([0.0, 0.3, 0.5, 1.0]))
    layout = dict(
        bias=draw(st.booleans()),
        teacher_bias=draw(st.booleans()),
        adv_per_token=draw(st.booleans()),
        zero_advantages=draw(st.booleans()),
        distill_mask=draw(st.sampled_from([None, "seq", "token"])),
        old=draw(st.booleans()),
        teacher_logprobs=estimator != "full" and draw(st.booleans()),
        extra_teacher_vocab=draw(st.sampled_from([0, 3])),
    )
    return B, T, V, H, Ht, mask_bits, seed, options, layout


def _build(B, T, V, H, Ht, mask_bits, seed, layout) -> dict:
    g = torch.Generator().manual_seed(seed)
    Vt = V + layout["extra_teacher_vocab"]
    tensors = dict(
        student_hidden=randn(B, T, H, generator=g), student_weight=randn(V, H, generator=g),
        targets=torch.randint(0, V, (B, T), generator=g),
        mask=torch.tensor(mask_bits, dtype=torch.float32).view(B, T),
        teacher_hidden=randn(B, T, Ht, generator=g), teacher_weight=randn(Vt, Ht, generator=g),
    )
    if layout["bias"]:
        tensors["student_bias"] = randn(V, generator=g)
    if layout["teacher_bias"]:
        tensors["teacher_bias"] = randn(Vt, generator=g)
    with torch.no_grad():
        logp, _ = ref_logprobs(tensors["student_hidden"], tensors["student_weight"], tensors["targets"],
                               tensors.get("student_bias"))
    uniform = torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 1
    if layout["old"]:
        tensors["old_logprobs"] = (logp - 1.5 * uniform).float()
    tensors["ref_logprobs"] = (logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    if layout["teacher_logprobs"]:
        tensors["teacher_logprobs"] = (logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    shape = (B, T) if layout["adv_per_token"] else (B,)
    advantages = torch.randn(shape, generator=g)
    if layout["zero_advantages"]:
        advantages.view(-1)[::2] = 0.0
    tensors["advantages"] = advantages
    if layout["distill_mask"] == "seq":
        tensors["distill_mask"] = torch.rand(B, generator=g)
    elif layout["distill_mask"] == "token":
        tensors["distill_mask"] = torch.rand(B, T, generator=g)
    return tensors


@SETTINGS
@given(problem=vold_problems())
def test_vold_loss_random_problems(problem):
    B, T, V, H, Ht, mask_bits, seed, options, layout = problem
    tensors = _build(B, T, V, H, Ht, mask_bits, seed, layout)
    options = dict(options, vocab_size=V)
    kernel = run_vold(vold_loss, tensors, dict(options, impl="torch"))
    if not any(mask_bits):
        assert kernel[0].item() == 0.0
        for key, grad in kernel[2].items():
            assert bool((grad == 0).all()), key
        return
    reference = run_vold(ref_vold_loss, tensors, options, cast=reference_cast())
    # Random problems can make a gradient small by cancellation (e.g. logp ~ ref_logp in a k2 term):
    # gradients are then compared relative to the problem's natural gradient size (unit_gradient_scale).
    compare_vold(kernel, reference, FP32_TOL, grad_floor=unit_gradient_scale(ref_vold_loss, tensors, options))


@SETTINGS
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    V=st.integers(2, 70),
    H=st.integers(1, 12),
    chunk=st.integers(1, 130),
    temperature=st.sampled_from([1.0, 0.6, 2.0]),
    use_bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_logprobs_random_problems(shape, V, H, chunk, temperature, use_bias, seed):
    g = torch.Generator().manual_seed(seed)
    hidden, weight = randn(*shape, H, generator=g), randn(V, H, generator=g)
    bias = randn(V, generator=g) if use_bias else None
    targets = torch.randint(0, V, tuple(shape), generator=g)
    cot = torch.randn(*shape, generator=g)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, entropy = fused_linear_logprobs(h, w, targets, bias=bias, temperature=temperature, return_entropy=True,
                                          chunk_size=chunk, impl="torch")
    (logp * cot + entropy).sum().backward()
    h64, w64 = leaf64(hidden), leaf64(weight)
    r_logp, r_entropy = ref_logprobs(h64, w64, targets, leaf64(bias, False), temperature)
    (r_logp * cot.double() + r_entropy).sum().backward()
    assert_rel(logp, r_logp, FP32_TOL, "logp")
    assert_rel(entropy, r_entropy, FP32_TOL, "entropy")
    # Gradients relative to their natural size (a random row can make one small by cancellation):
    # dL/dz has entries of size ~ (|cot| + 1) / temperature, and dL/dh = dz W, dL/dW = dz^T h.
    coefficient = (max_abs(cot) + 1.0) / temperature
    assert_rel(h.grad, h64.grad, FP32_TOL, "grad hidden", floor=coefficient * max_abs(weight))
    assert_rel(w.grad, w64.grad, FP32_TOL, "grad weight", floor=coefficient * max_abs(hidden))


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_vold_loss_single_token(level, loss_type):
    """B = T = 1 (and a batch whose only unmasked token is one), with every term on."""
    g = torch.Generator().manual_seed(7)
    for B, T, only in ((1, 1, (0, 0)), (3, 4, (2, 1))):
        tensors = dict(
            student_hidden=randn(B, T, 8, generator=g), student_weight=randn(11, 8, generator=g),
            targets=torch.randint(0, 11, (B, T), generator=g), advantages=torch.tensor([-0.8, 0.5, 1.1][:B]),
            old_logprobs=-torch.rand(B, T, generator=g) * 3, ref_logprobs=-torch.rand(B, T, generator=g) * 3,
            mask=torch.zeros(B, T), teacher_hidden=randn(B, T, 5, generator=g),
            teacher_weight=randn(11, 5, generator=g),
        )
        tensors["mask"][only] = 1.0
        options = dict(loss_type=loss_type, importance_sampling_level=level, ref_kl_coef=0.1, distill_coef=0.5,
                       entropy_coef=0.05, clip_ratio_c=2.0)
        kernel = run_vold(vold_loss, tensors, dict(options, impl="torch"))
        reference = run_vold(ref_vold_loss, tensors, options, cast=reference_cast())
        compare_vold(kernel, reference, FP32_TOL)


def test_every_run_draws_the_same_examples():
    """A property test must not fail in CI on a draw no earlier run made (nor on one an earlier run left in an
    example database): the loaded profile (tests/conftest.py) is derandomized and keeps no database, so two runs
    of the same test draw the same examples. Skipped under ``--hypothesis-profile=vold-hunt`` (random draws on
    purpose: there it failed, one spurious failure in every hunt)."""
    current = getattr(settings, "get_current_profile_name", lambda: None)()  # hypothesis >= 6.84
    if current == "vold-hunt":
        pytest.skip("--hypothesis-profile=vold-hunt draws at random on purpose")
    assert settings().derandomize and settings().database is None
    assert SETTINGS.derandomize and SETTINGS.database is None
    runs = [_draw_examples(), _draw_examples()]
    assert len(runs[0]) == SETTINGS.max_examples and runs[0] == runs[1]


def _draw_examples() -> list:
    drawn = []

    @SETTINGS
    @given(problem=vold_problems())
    def draw(problem):
        drawn.append(problem)

    draw()
    return drawn
