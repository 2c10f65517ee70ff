"""The torch_compile engine: same numbers as eager, and no recompile when N changes."""

import torch
import torch._dynamo.utils as dynamo_utils

import vold.kernels as K


def _run(batch: int, length: int, impl: str):
    g = torch.Generator().manual_seed(batch * 100 + length)
    h = torch.randn(batch, length, 16, generator=g).requires_grad_()
    w = torch.randn(97, 16, generator=g).requires_grad_()
    th, tw = torch.randn(batch, length, 12, generator=g), torch.randn(97, 12, generator=g)
    y = torch.randint(0, 97, (batch, length), generator=g)
    loss, metrics = K.vold_loss(h, w, y, torch.randn(batch, generator=g), teacher_hidden=th, teacher_weight=tw,
                                impl=impl, chunk_size=8, entropy_coef=0.01)
    loss.backward()
    return loss.detach(), h.grad, w.grad, metrics["distill_kl"]


def test_torch_compile_matches_eager_and_does_not_recompile():
    first = _run(3, 7, "torch_compile")  # 21 tokens: chunks of 8, 8 and a ragged 5 (eager)
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    assert graphs >= 1
    for got, want in zip(first, _run(3, 7, "torch"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    second = _run(2, 9, "torch_compile")  # another N: same full-chunk shape, nothing new to compile
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs
    for got, want in zip(second, _run(2, 9, "torch"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
