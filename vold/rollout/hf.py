"""Rollouts with ``transformers``' ``generate``, from the trained model itself (CPU or GPU)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig

from vold.data import select_rows, tokenizer_of
from vold.models import lm_head_weight
from vold.rollout.base import Rollout, RolloutEngine, completion_mask
from vold.rollout.base import eos_token_ids as default_eos_token_ids

if TYPE_CHECKING:
    from vold.data import PromptBatch


class HFRolloutEngine(RolloutEngine):
    """Samples with ``model.generate``: pure sampling (``top_k`` off, no repetition penalty), regardless of
    the defaults in the checkpoint's ``generation_config.json``. ``vocab_size`` suppresses padded
    head rows (ids ``>= vocab_size``) so every sampled token is one the teacher can score; image and
    video placeholder tokens are never sampled."""

    def __init__(self, model: torch.nn.Module, processor: Any, *, vocab_size: int | None = None,
                 eos_token_ids: list[int] | None = None):
        self.model, self.processor = model, processor
        self.tokenizer = tokenizer_of(processor)
        self.eos_token_ids = eos_token_ids or default_eos_token_ids(self.tokenizer, model)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = self.eos_token_ids[0] if pad is None else pad
        rows = lm_head_weight(model).shape[0]
        self.vocab_size = rows if vocab_size is None else vocab_size
        # image/video placeholders in a completion would be taken for images when the trainer re-reads it
        placeholders = {getattr(model.config, k, None) for k in ("image_token_id", "video_token_id")} - {None}
        self.suppress = sorted(set(range(self.vocab_size, rows)) | placeholders) or None

    @torch.no_grad()
    def generate(self, batch: PromptBatch, num_generations: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | Sequence[int] | None = None, return_logprobs: bool = False) -> Rollout:
        """One ``generate`` call for the batch (an int ``seed``), or one per prompt, each without padding and
        with its own seed (a list): then a prompt's completions do not depend on the rest of the batch."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        model = self.model
        device = next(model.parameters()).device
        sampling = GenerationConfig(
            do_sample=True, temperature=temperature, top_p=top_p, top_k=0, repetition_penalty=1.0,
            max_new_tokens=max_new_tokens, num_return_sequences=num_generations, use_cache=True,
            eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id, suppress_tokens=self.suppress,
            return_dict_in_generate=True, output_logits=return_logprobs,
        )
        if seed is None or isinstance(seed, int):
            calls = [(batch.student_inputs, seed)]
        else:
            seeds = [int(s) for s in seed]
            if len(seeds) != len(batch):
                raise ValueError(f"{len(seeds)} seeds for {len(batch)} prompts")
            calls = [(_unpadded_row(batch.student_inputs, batch.num_images, i), s) for i, s in enumerate(seeds)]
        # generate() fills unset options from model.generation_config: hide the checkpoint's defaults
        saved_config, was_training = model.generation_config, model.training
        model.generation_config = GenerationConfig(eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id)
        model.eval()
        try:
            parts = [self._sample({k: v.to(device) for k, v in inputs.items()}, sampling, call_seed, temperature,
                                  return_logprobs) for inputs, call_seed in calls]
        finally:
            model.generation_config = saved_config
            model.train(was_training)

        width = max(part[0].shape[1] for part in parts)
        ids = torch.cat([_pad_right(part[0], width, self.pad_token_id) for part in parts])
        mask = torch.cat([_pad_right(part[1], width, 0) for part in parts])
        finished = torch.cat([part[2] for part in parts])
        logprobs = torch.cat([_pad_right(part[3], width, 0.0) for part in parts]) if return_logprobs else None
        texts = self.tokenizer.batch_decode([row[m.bool()] for row, m in zip(ids, mask, strict=True)],
                                            skip_special_tokens=True)
        return Rollout(ids, mask, texts, finished, num_generations, logprobs)

    def _sample(self, inputs: dict[str, torch.Tensor], sampling: GenerationConfig, seed: int | None,
                temperature: float, return_logprobs: bool) -> tuple[torch.Tensor, ...]:
        """``(ids, mask, finished, logprobs | None)`` on the CPU for one ``generate`` call."""
        device = inputs["input_ids"].device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            try:
                out = self.model.generate(**inputs, generation_config=sampling)
            except RuntimeError as error:  # torch.multinomial on NaN/inf probabilities: a raw traceback before
                if "probability tensor contains" not in str(error):
                    raise
                raise ValueError("generation met NaN/inf token probabilities: the model's logits overflowed (did the "
                                 "training diverge? lower the learning rate, e.g. optim.lr, and check train/loss and "
                                 f"train/grad_norm in metrics.jsonl) [{error}]") from error
        ids = out.sequences[:, inputs["input_ids"].shape[1]:]
        mask, finished = completion_mask(ids, self.eos_token_ids)
        ids = ids.masked_fill(mask == 0, self.pad_token_id)
        logprobs = None
        if return_logprobs:
            # raw logits (before top-p and suppression), over the shared vocabulary, as the trainer recomputes them
            logits = torch.stack(out.logits, dim=1)[..., :self.vocab_size].float() / temperature
            logprobs = (logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask).cpu()
        return ids.cpu(), mask.cpu(), finished.cpu(), logprobs


def _unpadded_row(inputs: dict[str, torch.Tensor], num_images: list[int], row: int) -> dict[str, torch.Tensor]:
    """Prompt ``row`` alone, its left padding removed (the per-token tensors cut to its real tokens)."""
    out = select_rows(inputs, num_images, [row])
    keep = out["attention_mask"][0] != 0
    width = keep.shape[0]
    return {k: (v[:, keep] if k not in ("pixel_values", "image_grid_thw") and v.dim() == 2 and v.shape[1] == width
                else v) for k, v in out.items()}


def _pad_right(x: torch.Tensor, width: int, value: float) -> torch.Tensor:
    if x.shape[1] == width:
        return x
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)
