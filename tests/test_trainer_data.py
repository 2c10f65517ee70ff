"""vold.data: reading rows, clear errors, prompt batches for student and teacher, repeats, the sampler."""

import io
import json
import sys

import pytest
import torch

from vold.data import (
    Example,
    PromptSampler,
    build_prompt_batch,
    load_examples,
    read_rows,
    repeat_inputs,
)
from vold.testing import make_tiny_images, make_tiny_processor, make_tiny_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return make_tiny_processor(tokenizer)


@pytest.fixture
def image_dir(tmp_path):
    for i, image in enumerate(make_tiny_images(3)):
        image.save(tmp_path / f"img{i}.png")
    return tmp_path


def test_load_examples_reads_every_column(image_dir, processor):
    path = write_jsonl(image_dir / "data.jsonl", [
        {"prompt": "p0", "answer": 3, "image": "img0.png", "data_source": "geo", "level": 2},
        {"prompt": "p1", "answer": "x", "images": ["img1.png", str(image_dir / "img2.png")], "teacher_prompt": "t1"},
        {"prompt": "p2", "answer": "y"},
    ])
    examples = load_examples(path)
    assert [e.prompt for e in examples] == ["p0", "p1", "p2"]
    assert examples[0].answer == "3"  # numbers become strings
    assert examples[0].images == [str(image_dir / "img0.png")]  # relative to the data file
    assert examples[1].images == [str(image_dir / "img1.png"), str(image_dir / "img2.png")]
    assert examples[2].images == []
    assert examples[1].teacher_prompt == "t1" and examples[0].teacher_prompt is None
    assert examples[0].data_source == "geo" and examples[0].extra == {"level": 2}
    assert examples[1].where.endswith("data.jsonl line 2")
    columns = build_prompt_batch(examples, processor).reward_columns(repeat=2)  # kwargs of reward functions
    assert columns["answer"] == ["3", "3", "x", "x", "y", "y"]
    assert columns["level"] == [2, 2, None, None, None, None]
    assert columns["data_source"] == ["geo", "geo", None, None, None, None]


def test_missing_column_names_the_column_and_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    with pytest.raises(ValueError, match=r"d\.jsonl line 2: missing column 'answer'"):
        load_examples(path)
    path = write_jsonl(tmp_path / "e.jsonl", [{"question": "a", "answer": "1"}])
    with pytest.raises(ValueError, match=r"e\.jsonl line 1: missing column 'prompt'"):
        load_examples(path)


@pytest.mark.parametrize("column", ["answer", "solution", "prompt", "teacher_prompt", "data_source", "trace"])
def test_required_columns_are_kept_under_their_own_name(tmp_path, column):
    """`vold sft sft.response_column=answer` (SFT on a prompt/answer dataset) ended in a raw `KeyError: 'answer'`:
    a required column that is also a known one (read as answer, prompt, ...) was not kept in ``extra`` as the
    docstring says (found by the new-user pass). Also with the answer read from another column."""
    row = {"prompt": "p", "answer": "a", "solution": "s", "teacher_prompt": "t", "data_source": "d", "trace": "r"}
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    for answer_column in ("answer", "solution"):
        (example,) = load_examples(path, answer_column=answer_column, required=(column,))
        assert example.extra[column] == row[column]
        assert example.answer == row[answer_column] and example.prompt == "p"


def test_unreadable_or_missing_image_names_the_path(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1", "image": "broken.png"}])
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png \(.*d\.jsonl line 1\)"):
        load_examples(path)
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "answer": "1", "image": "nowhere.png"}])
    with pytest.raises(ValueError, match=r"cannot read image .*nowhere\.png .*file not found"):
        load_examples(path)
    # unchecked at load time, the batch builder still names the file
    examples = load_examples(tmp_path / "d.jsonl", check_images=False)
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        build_prompt_batch(examples, make_tiny_processor())


def test_bad_json_and_bad_files(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": oops}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl line 3: invalid JSON"):
        read_rows(path)
    with pytest.raises(FileNotFoundError, match="data file not found"):
        read_rows(tmp_path / "absent.jsonl")
    (tmp_path / "d.csv").write_text("prompt,answer\n")
    with pytest.raises(ValueError, match="unsupported data file"):
        read_rows(tmp_path / "d.csv")


def test_parquet_without_pyarrow_says_so(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="needs pyarrow"):
        read_rows(path)


def test_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["1", None]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"d\.parquet row 2: missing column 'answer'"):
        load_examples(tmp_path / "d.parquet")
    # an image column as `datasets` writes it: {"bytes": ..., "path": ...}
    buffer = io.BytesIO()
    make_tiny_images(1)[0].save(buffer, format="PNG")
    images = [{"bytes": buffer.getvalue(), "path": None}, None]
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["1", "2"], "image": images}), tmp_path / "i.parquet")
    examples = load_examples(tmp_path / "i.parquet")
    assert examples[0].images == [buffer.getvalue()] and examples[1].images == []
    batch = build_prompt_batch(examples, make_tiny_processor())
    assert batch.num_images == [1, 0] and batch.images[0][0].size == (50, 40)


