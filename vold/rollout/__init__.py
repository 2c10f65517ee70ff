"""Rollout engines: sample ``G`` completions per prompt of a :class:`vold.data.PromptBatch`.

One interface, two engines: ``hf`` (``model.generate``, CPU or GPU, the trained model itself) and
``vllm`` (vLLM's offline ``LLM``, colocated on the training GPUs, weights synced after each update).
Rows of a :class:`Rollout` are prompt-major: completions ``i*G ... i*G+G-1`` belong to prompt ``i``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vold.rollout.base import Rollout, RolloutEngine, completion_mask, eos_token_ids, pad_completions

if TYPE_CHECKING:
    from vold.config import RolloutConfig


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
