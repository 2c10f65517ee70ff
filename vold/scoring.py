"""Log-probs of completions under a model, shared by the stages (``vold sft``, ``vold train``, ``vold sophia``).

Every pass runs the model to its hidden states (``vold.models.completion_hidden_states``, or the packed layout of
``vold.packing``) and hands them with the lm_head weights to ``fused_linear_logprobs``: no ``[N, V]`` logits.
The logits are transformed as the model's own forward does (``vold.models.logit_options``: Cohere's
``logit_scale``, Gemma-2's ``final_logit_softcapping``), then divided by the temperature:

    log p(y_t) = log_softmax(f(h_t W^T + b) / T)[y_t],   f(z) = c tanh(s z / c)   (f(z) = s z without a cap)

- :func:`score`: a frozen pass (no grad) over a batch of completions, micro-batched: the teacher's, the reference's
  and the old policy's log-probs in ``vold train``, the behaviour policies' in ``vold sophia``;
- :func:`response_logprobs`: the differentiable pass over one micro-batch of responses (``vold sft``'s NLL,
  ``vold sophia``'s objective).
"""

from __future__ import annotations

from typing import Any

import torch

from vold.data import select_rows
from vold.kernels import fused_linear_logprobs
from vold.models import autocast, completion_hidden_states, head_for_loss, logit_options
from vold.packing import pack, packed_completion_hidden_states, unpack


@torch.no_grad()
def score(model: torch.nn.Module, prompt_inputs: dict[str, torch.Tensor], num_images: list[int], ids: torch.Tensor,
          mask: torch.Tensor, *, micro_size: int, vocab_size: int | None, temperature: float = 1.0,
          keep_hidden: bool = False, autocast_dtype: str | None = None, packing: bool = False) -> torch.Tensor:
    """``log p(y_t) * m_t [N, T]`` of a frozen pass of ``model`` over the completions (micro-batched), or,
    with ``keep_hidden``, its hidden states ``[N, T, H]`` on the CPU (for the exact divergence).
    ``packing``: each micro-batch as one packed row (``vold.packing``), results scattered back to ``[N, T]``."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, ids.shape[0], micro_size):
        rows = list(range(start, min(start + micro_size, ids.shape[0])))
        inputs = {k: v.to(device) for k, v in select_rows(prompt_inputs, num_images, rows).items()}
        part_ids, part_mask = ids[rows].to(device), mask[rows].to(device)
        select = None
        with autocast(device, autocast_dtype):
            if packing:
                hidden, _, select = packed_completion_hidden_states(model, inputs, part_ids, part_mask)
            else:
                hidden = completion_hidden_states(model, inputs, part_ids, part_mask)
        if keep_hidden:
            out.append((hidden if select is None else unpack(hidden, select)).cpu())
            continue
        hidden, weight, bias = head_for_loss(model, hidden, autocast_dtype)
        targets = part_ids if select is None else pack(part_ids, select)
        logp = fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                     vocab_size=vocab_size, **logit_options(model))
        out.append(logp * part_mask if select is None else unpack(logp, select) * part_mask)
    return torch.cat(out)


def response_logprobs(model: torch.nn.Module, batch: dict[str, Any], *, autocast_dtype: str | None = None,
                      packing: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(y_t), m_t)`` of the responses of one micro-batch (``batch``: ``prompt_inputs``, ``ids``, ``mask``;
    on the model's device), from ``fused_linear_logprobs`` on the hidden states (differentiable, no [N, V]
    logits, temperature 1): ``[B, T]``, or ``[n]`` over the real tokens of one packed row with ``packing``."""
    device = next(model.parameters()).device
    prompts = {k: v.to(device) for k, v in batch["prompt_inputs"].items()}
    ids, mask = batch["ids"].to(device), batch["mask"].to(device)
    with autocast(device, autocast_dtype):
        if packing:
            hidden, _, select = packed_completion_hidden_states(model, prompts, ids, mask)
            ids, mask = pack(ids, select), pack(mask, select)
        else:
            hidden = completion_hidden_states(model, prompts, ids, mask)
    hidden, weight, bias = head_for_loss(model, hidden, autocast_dtype)
    return fused_linear_logprobs(hidden, weight, ids, bias=bias, **logit_options(model)), mask