def test_prompt_batch_for_vlm_student_and_text_teacher(processor, tokenizer, image_dir):
    examples = [
        Example("short", "1", images=[], where="r0"),
        Example("a much longer prompt than the others", "2", images=[str(image_dir / "img0.png"),
                                                                       str(image_dir / "img1.png")], where="r1"),
        Example("mid length", "3", images=[str(image_dir / "img2.png")], teacher_prompt="described", where="r2"),
    ]
    batch = build_prompt_batch(examples, processor, tokenizer, system_prompt="SYS", teacher_system_prompt="TSYS")
    inputs = batch.student_inputs
    assert batch.num_images == [0, 2, 1] and len(batch) == 3
    assert "<|image_pad|>" in batch.student_texts[1] and "SYS" in batch.student_texts[0]
    # left padding: every row ends with real tokens, and the generation prompt is last
    mask = inputs["attention_mask"]
    assert mask[:, -1].all() and not mask[0, 0] and mask[1].all()
    assert (mask.diff(dim=1) >= 0).all()
    for row in range(3):
        assert tokenizer.decode(inputs["input_ids"][row][mask[row].bool()]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(inputs["input_ids"][0][mask[0].bool()]) == batch.student_texts[0]
    # each image became grid.prod() / merge^2 image tokens in its row
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    per_image = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    counts = (inputs["input_ids"] == image_id).sum(1).tolist()
    assert counts == [0, per_image[0] + per_image[1], per_image[2]]
    assert inputs["pixel_values"].shape[0] == inputs["image_grid_thw"].prod(-1).sum()
    # the teacher sees text only: teacher_prompt when given, else the prompt, with its own system prompt
    assert "described" in batch.teacher_texts[2] and "mid length" not in batch.teacher_texts[2]
    assert "short" in batch.teacher_texts[0] and "TSYS" in batch.teacher_texts[0]
    assert "<|image_pad|>" not in "".join(batch.teacher_texts)
    t_mask = batch.teacher_inputs["attention_mask"]
    assert t_mask[:, -1].all() and t_mask.shape == batch.teacher_inputs["input_ids"].shape
    decoded = tokenizer.decode(batch.teacher_inputs["input_ids"][0][t_mask[0].bool()])
    assert decoded == batch.teacher_texts[0]


def test_text_student_rejects_image_rows(tokenizer, image_dir):
    batch = build_prompt_batch([Example("q", "1", where="r0")], tokenizer)
    assert set(batch.student_inputs) == {"input_ids", "attention_mask"} and batch.teacher_inputs is None
    with pytest.raises(ValueError, match="r1: the row has images but the student is text-only"):
        build_prompt_batch([Example("q", "1", images=[str(image_dir / "img0.png")], where="r1")], tokenizer)


def test_repeat_inputs_equals_a_batch_of_repeated_examples(processor, image_dir):
    examples = [
        Example("one image", "1", images=[str(image_dir / "img0.png")]),
        Example("no image at all", "2"),
        Example("two", "3", images=[str(image_dir / "img1.png"), str(image_dir / "img2.png")]),
    ]
    batch = build_prompt_batch(examples, processor)
    repeated = repeat_inputs(batch.student_inputs, batch.num_images, 3)
    direct = build_prompt_batch([e for e in examples for _ in range(3)], processor).student_inputs
    assert repeated.keys() == direct.keys()
    for key in direct:
        assert torch.equal(repeated[key], direct[key]), key
    columns = batch.reward_columns(repeat=3)
    assert columns["answer"] == ["1"] * 3 + ["2"] * 3 + ["3"] * 3


def test_sampler_is_deterministic_and_resumable():
    a, b = PromptSampler(10, 3, seed=1), PromptSampler(10, 3, seed=1)
    draws = [a.next_indices() for _ in range(10)]
    assert draws == [b.next_indices() for _ in range(10)]
    first_epoch = [i for batch in draws[:3] for i in batch]
    assert len(set(first_epoch)) == 9 and set(first_epoch) <= set(range(10))  # no repeats, tail dropped
    assert draws[3:6] != draws[:3]  # a new permutation every epoch
    assert PromptSampler(10, 3, seed=2).next_indices() != PromptSampler(10, 3, seed=1).next_indices()

    for stop in (2, 3, 5):  # mid-epoch, at the epoch boundary, in the second epoch
        original = PromptSampler(10, 3, seed=1)
        for _ in range(stop):
            original.next_indices()
        resumed = PromptSampler(10, 3, seed=1)
        resumed.load_state_dict(json.loads(json.dumps(original.state_dict())))
        assert [resumed.next_indices() for _ in range(4)] == draws[stop:stop + 4]

    with pytest.raises(ValueError, match="sampler state has num_examples=10, this run has 12"):
        PromptSampler(12, 3, seed=1).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="batch_size"):
        PromptSampler(2, 3)
    assert PromptSampler(4, 2, shuffle=False).next_indices() == [0, 1]
