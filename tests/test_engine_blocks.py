"""The CPU torch engines' row blocks (``common.block_rows``): a chunk's elementwise passes run block by block,
so every block boundary (full blocks, a ragged block, a ragged chunk) must give the float64 reference's
values and gradients, eager and compiled, for every divergence, entropy and temperature."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.utils as dynamo_utils

import vold.kernels.common as common
from tests.helpers import FP32_TOL, assert_rel, compare_vold, make_vold_inputs, reference_cast, run_vold, select
from vold.kernels import fused_linear_divergence, fused_linear_logprobs, vold_loss
from vold.kernels.engines.torch import chunk_logit_grad, chunk_statistics
from vold.kernels.reference import leaf64, ref_divergence, ref_logprobs, ref_vold_loss

V, CHUNK = 97, 16


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 4 rows (eager) / 8 rows (compiled) at V = 97, inside chunks of 16 rows."""
    monkeypatch.setitem(common._BLOCK_ELEMENTS, False, 4 * V)
    monkeypatch.setitem(common._BLOCK_ELEMENTS, True, 8 * V)
    cpu = torch.device("cpu")
    assert common.block_rows(V, cpu, False, CHUNK) == 4 and common.block_rows(V, cpu, True, CHUNK) == 8


def test_block_rows_rule():
    cpu = torch.device("cpu")
    # about 2 MiB (eager) / 16 MiB (compiled) of fp32 per block, a power of two of rows
    assert [common.block_rows(v, cpu, False, 256) for v in (32768, 151936)] == [16, 4]
    assert [common.block_rows(v, cpu, True, 256) for v in (32768, 151936)] == [128, 32]
    assert common.block_rows(32768, cpu, True, 64) == 64  # at most the chunk
    assert common.block_rows(32768, cpu, False, None) == 16
    assert common.block_rows(10**7, cpu, False, 256) == 1  # at least one row
    assert common.block_rows(32768, torch.device("cuda"), False, 256) is None  # one block per chunk on CUDA


