"""The float64 oracle's working-precision mode (``dtype=None``, the benchmark's naive row) against the oracle
itself in float64: same loss and gradients to fp32 accuracy; ``metrics=False`` changes nothing but the metrics."""

from __future__ import annotations

import pytest
import torch

from vold.kernels.reference import leaf64, ref_vold_loss


def _inputs(dtype: torch.dtype):
    g = torch.Generator().manual_seed(3)
    b, t, h, v = 3, 5, 16, 64
    r = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * 0.5).to(dtype)  # noqa: E731
    return dict(
        student_hidden=r(b, t, h), student_weight=r(v, h), targets=torch.randint(0, v, (b, t), generator=g),
        advantages=torch.randn(b, generator=g), old_logprobs=-torch.rand(b, t, generator=g) * 4,
        mask=(torch.rand(b, t, generator=g) > 0.2).float(), teacher_hidden=r(b, t, h), teacher_weight=r(v, h),
    )


@pytest.mark.parametrize("options", [dict(distill_coef=0.1), dict(distill_coef=0.1, entropy_coef=0.01,
                                     loss_type="grpo", temperature=0.7)], ids=["dapo_kl", "grpo_entropy_T"])
def test_working_precision_matches_float64(options):
    x = _inputs(torch.float32)
    leaves = {k: leaf64(x[k]) for k in ("student_hidden", "student_weight")}
    want, want_metrics = ref_vold_loss(**{**x, **leaves}, **options)
    want.backward()
    got_leaves = {k: x[k].clone().requires_grad_() for k in leaves}
    got, got_metrics = ref_vold_loss(**{**x, **got_leaves}, **options, dtype=None, metrics=False)
    got.backward()
    assert got.dtype == torch.float32 and got_metrics == {} and set(want_metrics) >= {"loss", "entropy"}
    assert abs(float(got.detach()) - float(want.detach())) <= 1e-5 * max(1.0, abs(float(want.detach())))
    for k in leaves:
        err = float((got_leaves[k].grad.double() - leaves[k].grad).abs().max())
        assert err <= 1e-5 * float(leaves[k].grad.abs().max()), (k, err)
    with_metrics, _ = ref_vold_loss(**x, **options, dtype=None)
    assert float(with_metrics.detach()) == float(got.detach())


def test_working_precision_of_bf16_inputs_is_fp32():
    x = _inputs(torch.bfloat16)
    loss, _ = ref_vold_loss(**x, dtype=None, metrics=False)
    want, _ = ref_vold_loss(**x)
    assert loss.dtype == torch.float32 and want.dtype == torch.float64
    got, ref = float(loss.detach()), float(want.detach())
    assert abs(got - ref) <= 1e-2 * max(1.0, abs(ref))  # the logits of a bf16 GEMM are rounded to bf16
