"""An entropy returned for logging only costs no backward work (TRL's ``set_materialize_grads(False)``)."""

from __future__ import annotations

import torch

from vold.kernels import fused_linear_logprobs
from vold.kernels.logprobs import FusedLinearLogprobsFunction


def test_unused_entropy_gets_no_gradient_term(monkeypatch):
    seen = []
    backward = FusedLinearLogprobsFunction.backward

    def spy(ctx, grad_logp, grad_entropy):
        seen.append((grad_logp is None, grad_entropy is None))
        return backward(ctx, grad_logp, grad_entropy)

    monkeypatch.setattr(FusedLinearLogprobsFunction, "backward", staticmethod(spy))
    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(11, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 11, (6,), generator=g)
    grads = []
    for entropy_weight in (None, 0.0, 0.7):  # entropy unused, used with weight 0, used
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        logp, entropy = fused_linear_logprobs(h, w, y, return_entropy=True, chunk_size=4)
        loss = logp.sum() if entropy_weight is None else logp.sum() + entropy_weight * entropy.sum()
        loss.backward()
        grads.append((h.grad, w.grad))
    assert seen == [(False, True), (False, False), (False, False)]
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # entropy alone: the log-prob gradient is None and treated as 0 (reference: float64 autograd on full logits)
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    fused_linear_logprobs(h, w, y, return_entropy=True, chunk_size=4)[1].sum().backward()
    assert seen[-1] == (True, False)
    hr, wr = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    logq = torch.log_softmax(hr @ wr.T, -1)
    (-(logq.exp() * logq).sum()).backward()
    torch.testing.assert_close(h.grad, hr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-10, atol=1e-12)
