"""FSDP2 (``fully_shard``) lm_heads on 2 gloo CPU ranks: DTensor weights gathered once per call.

A tiny model (backbone + lm_head, and a frozen teacher head) is sharded with FSDP2's ``fully_shard``; each
rank runs its own tokens through the backbone and passes the sharded ``lm_head.weight`` / ``.bias``
(DTensors) to each kernel. Checked against single-process runs of an unsharded copy on both ranks' tokens:
values (this rank's tokens), and gradients = the data-parallel mean (what FSDP2 gives the backbone):
``lm_head.weight.grad`` is a DTensor whose local tensor is this rank's ``Shard(0)`` slice of the mean.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from helpers import run_on_gloo_ranks

from vold.kernels import fused_linear_divergence, fused_linear_logprobs, vold_loss

WORLD, B, T, D, H, HT, V = 2, 2, 5, 6, 8, 7, 40
TOL = dict(rtol=1e-5, atol=1e-5)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Linear(D, H)
        self.lm_head = torch.nn.Linear(H, V)
        self.teacher_head = torch.nn.Linear(HT, V, bias=False).requires_grad_(False)


def _data(rank: int) -> dict:
    g = torch.Generator().manual_seed(100 + rank)  # different tokens on every rank (data parallel)
    return dict(
        x=torch.randn(B, T, D, generator=g), th=torch.randn(B, T, HT, generator=g),
        y=torch.randint(0, V, (B, T), generator=g), adv=torch.randn(B, generator=g),
        old=-torch.rand(B, T, generator=g) * 4, mask=(torch.rand(B, T, generator=g) > 0.2).float(),
    )


CASES = {
    "logprobs": lambda m, d, h: fused_linear_logprobs(
        h, m.lm_head.weight, d["y"], bias=m.lm_head.bias, temperature=0.8, return_entropy=True, chunk_size=16),
    "jsd": lambda m, d, h: fused_linear_divergence(
        h, m.lm_head.weight, d["th"], m.teacher_head.weight, student_bias=m.lm_head.bias, divergence="jsd",
        beta=0.3, chunk_size=16),
    "vold_full": lambda m, d, h: vold_loss(
        h, m.lm_head.weight, d["y"], d["adv"], d["old"], d["mask"], student_bias=m.lm_head.bias,
        teacher_hidden=d["th"], teacher_weight=m.teacher_head.weight, entropy_coef=0.01, chunk_size=16),
    "vold_k2": lambda m, d, h: vold_loss(
        h, m.lm_head.weight, d["y"], d["adv"], d["old"], d["mask"], student_bias=m.lm_head.bias,
        teacher_hidden=d["th"], teacher_weight=m.teacher_head.weight, distill_estimator="k2", chunk_size=16),
}


def _scalar(out) -> tuple[torch.Tensor, torch.Tensor]:
    """(scalar to differentiate, values to compare)."""
    if isinstance(out, tuple) and isinstance(out[1], dict):
        return out[0], out[0]
    parts = out if isinstance(out, tuple) else (out,)
    return sum((p * (i + 1.5)).sum() for i, p in enumerate(parts)), torch.stack(parts)


def _step(model, case: str, d: dict):
    model.zero_grad(set_to_none=True)
    loss, values = _scalar(CASES[case](model, d, model.backbone(d["x"])))
    loss.backward()
    return values.detach()


def _grads(model) -> dict:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _check_rank(rank: int) -> None:
    """This rank's checks (``run_on_gloo_ranks`` joins the gloo group, then barriers and destroys it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    torch.manual_seed(0)
    ref = Tiny()
    model = copy.deepcopy(ref)
    for module in (model.backbone, model.lm_head, model.teacher_head):
        fully_shard(module)
    assert isinstance(model.lm_head.weight, DTensor) and model.lm_head.weight.placements == (Shard(0),)
    for case in CASES:
        want_values = _step(ref, case, _data(rank))
        mean = {}
        for r in range(WORLD):  # the data-parallel mean gradient, from the unsharded copy
            _step(ref, case, _data(r))
            for name, g in _grads(ref).items():
                mean[name] = mean.get(name, 0) + g / WORLD
        got_values = _step(model, case, _data(rank))
        torch.testing.assert_close(got_values, want_values, **TOL, msg=lambda m, c=case: f"{c} values: {m}")
        for name, g in _grads(model).items():
            assert isinstance(g, DTensor), f"{case}: {name}.grad is {type(g).__name__}, not a DTensor"
            torch.testing.assert_close(g.to_local(), mean[name].chunk(WORLD)[rank], **TOL,
                                       msg=lambda m, c=case, n=name: f"{c} d{n}: {m}")
    # a DTensor made by hand (Shard(0)) works the same way, without FSDP
    mesh = init_device_mesh("cpu", (WORLD,))
    w = distribute_tensor(ref.lm_head.weight.detach().clone(), mesh, [Shard(0)]).requires_grad_()
    d, h = _data(rank), torch.randn(B, T, H) * (1 + rank)
    fused_linear_logprobs(h, w, d["y"]).sum().backward()
    w_ref = ref.lm_head.weight.detach().clone().requires_grad_()
    fused_linear_logprobs(h, w_ref, d["y"]).sum().backward()
    g_ref = [torch.empty_like(w_ref.grad) for _ in range(WORLD)]  # every rank's unsharded gradient
    dist.all_gather(g_ref, w_ref.grad)
    assert isinstance(w.grad, DTensor)
    torch.testing.assert_close(w.grad.to_local(), torch.stack(g_ref).mean(0).chunk(WORLD)[rank], **TOL)
    # FSDP2 mixed precision: fp32 shards under bf16 hidden states are cast to bf16 before the gather
    w.grad = None
    fused_linear_logprobs(h.bfloat16(), w, d["y"]).sum().backward()
    w_ref.grad = None
    fused_linear_logprobs(h.bfloat16(), w_ref.bfloat16(), d["y"]).sum().backward()
    dist.all_gather(g_ref, w_ref.grad)
    assert isinstance(w.grad, DTensor) and w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad.to_local(), torch.stack(g_ref).mean(0).chunk(WORLD)[rank],
                               rtol=1e-2, atol=1e-2)
    # what is not supported is refused, naming the argument
    with pytest.raises(ValueError, match="hidden is a DTensor"):
        fused_linear_logprobs(distribute_tensor(h, mesh, [Shard(0)]), w, d["y"])
    with pytest.raises(ValueError, match="student_weight is a DTensor and process_group"):
        vold_loss(h, w, d["y"], d["adv"], process_group=dist.group.WORLD, distill_coef=0.0)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_fsdp2_dtensor_heads_match_unsharded_two_gloo_ranks():
    run_on_gloo_ranks(_check_rank, WORLD)


def test_plain_tensors_do_not_import_dtensor():
    """vold.kernels imports only torch: plain heads never load torch.distributed.tensor."""
    import subprocess
    import sys

    code = ("import sys, torch; from vold.kernels import fused_linear_logprobs; "
            "fused_linear_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4])); "
            "print('torch.distributed.tensor' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
