"""Bad inputs: a ValueError (shape, value, option) or TypeError (dtype) whose message names the argument.

Also the degenerate-but-valid inputs: an empty mask gives a loss of exactly 0 with zero gradients.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import FP32_TOL, IMPLS, assert_rel, make_vold_inputs, randn, reference_cast, run_vold

from vold.kernels import fused_linear_divergence, fused_linear_logprobs, vold_loss
from vold.kernels.reference import ref_vold_loss

H, V = 16, 97


def _lp_inputs():
    return randn(3, 7, H), randn(V, H), torch.randint(0, V, (3, 7))


def _vold_inputs(**kw) -> dict:
    tensors = make_vold_inputs(**kw)
    return {k: v for k, v in tensors.items() if v is not None and k not in ("teacher_logprobs",)}


# ---------------------------------------------------------------------------------------------------
# fused_linear_logprobs
# ---------------------------------------------------------------------------------------------------


def test_logprobs_targets_shape_mismatch():
    hidden, weight, _ = _lp_inputs()
    with pytest.raises(ValueError, match="targets"):
        fused_linear_logprobs(hidden, weight, torch.randint(0, V, (3, 6)), impl="torch")
    with pytest.raises(ValueError, match="targets"):
        fused_linear_logprobs(hidden, weight, torch.randint(0, V, (21,)), impl="torch")


def test_logprobs_weight_hidden_size_mismatch():
    hidden, _, targets = _lp_inputs()
    with pytest.raises(ValueError, match="weight"):
        fused_linear_logprobs(hidden, randn(V, H + 1), targets, impl="torch")
    with pytest.raises(ValueError, match="weight"):
        fused_linear_logprobs(hidden, randn(V * H), targets, impl="torch")


def test_logprobs_bias_shape_and_dtype():
    hidden, weight, targets = _lp_inputs()
    with pytest.raises(ValueError, match="bias"):
        fused_linear_logprobs(hidden, weight, targets, bias=randn(V + 1), impl="torch")
    with pytest.raises(TypeError, match="bias"):
        fused_linear_logprobs(hidden, weight, targets, bias=randn(V, dtype=torch.bfloat16), impl="torch")


def test_logprobs_dtype_mismatch_and_integer_inputs():
    hidden, weight, targets = _lp_inputs()
    with pytest.raises(TypeError, match=r"hidden.*weight|weight.*hidden"):
        fused_linear_logprobs(hidden, weight.to(torch.bfloat16), targets, impl="torch")
    with pytest.raises(TypeError, match="hidden"):
        fused_linear_logprobs(torch.randint(0, 3, (3, 7, H)), weight, targets, impl="torch")
    with pytest.raises(TypeError, match="weight"):
        fused_linear_logprobs(hidden, torch.randint(0, 3, (V, H)), targets, impl="torch")
    with pytest.raises(TypeError, match="targets"):
        fused_linear_logprobs(hidden, weight, targets.float(), impl="torch")
    with pytest.raises(TypeError, match="hidden"):
        fused_linear_logprobs(hidden.tolist(), weight, targets, impl="torch")


@pytest.mark.parametrize("bad", [-1, V, V + 5])
def test_logprobs_targets_out_of_range(bad):
    hidden, weight, targets = _lp_inputs()
    targets[1, 3] = bad
    with pytest.raises(ValueError, match="targets"):
        fused_linear_logprobs(hidden, weight, targets, impl="torch")


def test_logprobs_targets_outside_restricted_vocab():
    hidden, weight, targets = _lp_inputs()
    targets[0, 0] = 70
    with pytest.raises(ValueError, match="targets"):
        fused_linear_logprobs(hidden, weight, targets, vocab_size=60, impl="torch")


@pytest.mark.parametrize("vocab_size", [0, -3, V + 1])
def test_logprobs_bad_vocab_size(vocab_size):
    hidden, weight, targets = _lp_inputs()
    with pytest.raises(ValueError, match="vocab_size"):
        fused_linear_logprobs(hidden, weight, targets % 1, vocab_size=vocab_size, impl="torch")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter on inf inputs
def test_logprobs_non_finite_hidden(impl, value):
    hidden, weight, targets = _lp_inputs()
    hidden[2, 4, 5] = value
    with pytest.raises(ValueError, match="hidden"):
        fused_linear_logprobs(hidden, weight, targets, impl=impl)
    logp = fused_linear_logprobs(hidden, weight, targets, impl=impl, check_finite=False)  # no check, no error
    assert logp.shape == (3, 7)
    assert bool(torch.isfinite(logp[:2]).all())  # other rows unaffected


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_logprobs_bad_temperature(temperature):
    hidden, weight, targets = _lp_inputs()
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_logprobs(hidden, weight, targets, temperature=temperature, impl="torch")


@pytest.mark.parametrize("impl", ["cuda", "Torch", ""])
def test_logprobs_bad_impl(impl):
    hidden, weight, targets = _lp_inputs()
    with pytest.raises(ValueError, match="impl"):
        fused_linear_logprobs(hidden, weight, targets, impl=impl)


# ---------------------------------------------------------------------------------------------------
# fused_linear_divergence
# ---------------------------------------------------------------------------------------------------


def _div_inputs(vs=V, vt=V):
    return randn(3, 7, 16), randn(vs, 16), randn(3, 7, 12), randn(vt, 12)


@pytest.mark.parametrize("vs,vt", [(V, V + 13), (V + 13, V)])
def test_divergence_vocab_mismatch_needs_vocab_size(vs, vt):
    s_h, s_w, t_h, t_w = _div_inputs(vs, vt)
    with pytest.raises(ValueError, match="vocab"):
        fused_linear_divergence(s_h, s_w, t_h, t_w, impl="torch")
    out = fused_linear_divergence(s_h, s_w, t_h, t_w, vocab_size=V, impl="torch")
    assert out.shape == (3, 7) and bool(torch.isfinite(out).all())
    with pytest.raises(ValueError, match="vocab_size"):
        fused_linear_divergence(s_h, s_w, t_h, t_w, vocab_size=V + 1, impl="torch")


def test_divergence_token_dims_mismatch():
    s_h, s_w, _, t_w = _div_inputs()
    with pytest.raises(ValueError, match="teacher_hidden"):
        fused_linear_divergence(s_h, s_w, randn(3, 6, 12), t_w, impl="torch")


def test_divergence_teacher_head_mismatch():
    s_h, s_w, t_h, _ = _div_inputs()
    with pytest.raises(ValueError, match="teacher_"):
        fused_linear_divergence(s_h, s_w, t_h, randn(V, 13), impl="torch")
    with pytest.raises(TypeError, match="teacher_"):
        fused_linear_divergence(s_h, s_w, t_h, randn(V, 12, dtype=torch.bfloat16), impl="torch")


def test_divergence_bad_options():
    s_h, s_w, t_h, t_w = _div_inputs()
    with pytest.raises(ValueError, match="divergence"):
        fused_linear_divergence(s_h, s_w, t_h, t_w, divergence="kl", impl="torch")
    for beta in (-0.1, 1.5):
        with pytest.raises(ValueError, match="beta"):
            fused_linear_divergence(s_h, s_w, t_h, t_w, divergence="jsd", beta=beta, impl="torch")
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_divergence(s_h, s_w, t_h, t_w, temperature=0.0, impl="torch")
    with pytest.raises(ValueError, match="impl"):
        fused_linear_divergence(s_h, s_w, t_h, t_w, impl="gpu")


def test_divergence_non_finite():
    s_h, s_w, t_h, t_w = _div_inputs()
    t_h[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="teacher_hidden"):
        fused_linear_divergence(s_h, s_w, t_h, t_w, impl="torch")
    s_h[0, 0, 0] = math.inf
    with pytest.raises(ValueError, match="student_hidden"):
        fused_linear_divergence(s_h, s_w, t_h, t_w, impl="torch")
    fused_linear_divergence(s_h, s_w, t_h, t_w, impl="torch", check_finite=False)


# ---------------------------------------------------------------------------------------------------
# vold_loss
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,bad_shape",
    [("mask", (3, 6)), ("old_logprobs", (3, 8)), ("ref_logprobs", (21,)), ("targets", (3, 6)),
     ("advantages", (4,)), ("advantages", (3, 7, 1)), ("distill_mask", (2,)), ("distill_mask", (7, 3)),
     ("teacher_logprobs", (3, 6))],
)
def test_vold_loss_shape_mismatch(key, bad_shape):
    tensors = _vold_inputs()
    tensors[key] = torch.zeros(bad_shape, dtype=torch.long if key == "targets" else torch.float32)
    options = dict(distill_estimator="k3") if key == "teacher_logprobs" else {}
    with pytest.raises(ValueError, match=key):
        vold_loss(**tensors, impl="torch", **options)


def test_vold_loss_teacher_token_dims_mismatch():
    tensors = _vold_inputs()
    tensors["teacher_hidden"] = randn(3, 6, 12)
    with pytest.raises(ValueError, match="teacher_hidden"):
        vold_loss(**tensors, impl="torch")


def test_vold_loss_dtype_errors():
    tensors = _vold_inputs()
    with pytest.raises(TypeError, match="student_"):
        vold_loss(**dict(tensors, student_weight=tensors["student_weight"].to(torch.bfloat16)), impl="torch")
    with pytest.raises(TypeError, match="student_hidden"):
        vold_loss(**dict(tensors, student_hidden=torch.ones(3, 7, H, dtype=torch.long)), impl="torch")
    with pytest.raises(TypeError, match="targets"):
        vold_loss(**dict(tensors, targets=tensors["targets"].float()), impl="torch")
    with pytest.raises(TypeError, match="advantages"):
        vold_loss(**dict(tensors, advantages=[1.0, -1.0, 0.5]), impl="torch")


@pytest.mark.parametrize("bad", [-1, V])
def test_vold_loss_targets_out_of_range(bad):
    tensors = _vold_inputs()
    tensors["targets"][2, 6] = bad
    with pytest.raises(ValueError, match="targets"):
        vold_loss(**tensors, impl="torch")


@pytest.mark.parametrize(
    "option,value",
    [("loss_type", "ppo"), ("loss_type", "GRPO"), ("importance_sampling_level", "batch"),
     ("ref_kl_estimator", "k4"), ("distill_estimator", "k5"), ("divergence", "kl"), ("impl", "cuda")],
)
def test_vold_loss_bad_option_strings(option, value):
    with pytest.raises(ValueError, match=option):
        vold_loss(**_vold_inputs(), **{"impl": "torch", option: value})


@pytest.mark.parametrize(
    "options,match",
    [(dict(epsilon_low=-0.1), "^epsilon_low must be in"), (dict(epsilon_high=-0.1), "^epsilon_high must be >= 0"),
     # 1 - epsilon_low <= 0: the lower clip bound was below every ratio (meaningless), silently
     (dict(epsilon_low=1.0), "^epsilon_low must be in"), (dict(epsilon_low=1.5), "^epsilon_low must be in"),
     (dict(epsilon_low=math.nan), "^epsilon_low must be in"), (dict(epsilon_high=math.nan), "^epsilon_high"),
     (dict(clip_ratio_c=0.5), "clip_ratio_c"), (dict(clip_ratio_c=1.0), "clip_ratio_c"),
     (dict(temperature=0.0), "temperature"),
     (dict(divergence="jsd", jsd_beta=1.2), "beta"), (dict(loss_type="dapo", token_normalizer=0.0), "token_normalizer"),
     (dict(ref_kl_coef=0.1), "ref_logprobs"),
     # a non-finite coefficient used to give a NaN/inf loss silently (entropy_coef=inf: loss inf, no error)
     (dict(ref_kl_coef=math.nan), "ref_kl_coef must be finite"),
     (dict(distill_coef=math.inf), "distill_coef must be finite"),
     (dict(entropy_coef=-math.inf), "entropy_coef must be finite"),
     (dict(chunk_size=0), "chunk_size"), (dict(chunk_size=-4), "chunk_size")],
)
def test_vold_loss_bad_values(options, match):
    tensors = _vold_inputs()
    if "ref_logprobs" == match:
        tensors.pop("ref_logprobs")
    with pytest.raises(ValueError, match=match):
        vold_loss(**tensors, impl="torch", **options)


def test_vold_loss_distill_full_without_teacher():
    tensors = {k: v for k, v in _vold_inputs().items() if not k.startswith("teacher_")}
    with pytest.raises(ValueError, match="distill_estimator"):
        vold_loss(**tensors, distill_coef=0.1, distill_estimator="full", impl="torch")
    with pytest.raises(ValueError, match="teacher"):
        vold_loss(**tensors, distill_coef=0.1, distill_estimator="k3", impl="torch")
    loss, _ = vold_loss(**tensors, distill_coef=0.0, impl="torch")  # no distillation asked: fine
    assert torch.isfinite(loss)


def test_vold_loss_estimator_with_other_divergence():
    with pytest.raises(ValueError, match="divergence"):
        vold_loss(**_vold_inputs(), distill_estimator="k3", divergence="forward_kl", impl="torch")


def test_vold_loss_half_a_teacher():
    tensors = _vold_inputs()
    tensors.pop("teacher_weight")
    with pytest.raises(ValueError, match="teacher_hidden and teacher_weight"):
        vold_loss(**tensors, impl="torch")


@pytest.mark.parametrize("impl", IMPLS)
def test_vold_loss_vocab_mismatch(impl):
    tensors = _vold_inputs(Vt=V + 11)
    with pytest.raises(ValueError, match="vocab"):
        vold_loss(**tensors, impl=impl)
    options = dict(vocab_size=V, distill_coef=0.3)
    kernel = run_vold(vold_loss, tensors, dict(options, impl=impl))
    reference = run_vold(ref_vold_loss, tensors, options, cast=reference_cast())
    assert_rel(kernel[0], reference[0], FP32_TOL, "loss")
    assert_rel(kernel[2]["student_weight"], reference[2]["student_weight"], FP32_TOL, "grad weight", floor=0.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "key,match",
    [("student_hidden", "student_hidden"), ("teacher_hidden", "teacher_hidden"), ("advantages", "advantages"),
     ("old_logprobs", "old_logprobs"), ("ref_logprobs", "ref_logprobs"), ("mask", "mask")],
)
def test_vold_loss_non_finite(impl, key, match):
    tensors = _vold_inputs(mask="ones")
    bad = tensors[key].clone()
    bad.view(-1)[1] = math.nan
    tensors[key] = bad
    options = dict(ref_kl_coef=0.1, impl=impl)
    with pytest.raises(ValueError, match=match):
        vold_loss(**tensors, **options)
    vold_loss(**tensors, **options, check_finite=False)  # no check, no error


@pytest.mark.parametrize("check_finite", [True, False])
@pytest.mark.parametrize(
    "key,layout",
    [("mask", "token"), ("distill_mask", "seq"), ("distill_mask", "token")],
)
def test_vold_loss_negative_weights(key, layout, check_finite):
    """A negative mask / distill_mask weight flipped the sign of that token's loss silently; now it is named.

    Fractional weights in [0, inf) stay valid, and a distill_mask weight of a token that does not count (mask 0)
    is never read (as for its NaN check)."""
    tensors = _vold_inputs(mask="fractional", distill_mask="token" if layout == "token" else "seq")
    options = dict(impl="torch", distill_coef=0.3, check_finite=check_finite)
    loss, _ = vold_loss(**tensors, **options)  # fractional weights: fine
    assert torch.isfinite(loss)
    bad = tensors[key].clone()
    bad.view(-1)[0] = -0.5  # sequence 0 / token (0, 0): counts (mask[0, 0] > 0)
    with pytest.raises(ValueError, match=f"^{key} must be >= 0"):
        vold_loss(**dict(tensors, **{key: bad}), **options)
    if key == "distill_mask" and layout == "token":
        hidden_token = tensors["mask"] == 0
        assert bool(hidden_token.any())
        ignored = torch.where(hidden_token, torch.full_like(tensors[key], -3.0), tensors[key])
        assert_rel(vold_loss(**dict(tensors, distill_mask=ignored), **options)[0], loss, 0.0, "loss")


def test_vold_loss_layout_errors():
    tensors = _vold_inputs()
    flat = {k: (v.reshape(-1, v.shape[-1]) if k.endswith("_hidden") else v) for k, v in tensors.items()}
    with pytest.raises(ValueError, match="student_hidden"):
        vold_loss(**flat, impl="torch")  # [N, H] without cu_seqlens
    with pytest.raises(ValueError, match="student_hidden"):
        vold_loss(**tensors, cu_seqlens=torch.tensor([0, 7, 14, 21]), impl="torch")  # [B, T, H] with cu_seqlens
    packed = {k: (v.reshape(-1, *v.shape[2:]) if v.dim() >= 2 and not k.endswith("_weight") else v)
              for k, v in tensors.items()}
    for bad in (torch.tensor([0, 7, 14, 20]), torch.tensor([1, 7, 14, 21]), torch.tensor([0, 9, 7, 21]),
                torch.tensor([0.0, 7.0, 14.0, 21.0]), torch.tensor([21])):
        with pytest.raises(ValueError, match="cu_seqlens"):
            vold_loss(**packed, cu_seqlens=bad, impl="torch")
    loss, _ = vold_loss(**packed, cu_seqlens=torch.tensor([0, 7, 14, 21]), max_completion_length=7, impl="torch")
    with pytest.raises(ValueError, match="max_completion_length"):
        vold_loss(**packed, cu_seqlens=torch.tensor([0, 7, 14, 21]), loss_type="dr_grpo", impl="torch")


# ---------------------------------------------------------------------------------------------------
# Empty mask: loss exactly 0, gradients exactly 0, never NaN
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_vold_loss_empty_mask(impl, loss_type, level):
    tensors = _vold_inputs(bias=True)
    tensors["mask"] = torch.zeros_like(tensors["mask"])
    options = dict(loss_type=loss_type, importance_sampling_level=level, ref_kl_coef=0.1, distill_coef=0.3,
                   entropy_coef=0.01, impl=impl)
    loss, metrics, grads = run_vold(vold_loss, tensors, options)
    assert loss.item() == 0.0
    for key, value in metrics.items():
        assert bool(torch.isfinite(value).all()), f"metric {key} = {value}"
    for key, grad in grads.items():
        assert grad is not None and bool((grad == 0).all()), f"grad {key} not exactly zero"


@pytest.mark.parametrize("impl", IMPLS)
def test_vold_loss_empty_packed_batch(impl):
    """N = 0 tokens (packed, every sequence empty): loss 0, zero gradients."""
    h = torch.zeros(0, H, requires_grad=True)
    w = randn(V, H).requires_grad_()
    loss, metrics = vold_loss(h, w, torch.zeros(0, dtype=torch.long), torch.ones(2), cu_seqlens=torch.tensor([0, 0, 0]),
                              teacher_hidden=torch.zeros(0, 12), teacher_weight=randn(V, 12), impl=impl)
    loss.backward()
    assert loss.item() == 0.0
    assert h.grad.shape == (0, H)
    assert bool((w.grad == 0).all())
    for key, value in metrics.items():
        assert bool(torch.isfinite(value).all()), f"metric {key} = {value}"


def test_all_masked_batch_reports_the_same_metric_names_as_zeros():
    h, w = torch.randn(2, 3, 4, requires_grad=True), torch.randn(9, 4)
    common = dict(teacher_hidden=torch.randn(2, 3, 4), teacher_weight=w, ref_logprobs=torch.zeros(2, 3),
                  ref_kl_coef=0.1, impl="torch")
    y, adv = torch.zeros(2, 3, dtype=torch.long), torch.ones(2)
    _, full = vold_loss(h, w, y, adv, **common)
    loss, empty = vold_loss(h, w, y, adv, mask=torch.zeros(2, 3), **common)
    assert sorted(empty) == sorted(full)
    assert all(float(v) == 0.0 for v in empty.values())
    assert float(loss) == 0.0


@pytest.mark.parametrize("chunk_size", [0, -5, 2.5, True])
@pytest.mark.parametrize("fn", ["logprobs", "divergence"])
def test_bad_chunk_size_is_named(fn, chunk_size):
    # chunk_size=-5 used to skip the chunk loop: fused_linear_divergence returned zeros, logprobs uninitialised memory
    hidden, weight, targets = _lp_inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        if fn == "logprobs":
            fused_linear_logprobs(hidden, weight, targets, impl="torch", chunk_size=chunk_size)
        else:
            fused_linear_divergence(hidden, weight, hidden, weight, impl="torch", chunk_size=chunk_size)


def test_triton_on_cpu_tensors_is_a_named_error(monkeypatch):
    # without the check Triton failed in its launcher with "0 active drivers ([])"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, weight, targets = (t.cpu() for t in _lp_inputs())  # CPU even when VOLD_TEST_DEVICE=cuda
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        fused_linear_logprobs(hidden, weight, targets, impl="triton")


# ---------------------------------------------------------------------------------------------------
# scalar options of all three functions: a real, finite number in range, named when it is not
# ---------------------------------------------------------------------------------------------------

# (function, option, value that must be refused, error type, message start). Before: temperature=inf ran (a
# uniform distribution), epsilon_high / clip_ratio_c / token_normalizer = inf ran (no clip; a zero loss), and a
# string gave "'>' not supported between instances of 'str' and 'int'", naming nothing; jsd_beta's error said
# "beta" (fused_linear_divergence's name), not vold_loss's "jsd_beta".
_SCALAR_CASES = [
    *[(fn, "temperature", bad, kind, "temperature must be")
      for fn in ("logprobs", "divergence", "vold_loss")
      for bad, kind in ((math.inf, ValueError), ("1.0", TypeError), (True, TypeError), (None, TypeError),
                        (torch.ones(2), TypeError))],
    ("vold_loss", "epsilon_high", math.inf, ValueError, "epsilon_high must be finite"),
    ("vold_loss", "epsilon_high", "0.2", TypeError, "epsilon_high must be a real number"),
    ("vold_loss", "epsilon_low", [0.2], TypeError, "epsilon_low must be a real number"),
    ("vold_loss", "clip_ratio_c", math.inf, ValueError, "clip_ratio_c must be finite"),
    ("vold_loss", "clip_ratio_c", "3", TypeError, "clip_ratio_c must be a real number"),
    ("vold_loss", "distill_coef", "0.1", TypeError, "distill_coef must be a real number"),
    ("vold_loss", "token_normalizer", math.inf, ValueError, "token_normalizer must be finite"),
    ("vold_loss", "token_normalizer", torch.tensor(math.inf), ValueError, "token_normalizer must be finite"),
    ("vold_loss", "token_normalizer", "12", TypeError, "token_normalizer must be a real number"),
    ("vold_loss", "jsd_beta", 1.5, ValueError, "jsd_beta must be in \\[0, 1\\] for divergence='jsd'"),
    ("vold_loss", "jsd_beta", math.nan, ValueError, "jsd_beta must be in"),
    ("divergence", "beta", math.inf, ValueError, "beta must be in"),
    ("logprobs", "logit_scale", "2", TypeError, "logit_scale must be a real number"),
    ("vold_loss", "teacher_final_logit_softcapping", "30", TypeError,
     "teacher_final_logit_softcapping must be a real number"),
]


def _call_with(fn: str, option: str, value):
    if fn == "logprobs":
        hidden, weight, targets = _lp_inputs()
        return fused_linear_logprobs(hidden, weight, targets, impl="torch", **{option: value})
    if fn == "divergence":
        s_h, s_w, t_h, t_w = _div_inputs()
        extra = {"divergence": "jsd"} if option == "beta" else {}
        return fused_linear_divergence(s_h, s_w, t_h, t_w, impl="torch", **extra, **{option: value})
    extra = {"divergence": "jsd", "distill_estimator": "full"} if option == "jsd_beta" else {}
    return vold_loss(**_vold_inputs(), impl="torch", **extra, **{option: value})


@pytest.mark.parametrize("fn,option,bad,kind,match", _SCALAR_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]!r}"[:60] for c in _SCALAR_CASES])
def test_scalar_options_are_real_finite_numbers(fn, option, bad, kind, match):
    with pytest.raises(kind, match=f"^{match}"):
        _call_with(fn, option, bad)


@pytest.mark.parametrize("fn,option,good", [
    ("logprobs", "temperature", torch.tensor(0.7)), ("logprobs", "temperature", 2),
    ("vold_loss", "token_normalizer", torch.tensor(40.0)), ("vold_loss", "token_normalizer", 40),
    ("vold_loss", "epsilon_high", 0), ("vold_loss", "clip_ratio_c", 3), ("divergence", "beta", 1),
])
def test_scalar_options_accept_numbers_and_one_element_tensors(fn, option, good):
    out = _call_with(fn, option, good)
    out = out[0] if isinstance(out, tuple) else out
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("wrap", [torch.tensor, np.float32, lambda v: torch.tensor([v], dtype=torch.float64)],
                         ids=["tensor", "numpy", "fp64_shape_1_tensor"])
def test_scalar_options_given_as_tensors_or_numpy_numbers_equal_floats(impl, wrap):
    """The README and ``checks.check_number`` accept a NumPy number or a one-element tensor for every scalar option:
    each must give the same loss and gradients as the Python float. Before, a tensor or NumPy float32
    ``temperature`` / ``jsd_beta`` reached the Triton kernels as a scalar argument (InterpreterError: "invalid operands
    of type pointer<fp32> and triton.language.float32", "cannot convert ... numpy.float32"), and a tensor
    ``logit_scale`` was refused with a TypeError (logit_transform's own type check)."""
    tensors = _vold_inputs(bias=True)
    options = dict(temperature=0.7, divergence="jsd", jsd_beta=0.3, student_logit_scale=1.3,
                   teacher_final_logit_softcapping=5.0, clip_ratio_c=3.0, token_normalizer=17.0,
                   ref_kl_coef=0.0, distill_coef=0.4, epsilon_low=0.2, epsilon_high=0.28, impl=impl)
    floats = run_vold(vold_loss, tensors, options)
    # a [1]-shaped epsilon made ratio.clamp(float, tensor) fail, and an fp64 tensor option made the loss fp64
    wrapped = run_vold(vold_loss, tensors, {k: (wrap(v) if isinstance(v, float) else v) for k, v in options.items()})
    assert wrapped[0].dtype == floats[0].dtype and wrapped[0].shape == floats[0].shape
    assert_rel(wrapped[0], floats[0], FP32_TOL, "loss")
    for key in floats[2]:
        assert_rel(wrapped[2][key], floats[2][key], FP32_TOL, f"grad {key}")
    hidden, weight, targets = _lp_inputs()
    logp = [fused_linear_logprobs(hidden, weight, targets, temperature=T, logit_scale=s, impl=impl)
            for T, s in ((0.7, 1.3), (wrap(0.7), wrap(1.3)))]
    assert_rel(logp[1], logp[0], FP32_TOL, "logprobs")
    s_h, s_w, t_h, t_w = _div_inputs()
    div = [fused_linear_divergence(s_h, s_w, t_h, t_w, divergence="jsd", beta=b, temperature=T, impl=impl)
           for b, T in ((0.3, 0.7), (wrap(0.3), wrap(0.7)))]
    assert_rel(div[1], div[0], FP32_TOL, "divergence")


def test_dr_grpo_max_completion_length_is_a_finite_number():
    """max_completion_length=inf gave a zero loss silently and a string "'<=' not supported", naming nothing."""
    for bad, kind in ((math.inf, ValueError), ("7", TypeError), (True, TypeError), (0, ValueError)):
        with pytest.raises(kind, match="^max_completion_length must be"):
            vold_loss(**_vold_inputs(), loss_type="dr_grpo", max_completion_length=bad, impl="torch")
