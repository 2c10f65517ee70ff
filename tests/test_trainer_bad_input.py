"""Bad input to the stages gives errors that say what is wrong and where (or a defined behaviour):
missing columns, unreadable images, teacher/student vocabulary mismatch, rewards unfit for the
distillation mask, a missing SFT model, images for a text student, too little data.
"""

import json
from pathlib import Path

import pytest

from vold.cli import main
from vold.runs import read_jsonl
from vold.testing import make_tiny_teacher, make_tiny_tokenizer, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml")


def run(command: str, tiny: dict, out: Path, *overrides: str) -> int:
    return main([command, "--config", CONFIG, *tiny_overrides(tiny, out), "sft.enabled=false", *overrides])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_missing_columns_name_the_column_and_the_row(tiny, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?"}])
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: missing column 'answer'"):
        run("train", tiny, tmp_path, f"data.train_files=[{data}]")
    with pytest.raises(ValueError, match=r"bad.jsonl line 1: missing column 'question'"):
        run("eval", tiny, tmp_path, f"eval.files=[{data}]", "data.prompt_column=question")
    traces = write_jsonl(tmp_path / "traces.jsonl", [{"prompt": "1+1?", "answer": "2", "response": "2"}])
    with pytest.raises(ValueError, match=r"traces.jsonl line 1: missing column 'trace'"):
        run("sft", tiny, tmp_path, f"sft.train_files=[{traces}]")
    with pytest.raises(ValueError, match=r"traces.jsonl: 1 rows, but one sft step .* needs at least 2"):
        run("sft", tiny, tmp_path, f"sft.train_files=[{traces}]", "sft.response_column=response")


def test_unreadable_images(tiny, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    data = write_jsonl(tmp_path / "img.jsonl", [{"prompt": "?", "answer": "1", "image": "broken.png"}] * 2)
    with pytest.raises(ValueError, match=r"cannot read image .*broken.png \(.*img.jsonl line 1\)"):
        run("train", tiny, tmp_path, f"data.train_files=[{data}]")
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "?", "answer": "1", "image": "nowhere.png"}])
    with pytest.raises(ValueError, match=r"cannot read image .*nowhere.png .*file not found"):
        run("eval", tiny, tmp_path, f"eval.files=[{missing}]")


def test_image_rows_need_a_teacher_prompt_for_traces_and_a_vlm_student(tiny, tmp_path):
    data = write_jsonl(tmp_path / "img.jsonl", [{"prompt": "What is shown?", "answer": "1",
                                                 "image": str(tiny["train"].parent / "train_image_0.png")}] * 2)
    with pytest.raises(ValueError, match="make-traces needs text-only prompts.*no 'teacher_prompt'"):
        run("make-traces", tiny, tmp_path, f"traces.input_files=[{data}]")
    with pytest.raises(ValueError, match="the training data has images but the student is a text-only model"):
        run("train", tiny, tmp_path, f"model.student={tiny['teacher']}", f"data.train_files=[{data}]")
    assert not (tmp_path / "rl").exists()  # refused after loading the models, before writing the run folder


def test_vocabulary_mismatch_is_an_error_unless_the_shared_size_is_set(tiny, tmp_path):
    tokenizer = make_tiny_tokenizer()
    padded = tmp_path / "padded_teacher"
    make_tiny_teacher(tokenizer, vocab_size=len(tokenizer) + 5).save_pretrained(padded)  # a padded head
    tokenizer.save_pretrained(padded)
    with pytest.raises(ValueError, match=f"student lm_head has {len(tokenizer)} rows and teacher lm_head "
                                         f"{len(tokenizer) + 5}.*set model.vocab_size"):
        run("train", tiny, tmp_path, f"model.teacher={padded}")
    assert run("train", tiny, tmp_path, f"model.teacher={padded}", f"model.vocab_size={len(tokenizer)}",
               "optim.max_steps=1", "loss.distill_estimator=full") == 0
    assert read_jsonl(tmp_path / "rl" / "metrics.jsonl")[0]["distill/reverse_kl"] > 0


def test_rewards_unfit_for_the_distillation_mask(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"distill_mask_reward='format' is not one of reward.functions \['accuracy'\]"):
        run("train", tiny, tmp_path, "loss.distill_mask_reward=format")
    with pytest.raises(ValueError, match=r"reward 'unit_reward' gave values outside \[0, 1\]"):
        run("train", tiny, tmp_path, "reward.functions=[accuracy, test_trainer_bad_input:unit_reward]",
            "loss.distill_mask_reward=unit_reward")
    # without the 1 - r mask any reward scale is fine
    assert run("train", tiny, tmp_path, "reward.functions=[test_trainer_bad_input:unit_reward]",
               "loss.distill_on_wrong_only=false", "optim.max_steps=1") == 0


def unit_reward(completions, **_):
    """A reward in [-1, 1]: not a correctness probability."""
    return [-1.0 if i % 2 else 1.0 for i in range(len(completions))]


def test_missing_sft_model_and_missing_files(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="sft.enabled=true but .*sft/final has no model: run `vold sft`"):
        run("train", tiny, tmp_path, "sft.enabled=true")
    with pytest.raises(FileNotFoundError, match="data file not found"):
        run("sft", tiny, tmp_path, f"sft.train_files=[{tmp_path / 'absent.jsonl'}]")
    with pytest.raises(ValueError, match="no benchmark: set eval.files"):
        run("eval", tiny, tmp_path, "data.eval_files=[]")
    with pytest.raises(ValueError, match=r"one.jsonl: 1 rows, but data.batch_size=2 \(prompts per step\) needs"):
        one = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "1+1?", "answer": "2"}])
        run("train", tiny, tmp_path, f"data.train_files=[{one}]")
