"""The rollout interface the engines implement (:class:`RolloutEngine`), what they return (:class:`Rollout`)
and the helpers they share (completion masks, padding, EOS ids). The engines (``hf.py``, ``vllm.py``) import
this module, never the package, so the package can pick an engine without an import cycle."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from vold.data import PromptBatch


@dataclass
class Rollout:
    """Completions of a batch of ``B`` prompts, ``G`` each.

    ``completion_ids [B*G, Tc]``: sampled tokens, ``pad_token_id`` after the end;
    ``completion_mask [B*G, Tc]`` (long): 1 on the completion's tokens, up to and including its first
    EOS; ``finished [B*G]``: the completion ended with EOS (False: cut at ``max_new_tokens``);
    ``logprobs [B*G, Tc]`` (float32, 0 off the mask), when asked for: log-prob of each sampled token
    under ``softmax(logits / temperature)`` over the shared vocabulary, before top-p truncation (what
    the trainer recomputes as the old policy's log-probs).
    """

    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]
    finished: torch.Tensor
    num_generations: int
    logprobs: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)


class RolloutEngine:
    """Samples completions; ``update_weights`` after each optimizer step, ``sleep``/``wake_up`` between phases."""

    def generate(self, batch: PromptBatch, num_generations: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | Sequence[int] | None = None, return_logprobs: bool = False) -> Rollout:
        """``G = num_generations`` completions for each prompt of ``batch`` (its student inputs).

        ``seed``: one seed for the call, or one per prompt (a list): then each prompt's completions depend
        on its own seed only, not on the other prompts of the batch (the trainer's data-parallel ranks
        sample different prompt subsets and must draw what one process would)."""
        raise NotImplementedError

    def update_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights (no-op when it samples from ``model`` itself)."""

    def sleep(self) -> None:
        """Free accelerator memory for the training phase (no-op by default)."""

    def wake_up(self) -> None:
        """Undo :meth:`sleep` (no-op by default)."""


def completion_mask(ids: torch.Tensor, eos_token_ids: Sequence[int],
                    lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask [N, T] long, finished [N] bool)``: mask is 1 up to and including the first EOS of each row,
    and (when ``lengths`` of right-padded rows are given) never beyond a row's length."""
    steps = torch.arange(ids.shape[1], device=ids.device)
    valid = torch.ones_like(ids, dtype=torch.bool) if lengths is None else steps[None, :] < lengths[:, None]
    is_eos = torch.isin(ids, torch.tensor(list(eos_token_ids), device=ids.device)) & valid
    finished = is_eos.any(dim=1)
    no_eos = torch.full_like(finished, ids.shape[1], dtype=torch.long)
    first = torch.where(finished, is_eos.long().argmax(dim=1), no_eos)
    return ((steps[None, :] <= first[:, None]) & valid).long(), finished


def pad_completions(sequences: Sequence[Sequence[int]], pad_token_id: int) -> torch.Tensor:
    """Right-pad token lists to ``[N, max(1, longest)]`` (long)."""
    width = max([len(s) for s in sequences] + [1])
    out = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, :len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
    return out


def eos_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """EOS ids of the tokenizer and of the model's generation config (Qwen instruct models have two)."""
    ids: list[int] = []
    candidates = [getattr(tokenizer, "eos_token_id", None)]
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        candidates.append(generation_config.eos_token_id)
    for value in candidates:
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    if not ids:
        raise ValueError("no EOS token id: the tokenizer and the model's generation config have none")
    return ids
