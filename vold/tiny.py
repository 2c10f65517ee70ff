"""Tiny, offline stand-ins for the real models: for the tests, the benchmarks and the CPU demo (nothing is
downloaded). ``vold.testing`` re-exports them beside the test fixtures (rewards, ``prepare_tiny_run``).

- :func:`make_tiny_tokenizer`: a character-level ``PreTrainedTokenizerFast`` with Qwen's special
  tokens (``<|im_start|>``, ``<|im_end|>`` = EOS, ``<|image_pad|>``, ...) and a Qwen-style chat template.
- :func:`make_tiny_processor`: a :class:`vold.models.QwenVLProcessor` from ``Qwen2VLImageProcessorPil``
  and that tokenizer (no video processor, no torchvision).
- :func:`make_tiny_teacher` (Qwen3 causal LM) and :func:`make_tiny_student` (Qwen2.5-VL), sharing
  the tokenizer's vocabulary; :func:`make_tiny_text_student` (Llama, like SmolLM2).
- :func:`save_tiny_models` / :func:`write_tiny_dataset`: the same on disk, for the loaders.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from vold.models import QwenVLProcessor

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# image-processor bounds that keep tiny test images at a few patches
TINY_MIN_PIXELS = 28 * 28
TINY_MAX_PIXELS = 56 * 56


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: Qwen's special tokens, ``<unk>``, then the printable ASCII characters."""
    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + ["<unk>"] + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<unk>", padding_side="left")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> QwenVLProcessor:
    tokenizer = tokenizer or make_tiny_tokenizer()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    return QwenVLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int | None]:
    return {"bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def make_tiny_teacher(tokenizer: PreTrainedTokenizerFast, *, hidden_size: int = 48, vocab_size: int | None = None,
                      seed: int = 0) -> Qwen3ForCausalLM:
    """A 2-layer Qwen3 causal LM over ``tokenizer``'s vocabulary (``vocab_size`` rows to pad the head)."""
    config = Qwen3Config(
        vocab_size=vocab_size or len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
        max_position_embeddings=512, tie_word_embeddings=False, **_special_ids(tokenizer),
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()


def make_tiny_student(tokenizer: PreTrainedTokenizerFast, *, hidden_size: int = 32, vocab_size: int | None = None,
                      seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """A Qwen2.5-VL with a 2-block vision tower and a 2-layer language model over ``tokenizer``'s vocabulary."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    head_dim = hidden_size // 4
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size or len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rope_scaling={"type": "mrope", "mrope_section": [head_dim // 8, head_dim // 8, head_dim // 4]},
            tie_word_embeddings=False, **_special_ids(tokenizer),
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
        ),
        tie_word_embeddings=False, **ids, **_special_ids(tokenizer),
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def make_tiny_text_student(tokenizer: PreTrainedTokenizerFast, *, hidden_size: int = 32,
                           seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama causal LM (the SmolLM2 architecture), for text-only students."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        **_special_ids(tokenizer),
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def make_tiny_images(n: int, *, seed: int = 0, sizes: tuple[tuple[int, int], ...] = ((40, 50), (60, 30))) -> list:
    """``n`` random RGB PIL images of a few sizes (height, width)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(*sizes[i % len(sizes)], 3), dtype=np.uint8))
            for i in range(n)]


def save_tiny_models(root: str | Path, *, seed: int = 0) -> tuple[Path, Path]:
    """Write a tiny student (Qwen2.5-VL + processor) and teacher (Qwen3 + tokenizer); returns their folders."""
    root = Path(root)
    tokenizer = make_tiny_tokenizer()
    student_dir, teacher_dir = root / "student", root / "teacher"
    make_tiny_student(tokenizer, seed=seed).save_pretrained(student_dir)
    make_tiny_processor(tokenizer).save_pretrained(student_dir)
    make_tiny_teacher(tokenizer, seed=seed + 1).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    return student_dir, teacher_dir


def write_tiny_dataset(root: str | Path, num_rows: int = 8, *, images: bool = True, seed: int = 0,
                       filename: str = "data.jsonl") -> Path:
    """A JSONL of small sums with ``\\boxed{}`` answers (and one PNG per row); returns the file."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pictures = make_tiny_images(num_rows, seed=seed) if images else []
    path = root / filename
    with open(path, "w", encoding="utf-8") as f:
        for i in range(num_rows):
            a, b = (int(x) for x in rng.integers(0, 10, size=2))
            row = {"prompt": f"{a}+{b}=? Answer in \\boxed{{}}.", "answer": str(a + b),
                   "teacher_prompt": f"The picture shows {a} and {b}. {a}+{b}=? Answer in \\boxed{{}}.",
                   "data_source": "tiny_sums"}
            if images:
                name = f"{Path(filename).stem}_image_{i}.png"
                pictures[i].save(root / name)
                row["image"] = name
            f.write(json.dumps(row) + "\n")
    return path
