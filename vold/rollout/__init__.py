"""Rollout engines: sample ``G`` completions per prompt of a :class:`vold.data.PromptBatch`.

One interface, two engines: ``hf`` (``model.generate``, CPU or GPU, the trained model itself) and
``vllm`` (vLLM's offline ``LLM``, colocated on the training GPUs, weights synced after each update).
Rows of a :class:`Rollout` are prompt-major: completions ``i*G ... i*G+G-1`` belong to prompt ``i``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from vold.config import RolloutConfig
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


def make_rollout_engine(cfg: RolloutConfig, model: torch.nn.Module, processor: Any, *, model_path: str | None = None,
                        dtype: str = "bfloat16", seed: int = 0, vocab_size: int | None = None) -> RolloutEngine:
    """The engine named by ``cfg.engine``: ``hf`` samples from ``model``; ``vllm`` loads ``model_path``."""
    if cfg.engine == "hf":
        from vold.rollout.hf import HFRolloutEngine

        return HFRolloutEngine(model, processor, vocab_size=vocab_size)
    if cfg.engine == "vllm":
        from vold.rollout.vllm import VLLMRolloutEngine

        if model_path is None:
            raise ValueError("the vllm engine needs model_path (the student's checkpoint) to build its LLM")
        from vold.models import base_model_path

        model_path = base_model_path(model_path)  # a LoRA adapter folder: its base (merged weights come by sync)
        return VLLMRolloutEngine(
            model_path, processor, gpu_memory_utilization=cfg.gpu_memory_utilization,
            enable_sleep_mode=cfg.enable_sleep_mode, sleep_level=cfg.sleep_level, max_model_len=cfg.max_model_len,
            tensor_parallel_size=cfg.tensor_parallel_size, enforce_eager=cfg.enforce_eager, dtype=dtype, seed=seed,
            vocab_size=vocab_size, eos_token_ids=eos_token_ids(getattr(processor, "tokenizer", processor), model),
            max_images_per_prompt=cfg.max_images_per_prompt,
        )
    raise ValueError(f"rollout.engine={cfg.engine!r} is not one of ('hf', 'vllm')")


__all__ = ["Rollout", "RolloutEngine", "completion_mask", "eos_token_ids", "make_rollout_engine", "pad_completions"]
