"""The demo's two models, built from configs with random weights (nothing is downloaded).

- teacher: a Qwen3 causal LM (text only), trained from scratch on step-by-step solutions;
- student: a Qwen2.5-VL (vision tower + language model), first trained for perception only.

Both use :func:`vold.testing.make_tiny_tokenizer` (character level, Qwen's special tokens), so the
teacher can score the student's token ids: one vocabulary, as distillation needs.

The student's M-RoPE puts every rotary frequency on the image *width* axis (``mrope_section =
[0, 0, head_dim / 2]``; Qwen's own split is t/h/w). For text tokens the three axes are equal, so this
is plain RoPE; for a one-row image it gives the k-th image token (the k-th character) the position
the k-th character of the text would have. That is the toy's stand-in for the image/text alignment a
real VLM gets from pre-training. With Qwen's split, text-only post-training of these tiny models
eroded their reading of images more (in a paired trial, the problem was restated right 55% of the
time after the cold start instead of 90%); it erodes it with this one too, by an amount that varies
a lot from one perception model to the next (docs/demo.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from vold.models import QwenVLProcessor
from vold.testing import CHAT_TEMPLATE, make_tiny_tokenizer

MIN_PIXELS, MAX_PIXELS = 28 * 28, 28 * 28 * 8  # problems are rendered 28 px high, up to 8 characters wide


def _special_ids(tokenizer) -> dict:
    return {"bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def save_teacher(path: Path, *, hidden_size: int, layers: int, heads: int = 4, seed: int = 0) -> Path:
    """A randomly initialised Qwen3 causal LM + the shared tokenizer, saved to ``path``."""
    tokenizer = make_tiny_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=3 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=hidden_size // heads, max_position_embeddings=256, tie_word_embeddings=False,
        **_special_ids(tokenizer),
    )
    torch.manual_seed(seed)
    Qwen3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def save_student(path: Path, *, hidden_size: int, layers: int, vision_hidden: int, vision_depth: int,
                 heads: int = 4, seed: int = 0) -> Path:
    """A randomly initialised Qwen2.5-VL + the shared tokenizer's processor, saved to ``path``."""
    tokenizer = make_tiny_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    head_dim = hidden_size // heads
    if head_dim % 8:
        raise ValueError(f"hidden_size / heads = {head_dim} must be a multiple of 8 (M-RoPE sections)")
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=3 * hidden_size,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=256,
            rope_scaling={"type": "mrope", "mrope_section": [0, 0, head_dim // 2]},
            tie_word_embeddings=False, **_special_ids(tokenizer),
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
            out_hidden_size=hidden_size, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            window_size=56, fullatt_block_indexes=[vision_depth - 1],
        ),
        tie_word_embeddings=False, **ids, **_special_ids(tokenizer),
    )
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    processor = QwenVLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(path)
    return Path(path)
