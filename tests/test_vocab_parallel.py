"""Vocab-parallel losses: 2 gloo processes, each holding half of the lm_head rows, against the unsharded run.

Every rank checks its values, its hidden-state gradient (all-reduced, so the full one) and its shard of the
weight/bias gradients against the single-process result computed on the full weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import run_on_gloo_ranks

from vold.kernels import fused_linear_divergence, fused_linear_logprobs, vold_loss

WORLD, B, T, H, HT, V = 2, 3, 5, 8, 6, 40


def _inputs() -> dict:
    g = torch.Generator().manual_seed(7)
    return dict(
        h=torch.randn(B, T, H, generator=g, dtype=torch.float64).float(),
        w=torch.randn(V, H, generator=g, dtype=torch.float64).float() * 0.7,
        b=torch.randn(V, generator=g, dtype=torch.float64).float() * 0.3,
        th=torch.randn(B, T, HT, generator=g, dtype=torch.float64).float(),
        tw=torch.randn(V, HT, generator=g, dtype=torch.float64).float() * 0.7,
        y=torch.randint(0, V, (B, T), generator=g),
        adv=torch.randn(B, generator=g),
        old=-torch.rand(B, T, generator=g) * 4,
        ref=-torch.rand(B, T, generator=g) * 4,
        mask=(torch.rand(B, T, generator=g) > 0.2).float(),
        dmask=torch.rand(B, generator=g),
    )


CASES = {
    "logprobs": lambda x, w, b, tw, **kw: fused_linear_logprobs(
        x["h_leaf"], w, x["y"], bias=b, temperature=0.8, return_entropy=True, chunk_size=4, **kw),
    "reverse_kl": lambda x, w, b, tw, **kw: fused_linear_divergence(
        x["h_leaf"], w, x["th"], tw, student_bias=b, chunk_size=4, **kw),
    "forward_kl": lambda x, w, b, tw, **kw: fused_linear_divergence(
        x["h_leaf"], w, x["th"], tw, divergence="forward_kl", temperature=1.3, chunk_size=4, **kw),
    "jsd": lambda x, w, b, tw, **kw: fused_linear_divergence(
        x["h_leaf"], w, x["th"], tw, divergence="jsd", beta=0.3, chunk_size=4, **kw),
    "vold_full": lambda x, w, b, tw, **kw: vold_loss(
        x["h_leaf"], w, x["y"], x["adv"], x["old"], x["mask"], student_bias=b, teacher_hidden=x["th"],
        teacher_weight=tw, ref_logprobs=x["ref"], ref_kl_coef=0.05, entropy_coef=0.01, distill_mask=x["dmask"],
        temperature=0.9, chunk_size=4, **kw),
    "vold_k2_sequence": lambda x, w, b, tw, **kw: vold_loss(
        x["h_leaf"], w, x["y"], x["adv"], x["old"], x["mask"], teacher_hidden=x["th"], teacher_weight=tw,
        distill_estimator="k2", importance_sampling_level="sequence", loss_type="grpo", chunk_size=4, **kw),
}


def _scalar(out) -> torch.Tensor:
    if isinstance(out, tuple) and isinstance(out[1], dict):
        return out[0]
    parts = out if isinstance(out, tuple) else (out,)
    return sum((p * (i + 1.5)).sum() for i, p in enumerate(parts))


def _run(case: str, x: dict, w, b, tw, **kw):
    x = dict(x, h_leaf=x["h"].clone().requires_grad_())
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    out = CASES[case](x, w, b, tw, **kw)
    _scalar(out).backward()
    values = out[0] if isinstance(out, tuple) and isinstance(out[1], dict) else out
    return values, x["h_leaf"].grad, w.grad, b.grad


def _check_rank(rank: int) -> None:
    """This rank's checks (``run_on_gloo_ranks`` joins the gloo group, then barriers and destroys it)."""
    torch.manual_seed(0)
    x = _inputs()
    rows = slice(rank * V // WORLD, (rank + 1) * V // WORLD)
    for case in CASES:
        want = _run(case, x, x["w"], x["b"], x["tw"], impl="torch")
        got = _run(case, x, x["w"][rows], x["b"][rows], x["tw"][rows], process_group=dist.group.WORLD)
        want_values = want[0] if isinstance(want[0], tuple) else (want[0],)
        got_values = got[0] if isinstance(got[0], tuple) else (got[0],)
        for g_val, w_val in zip(got_values, want_values, strict=True):
            torch.testing.assert_close(g_val, w_val, rtol=1e-5, atol=1e-6, msg=lambda m, c=case: f"{c}: {m}")
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6, msg=lambda m, c=case: f"{c} dh: {m}")
        torch.testing.assert_close(got[2], want[2][rows], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, c=case: f"{c} dW: {m}")
        if want[3] is not None and want[3].abs().sum() > 0:
            torch.testing.assert_close(got[3], want[3][rows], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, c=case: f"{c} db: {m}")
    # unequal shards are refused with a clear error on every rank
    uneven = x["w"][: V // WORLD + rank]
    with pytest.raises(ValueError, match="same number of vocabulary rows"):
        fused_linear_logprobs(x["h"], uneven, x["y"] % (V // WORLD), process_group=dist.group.WORLD)
    with pytest.raises(ValueError, match="impl='torch'"):
        fused_linear_logprobs(x["h"], x["w"][rows], x["y"], process_group=dist.group.WORLD, impl="triton")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_vocab_parallel_matches_unsharded_two_gloo_ranks():
    run_on_gloo_ranks(_check_rank, WORLD)
