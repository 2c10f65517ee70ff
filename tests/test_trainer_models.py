"""vold.models on tiny Qwen2.5-VL / Qwen3 / Llama models: hidden states @ lm_head^T are the logits.

This is what lets the fused losses replace ``model(...).logits``: the same numbers, without [B, T, V].
"""

import importlib.util

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil, Qwen3ForCausalLM

from vold.data import Example, build_prompt_batch, repeat_inputs
from vold.kernels import fused_linear_logprobs
from vold.models import (
    QwenVLProcessor,
    check_vocab_compatible,
    completion_hidden_states,
    hidden_states,
    is_gradient_checkpointing,
    lm_head_weight,
    load_processor,
    load_student,
    load_teacher,
    resolve_attn_implementation,
    set_gradient_checkpointing,
    text_position_ids,
)
from vold.testing import (
    make_tiny_images,
    make_tiny_processor,
    make_tiny_student,
    make_tiny_teacher,
    make_tiny_text_student,
    make_tiny_tokenizer,
    save_tiny_models,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tiny_tokenizer()
    return {
        "tokenizer": tokenizer, "processor": make_tiny_processor(tokenizer),
        "student": make_tiny_student(tokenizer), "teacher": make_tiny_teacher(tokenizer),
        "llama": make_tiny_text_student(tokenizer),
    }


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, image in enumerate(make_tiny_images(3)):
        image.save(root / f"{i}.png")
        paths.append(str(root / f"{i}.png"))
    return [
        Example("What is 2+2? Answer in \\boxed{}.", "4", images=[paths[0]], teacher_prompt="Two and two?"),
        Example("Short.", "1"),  # no image in the same batch
        Example("Two pictures; which is larger?", "left", images=paths[1:],
                teacher_prompt="A long description of both pictures, then the question."),
    ]


def test_vlm_hidden_states_times_head_equal_logits_with_images(tiny, examples):
    model = tiny["student"]
    inputs = build_prompt_batch(examples, tiny["processor"]).student_inputs
    assert not inputs["attention_mask"].all()  # left padding is exercised
    with torch.no_grad():
        hidden = hidden_states(model, **inputs)
        logits = model(**inputs).logits
    assert hidden.shape == (*inputs["input_ids"].shape, model.config.text_config.hidden_size)
    torch.testing.assert_close(hidden @ lm_head_weight(model).T, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["teacher", "llama", "student"])
def test_text_hidden_states_times_head_equal_logits(tiny, examples, name):
    """Qwen3 teacher, Llama (SmolLM2-like) text student, and the VLM on a text-only batch."""
    model = tiny[name]
    batch = build_prompt_batch(examples[1:2] + examples[:1], tiny["processor"], tiny["tokenizer"])
    inputs = batch.teacher_inputs
    assert not inputs["attention_mask"].all()
    with torch.no_grad():
        hidden = hidden_states(model, **inputs)
        logits = model(**inputs, position_ids=text_position_ids(inputs["attention_mask"])).logits
    torch.testing.assert_close(hidden @ lm_head_weight(model).T, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_left_padding_changes_nothing(tiny, examples, name):
    """A row's hidden states are the same alone (no padding) as in a left-padded batch."""
    model = tiny[name]
    if name == "student":
        build = lambda rows: build_prompt_batch(rows, tiny["processor"]).student_inputs  # noqa: E731
    else:
        build = lambda rows: build_prompt_batch(rows, tiny["processor"], tiny["tokenizer"]).teacher_inputs  # noqa: E731
    batched = build(examples)
    with torch.no_grad():
        together = hidden_states(model, **batched)
        for row, example in enumerate(examples):
            alone = hidden_states(model, **build([example]))
            length = alone.shape[1]
            assert batched["attention_mask"][row, :-length].sum() == 0
            torch.testing.assert_close(together[row, -length:], alone[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_completion_hidden_states_give_the_completion_logprobs(tiny, examples, name):
    model, tokenizer = tiny[name], tiny["tokenizer"]
    batch = build_prompt_batch(examples, tiny["processor"], tokenizer)
    prompt_inputs = batch.student_inputs if name == "student" else batch.teacher_inputs
    prompt_inputs = repeat_inputs(prompt_inputs, batch.num_images if name == "student" else [0] * 3, 2)
    completions = ["\\boxed{4}<|im_end|>", "no", "left<|im_end|>", "x", "\\boxed{1}", "ab<|im_end|>"]
    encoded = tokenizer(completions, padding=True, padding_side="right", add_special_tokens=False, return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    with torch.no_grad():
        hidden = completion_hidden_states(model, prompt_inputs, ids, mask)
        logp = fused_linear_logprobs(hidden, lm_head_weight(model), ids)
        full_ids = torch.cat([prompt_inputs["input_ids"], ids], 1)
        full_mask = torch.cat([prompt_inputs["attention_mask"], mask], 1)
        extra = {k: v for k, v in prompt_inputs.items() if k in ("pixel_values", "image_grid_thw")}
        if "mm_token_type_ids" in prompt_inputs:
            extra["mm_token_type_ids"] = torch.cat([prompt_inputs["mm_token_type_ids"], torch.zeros_like(ids)], 1)
        else:
            extra["position_ids"] = text_position_ids(full_mask)
        logits = model(input_ids=full_ids, attention_mask=full_mask, **extra).logits
    prompt_len = prompt_inputs["input_ids"].shape[1]
    expected = logits[:, prompt_len - 1:-1].log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert hidden.shape[:2] == ids.shape
    torch.testing.assert_close(logp * mask, expected * mask, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="repeat the prompts"):
        completion_hidden_states(model, prompt_inputs, ids[:3], mask[:3])


def test_vocab_compatibility(tiny):
    tokenizer = tiny["tokenizer"]
    vocab = len(tokenizer)
    assert check_vocab_compatible(tiny["student"], tiny["teacher"], None, tokenizer, tokenizer) == vocab
    padded = make_tiny_teacher(tokenizer, vocab_size=vocab + 10)  # e.g. 152064 vs 151936 rows
    with pytest.raises(ValueError, match=f"student lm_head has {vocab} rows and teacher lm_head {vocab + 10}.*"
                                         f"set model.vocab_size"):
        check_vocab_compatible(tiny["student"], padded)
    assert check_vocab_compatible(tiny["student"], padded, vocab_size=vocab) == vocab
    with pytest.raises(ValueError, match=f"vocab_size={vocab + 5} must be in"):
        check_vocab_compatible(tiny["student"], padded, vocab_size=vocab + 5)
    with pytest.raises(ValueError, match="student tokenizer has .* more than the shared vocab_size=50"):
        check_vocab_compatible(tiny["student"], padded, 50, tokenizer, tokenizer)

    other = make_tiny_tokenizer()  # same ids except two swapped tokens
    a, b = other.convert_ids_to_tokens([40, 41])
    other_vocab = {**other.get_vocab(), a: 41, b: 40}
    other.get_vocab = lambda: other_vocab
    with pytest.raises(ValueError, match="disagree on 2 token ids"):
        check_vocab_compatible(tiny["student"], tiny["teacher"], None, tokenizer, other)


def test_lm_head_weight_follows_tied_embeddings(tiny):
    llama = tiny["llama"]
    assert lm_head_weight(llama) is llama.get_input_embeddings().weight
    student = tiny["student"]
    assert lm_head_weight(student) is student.lm_head.weight
    assert lm_head_weight(student).shape == (len(tiny["tokenizer"]), student.config.text_config.hidden_size)


def test_load_from_disk_offline(tmp_path, examples):
    student_dir, teacher_dir = save_tiny_models(tmp_path)
    student = load_student(str(student_dir), dtype="float32", device="cpu", local_files_only=True,
                           gradient_checkpointing=True)
    teacher = load_teacher(str(teacher_dir), dtype="bfloat16", device="cpu", local_files_only=True)
    assert isinstance(student, Qwen2_5_VLForConditionalGeneration) and student.training
    assert is_gradient_checkpointing(student) and student.config._attn_implementation == "sdpa"
    assert isinstance(teacher, Qwen3ForCausalLM) and not teacher.training
    assert teacher.dtype == torch.bfloat16 and not any(p.requires_grad for p in teacher.parameters())
    set_gradient_checkpointing(student, False)
    assert not is_gradient_checkpointing(student)

    processor = load_processor(str(student_dir), local_files_only=True, max_pixels=28 * 28 * 4)
    assert isinstance(processor, QwenVLProcessor)
    assert isinstance(processor.image_processor, Qwen2VLImageProcessorPil)
    assert processor.tokenizer.padding_side == "left" and "<|image_pad|>" in processor.chat_template
    smaller = load_processor(str(student_dir), local_files_only=True, max_pixels=28 * 28 * 2)
    assert smaller.image_processor.size["longest_edge"] == 28 * 28 * 2
    teacher_tokenizer = load_processor(str(teacher_dir), local_files_only=True)
    assert not hasattr(teacher_tokenizer, "image_processor") and teacher_tokenizer.padding_side == "left"

    # same inputs and outputs as the in-memory originals
    tokenizer = make_tiny_tokenizer()
    reference = build_prompt_batch(examples, make_tiny_processor(tokenizer), tokenizer)
    batch = build_prompt_batch(examples, processor, teacher_tokenizer)
    for key, value in reference.student_inputs.items():
        assert torch.equal(batch.student_inputs[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(hidden_states(student.eval(), **batch.student_inputs),
                                   hidden_states(make_tiny_student(tokenizer), **reference.student_inputs))
    with pytest.raises(OSError):
        load_student(str(tmp_path / "absent"), device="cpu", local_files_only=True)


def test_resolve_attn_implementation(monkeypatch):
    assert resolve_attn_implementation("auto", "cpu") == "sdpa"
    assert resolve_attn_implementation("eager", "cuda") == "eager"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a))
    assert resolve_attn_implementation("auto", "cuda") == "flash_attention_2"
    assert resolve_attn_implementation("auto", "cpu") == "sdpa"