@pytest.mark.parametrize("impl", ["torch", "torch_compile"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
def test_divergence_across_blocks(small_blocks, impl, divergence):
    g = torch.Generator().manual_seed(1)
    n = 37  # chunks 16, 16, 5; blocks of 4 (eager) or 8 (compiled) and a ragged 1 / 5
    h = torch.randn(n, 12, generator=g).requires_grad_()
    w = (torch.randn(V, 12, generator=g) * 0.5).requires_grad_()
    th, tw = torch.randn(n, 10, generator=g), torch.randn(V, 10, generator=g) * 0.5
    d = fused_linear_divergence(h, w, th, tw, divergence=divergence, beta=0.3, temperature=0.7, impl=impl,
                                chunk_size=CHUNK)
    coef = torch.randn(n, generator=g)
    (d * coef).sum().backward()
    h64, w64 = leaf64(h), leaf64(w)
    ref = ref_divergence(h64, w64, leaf64(th, False), leaf64(tw, False), divergence, 0.3, temperature=0.7)
    (ref * coef.double()).sum().backward()
    assert_rel(d, ref, FP32_TOL, "divergence")
    assert_rel(h.grad, h64.grad, FP32_TOL, "grad hidden")
    assert_rel(w.grad, w64.grad, FP32_TOL, "grad weight")


@pytest.mark.parametrize("impl", ["torch", "torch_compile"])
def test_logprobs_and_entropy_across_blocks(small_blocks, impl):
    g = torch.Generator().manual_seed(2)
    n = 45
    h = torch.randn(n, 12, generator=g).requires_grad_()
    w = (torch.randn(V, 12, generator=g) * 0.5).requires_grad_()
    y = torch.randint(0, V, (n,), generator=g)
    logp, entropy = fused_linear_logprobs(h, w, y, temperature=1.3, return_entropy=True, impl=impl,
                                          chunk_size=CHUNK)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    ((logp * a).sum() + (entropy * b).sum()).backward()
    h64, w64 = leaf64(h), leaf64(w)
    ref_logp, ref_entropy = ref_logprobs(h64, w64, y, temperature=1.3)
    ((ref_logp * a.double()).sum() + (ref_entropy * b.double()).sum()).backward()
    assert_rel(logp, ref_logp, FP32_TOL, "logp")
    assert_rel(entropy, ref_entropy, FP32_TOL, "entropy")
    assert_rel(h.grad, h64.grad, FP32_TOL, "grad hidden")
    assert_rel(w.grad, w64.grad, FP32_TOL, "grad weight")


@pytest.mark.parametrize("impl", ["torch", "torch_compile"])
def test_vold_loss_across_blocks(small_blocks, impl):
    tensors = select(make_vold_inputs(B=4, T=11, V=V, seed=3), "teacher_logprobs")
    options = {"distill_coef": 0.1, "entropy_coef": 0.01, "chunk_size": CHUNK}
    kernel = run_vold(vold_loss, tensors, {**options, "impl": impl})
    reference = run_vold(ref_vold_loss, tensors, {k: v for k, v in options.items() if k != "chunk_size"},
                         cast=reference_cast())
    compare_vold(kernel, reference, FP32_TOL, required_metrics=("distill_kl",))


def test_compiled_blocks_do_not_recompile_when_n_changes(small_blocks):
    """Full blocks share one graph at every row offset of the chunk (a block is a view with a storage offset) and
    ragged blocks run eagerly: once the first N has compiled, other N (other ragged chunks and blocks) add no graph."""
    torch._dynamo.reset()  # a fresh recompile budget: past the limit dynamo runs eagerly and counts no new graph

    def run(n: int):
        g = torch.Generator().manual_seed(n)
        h = torch.randn(n, 12, generator=g).requires_grad_()
        w = torch.randn(V, 12, generator=g).requires_grad_()
        th, tw = torch.randn(n, 10, generator=g), torch.randn(V, 10, generator=g)
        fused_linear_divergence(h, w, th, tw, impl="torch_compile", chunk_size=CHUNK).sum().backward()
        assert h.grad is not None and bool(torch.isfinite(h.grad).all())

    run(37)  # chunks 16, 16, 5: full blocks at row offsets 0 and 8, a ragged chunk of 5 (eager)
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    assert graphs >= 2  # the statistics and the logit gradient were compiled
    for n in (45, 20, 3, 64):  # ragged blocks of 5, 4 and 3 rows, N below one block, no ragged chunk
        run(n)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("code", [0, 1, 2, 3])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logit_grad_pure_form_keeps_its_inputs(code, temperature, dtype):
    """``chunk_logit_grad(in_place=False)`` (what torch_compile traces, per block) reads its logits, statistics and
    row coefficients without writing them, and gives the dz of the in-place form the eager blocks run (which may
    consume only z and u: the statistics are the call's outputs, kept after the backward)."""
    g = torch.Generator().manual_seed(code)
    z, u = torch.randn(6, V, generator=g, dtype=dtype) * 3, torch.randn(6, V, generator=g, dtype=dtype) * 3
    y = torch.randint(0, V, (6,), generator=g)
    teacher = u if code else None
    stats = chunk_statistics(z, teacher, y, 1.0 / temperature, code, 0.3)
    coefficients = [torch.randn(6, generator=g, dtype=dtype) for _ in range(3)]
    g_logp, g_ent, g_div = coefficients[0], coefficients[1], coefficients[2] if code else None
    before = [t.clone() for t in (z, u, *stats.values(), *coefficients)]
    dz = chunk_logit_grad(z, teacher, y, stats, g_logp, g_ent, g_div, 1.0 / temperature, code, 0.3)
    for now, then in zip((z, u, *stats.values(), *coefficients), before, strict=True):
        assert torch.equal(now, then)
    in_place = chunk_logit_grad(z, teacher, y, stats, g_logp, g_ent, g_div, 1.0 / temperature, code, 0.3,
                                in_place=True)
    assert in_place.data_ptr() == z.data_ptr()  # dz over the logits' own buffer
    for now, then in zip((*stats.values(), *coefficients), before[2:], strict=True):
        assert torch.equal(now, then)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(in_place, dz, rtol=10 * tol, atol=tol)
