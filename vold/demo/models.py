"""The demo's two models, built from configs with random weights (nothing is downloaded).

- teacher: a Qwen3 causal LM (text only), trained from scratch on step-by-step solutions;
- student: a Qwen2.5-VL (vision tower + language model), first trained for perception only.

Both use :func:`vold.tiny.make_tiny_tokenizer` (character level, Qwen's special tokens), so the
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
from vold.tiny import CHAT_TEMPLATE, make_tiny_tokenizer

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


def align_vision(path: Path, output: Path, *, steps: int, lr: float, batch: int, seed: int = 0) -> dict[str, float]:
    """Train the student's vision tower and projector (the merger) so that the image token of each
    character cell *is* that character's input embedding in the language model; save to ``output``.

    Loss (relative squared error per image token, the language model frozen and its embeddings the target):

        L = mean_i ||v_i - E[c_i]||^2 / ||E[c_i]||^2

    over the tokens ``v_i`` of ``batch`` random strings of the font's characters (3-8 of them, rendered by
    :func:`vold.demo.task.render`), with ``E`` the language model's ``embed_tokens`` weight and ``c_i``
    the character in cell ``i``. After it, an image of ``3+4*2`` reaches the language model as (nearly)
    the embeddings of the text ``3+4*2``: the toy's stand-in for a VLM whose visual tokens live in the
    language model's input space. Adam, constant ``lr``, ``steps`` updates, float32 on the CPU.
    Returns ``{"loss_first": ..., "loss_last": ..., "token_accuracy": ...}`` (the last: the share of
    tokens of a fresh batch whose nearest embedding, by cosine, is their own character's).
    """
    import random

    from vold.demo.task import GLYPHS, render

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    processor = QwenVLProcessor.from_pretrained(path)
    tokenizer = processor.tokenizer
    chars = [c for c in GLYPHS if c != " "]
    char_ids = torch.tensor([tokenizer.convert_tokens_to_ids(c) for c in chars])
    if any(tokenizer.encode(c, add_special_tokens=False) != [i] for c, i in zip(chars, char_ids.tolist(), strict=True)):
        raise ValueError("the tokenizer has no single token for every character of the font")
    embed = model.get_input_embeddings().weight.detach()
    for param in model.parameters():
        param.requires_grad_(False)
    visual = model.model.visual
    for param in visual.parameters():
        param.requires_grad_(True)
    optimizer = torch.optim.Adam(visual.parameters(), lr=lr)

    def sample() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        texts = ["".join(rng.choice(chars) for _ in range(rng.randint(3, 8))) for _ in range(batch)]
        inputs = processor.image_processor(images=[render(t) for t in texts], return_tensors="pt")
        ids = torch.tensor([tokenizer.convert_tokens_to_ids(c) for t in texts for c in t])
        return inputs["pixel_values"], inputs["image_grid_thw"], ids

    def tokens(pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return torch.cat(model.model.get_image_features(pixels, grid).pooler_output)

    losses = []
    visual.train()
    for _ in range(steps):
        pixels, grid, ids = sample()
        out, target = tokens(pixels, grid), embed[ids]
        loss = ((out - target) ** 2).sum(-1).div(target.pow(2).sum(-1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    visual.eval()
    with torch.no_grad():
        pixels, grid, ids = sample()
        out = torch.nn.functional.normalize(tokens(pixels, grid), dim=-1)
        table = torch.nn.functional.normalize(embed[char_ids], dim=-1)
        nearest = char_ids[(out @ table.T).argmax(-1)]
        accuracy = (nearest == ids).float().mean().item()
    for param in model.parameters():
        param.requires_grad_(True)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    k = max(1, min(20, steps // 10))
    return {"loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k, "token_accuracy": accuracy}
