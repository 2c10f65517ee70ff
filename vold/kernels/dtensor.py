"""FSDP2 / ``DTensor`` lm_heads: gather the head once per call (TRL's ``full_tensor()`` pattern).

Between forward passes FSDP2's ``fully_shard`` leaves every parameter as a
``torch.distributed.tensor.DTensor`` (``Shard(0)`` over the data-parallel mesh). A fused loss that reads
``lm_head.weight`` outside the head's own forward gets that DTensor; gathering it per chunk would
all-gather ``[V, H]`` once per chunk (and again in the backward), so it is gathered here once per call.

This module imports ``torch.distributed.tensor`` only when one is already loaded: a DTensor cannot
exist before that module is imported, so plain tensors never pay for (or need) it.
"""

from __future__ import annotations

import sys

import torch


def _is_dtensor(x) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def _gather(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    from torch.distributed.tensor import Partial

    if dtype is not None and dtype.is_floating_point and x.dtype != dtype:
        x = x.to(dtype)  # FSDP2 mixed precision: fp32 shards, bf16 activations; cast before the all-gather

    # The data-parallel ranks see different tokens, so the full gradient each one computes is a partial
    # contribution: reduce-scatter it as a mean back to the shards (what FSDP2 does for every other
    # parameter; with identical inputs on every rank this equals the rank's slice of the local gradient).
    return x.full_tensor(grad_placements=[Partial("avg")] * x.device_mesh.ndim)


def gather_head(prefix: str, hidden, weight, bias, process_group=None):
    """``(weight, bias)`` as plain tensors: each one that is a ``DTensor`` is gathered with ``full_tensor()``.

    ``weight [V, H]`` / ``bias [V]`` may be DTensors of any placement (FSDP2's ``Shard(0)``, HSDP's
    ``(Replicate(), Shard(0))``, ``Replicate()``); a DTensor is cast to ``hidden``'s dtype before the
    all-gather (FSDP2's ``MixedPrecisionPolicy(param_dtype=...)`` keeps fp32 shards under bf16 activations;
    TRL casts likewise), a plain weight is not (its dtype must match ``hidden``'s). The gradient flows
    back through ``full_tensor``'s autograd as a mean over the mesh (``Partial("avg")`` → the DTensor's
    placements), so ``weight.grad`` is a DTensor holding this rank's shard of the data-parallel mean
    gradient, as FSDP2 gives every other parameter (its default ``reduce-scatter`` mean; a custom
    ``set_gradient_divide_factor`` is not followed). ``None`` passes through.

    Raises ``ValueError`` (naming ``{prefix}hidden`` / ``{prefix}weight``) for a DTensor hidden state
    (pass ``hidden.to_local()`` for this rank's tokens, or ``hidden.full_tensor()``) and for a DTensor
    head together with ``process_group=`` (the vocab-parallel path takes this rank's plain vocabulary shard:
    ``weight.to_local()``).
    """
    if _is_dtensor(hidden):
        raise ValueError(f"{prefix}hidden is a DTensor: pass a plain tensor ({prefix}hidden.to_local() for this "
                         f"rank's tokens, or .full_tensor()); only the lm_head weight/bias may be DTensors")
    sharded = [name for name, x in (("weight", weight), ("bias", bias)) if _is_dtensor(x)]
    if sharded and process_group is not None:
        raise ValueError(f"{prefix}{sharded[0]} is a DTensor and process_group= is given: the vocab-parallel path "
                         f"takes this rank's plain vocabulary shard ({prefix}{sharded[0]}.to_local()); "
                         f"a DTensor head is gathered whole instead (drop process_group=)")
    if not sharded:
        return weight, bias
    dtype = None if hidden is None else hidden.dtype
    return tuple(_gather(x, dtype) if _is_dtensor(x) else x for x in (weight, bias))
