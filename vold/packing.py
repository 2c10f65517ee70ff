"""Sequence packing: the rows of a micro-batch as ONE row of their real tokens, so neither the model nor the
fused loss ever sees a padding token.

A padded micro-batch is ``prompt_inputs`` (left-padded ``[N, Tp]``, images) + ``completion_ids/mask [N, Tc]``
(right-padded). Packed, it is the concatenation of each row's real tokens (``attention_mask == 1``) with
position ids that restart at 0 for every sequence, and no attention mask:

- text models (Llama, Qwen2/3, ...): ``position_ids [1, L]``; transformers detects the sequence starts from
  them: flash-attn varlen (``cu_seqlens`` from the position ids) with ``attn_implementation=
  "flash_attention_2"``, a block-diagonal causal mask with sdpa/eager (``[L, L]``: small rows only);
- Qwen2-VL / Qwen2.5-VL: ``position_ids [4, 1, L]``, the text positions first (which drive the packed
  mask / varlen kernel) then the three M-RoPE rows, computed per sequence by the model's own
  ``get_rope_index`` on the padded batch and then packed, so image rows pack too (``pixel_values`` and
  ``image_grid_thw`` keep their order: the image placeholders stay in the same order in the packed row).

Positions are those of the padded path (counted over real tokens), so packed and padded runs compute the
same hidden states for every real token (up to float rounding), and the loss gets only the completion
tokens: ``[n, H]`` with ``cu_seqlens [N+1]`` (``vold_loss``'s packed layout).

Limits: a completion mask must be a prefix of its row (true for rollouts and SFT responses) and every prompt
non-empty; video inputs are not packed; with sdpa/eager the mask is ``[L, L]``, so on a GPU use
flash_attention_2 for long packed rows.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from vold.models import is_vision_config, multimodal_token_types, text_position_ids


def _accepts(fn: Any, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def packed_completion_hidden_states(
    model: torch.nn.Module,
    prompt_inputs: dict[str, torch.Tensor],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden [n, H], cu_seqlens [N+1], select [N, Tc] bool)``: the hidden states that predict the ``n``
    completion tokens ``completion_ids[select]`` (row-major), from one packed forward pass.

    ``select = completion_mask != 0``; ``cu_seqlens`` delimits each row's completion tokens in ``hidden``.
    The same rows padded give ``completion_hidden_states(...)[select]``.
    """
    prompt_ids, prompt_mask = prompt_inputs["input_ids"], prompt_inputs["attention_mask"]
    if prompt_ids.shape[0] != completion_ids.shape[0]:
        raise ValueError(f"{prompt_ids.shape[0]} prompt rows for {completion_ids.shape[0]} completions")
    device = prompt_ids.device
    completion_ids, completion_mask = completion_ids.to(device), completion_mask.to(device)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1) != 0
    select = completion_mask != 0
    tp, tc = prompt_ids.shape[1], completion_ids.shape[1]

    # where each kept token lands in the packed row, and which packed positions predict the completion tokens
    packed_index = attention.reshape(-1).long().cumsum(0).view(attention.shape) - 1
    predictor_cols = torch.arange(tc, device=device) + tp - 1
    predictor_real = attention[:, predictor_cols]
    if bool((select & ~predictor_real).any()):
        raise ValueError("packing needs non-empty prompts and completion masks that are a prefix of each row")
    predict = packed_index[:, predictor_cols][select]

    ids = input_ids[attention].unsqueeze(0)  # [1, L]
    positions = text_position_ids(attention.long())[attention].unsqueeze(0)  # restart at 0 per sequence
    base = model.base_model
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": None, "use_cache": False}
    if is_vision_config(model.config):
        types = prompt_inputs.get("mm_token_type_ids")
        if types is not None:
            types = torch.cat([types, torch.zeros_like(completion_ids, dtype=types.dtype)], dim=1)
        else:
            types = multimodal_token_types(model, input_ids)
        rope = positions.expand(3, -1)  # text-only: the three M-RoPE rows are the text positions
        pixel_values = prompt_inputs.get("pixel_values")
        if pixel_values is not None:
            grid = prompt_inputs["image_grid_thw"]
            rope_kwargs: dict[str, Any] = {"image_grid_thw": grid, "attention_mask": attention.long()}
            if _accepts(base.get_rope_index, "mm_token_type_ids"):
                rope_kwargs["mm_token_type_ids"] = types
            rope = base.get_rope_index(input_ids, **rope_kwargs)[0][:, attention]  # [3, L]
            kwargs.update(pixel_values=pixel_values, image_grid_thw=grid)
            if _accepts(base.forward, "mm_token_type_ids"):
                kwargs["mm_token_type_ids"] = types[attention].unsqueeze(0)
        kwargs["position_ids"] = torch.cat([positions, rope.to(positions)], dim=0).unsqueeze(1)  # [4, 1, L]
    else:
        kwargs["position_ids"] = positions
    hidden = base(**kwargs).last_hidden_state[0]
    lengths = select.sum(dim=1)
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int64)
    return hidden.index_select(0, predict), cu_seqlens, select


def pack(value: torch.Tensor | None, select: torch.Tensor) -> torch.Tensor | None:
    """The entries of a per-token ``[N, T, ...]`` tensor at ``select [N, T]`` (row-major), or None."""
    return None if value is None else value[select.to(value.device)]


def unpack(values: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[n, ...]`` back into ``[N, T, ...]`` zeros at ``select``."""
    out = values.new_zeros((*select.shape, *values.shape[1:]))
    out[select.to(values.device)] = values
    return out
