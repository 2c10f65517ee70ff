"""Test fixtures on the tiny models of :mod:`vold.tiny` (re-exported here): rewards that random tiny models can
earn, the folders ``configs/tiny_cpu.yaml`` expects (:func:`prepare_tiny_run`, also ``python -m vold.testing
[root]``) and the overrides that point the config at them (:func:`tiny_overrides`)."""

from __future__ import annotations

from pathlib import Path

from vold.tiny import (  # noqa: F401  (re-exported: the tests and benchmarks import them from here)
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    TINY_MAX_PIXELS,
    TINY_MIN_PIXELS,
    make_tiny_images,
    make_tiny_processor,
    make_tiny_student,
    make_tiny_teacher,
    make_tiny_text_student,
    make_tiny_tokenizer,
    save_tiny_models,
    write_tiny_dataset,
)


def digit_reward(completions: list[str], **_: object) -> list[float]:
    """Fraction of digits in each completion: a reward in [0, 1] that differs within a group even for
    random tiny models (whose accuracy is always 0), so the policy-gradient term has something to do.
    Use it as ``reward.functions=[accuracy, vold.testing:digit_reward]``."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def even_length_reward(completions: list[str], **_: object) -> list[float]:
    """1.0 when a completion has an even number of characters, else 0.0: a 0/1 "verifier" that random tiny
    models pass about half the time, so SOPHIA's selection (correct traces of good captions) has something to
    keep. Use it as ``reward.functions=[vold.testing:even_length_reward]``."""
    return [float(len(text) % 2 == 0) for text in completions]


def prepare_tiny_run(root: str | Path = "runs/tiny") -> dict[str, Path]:
    """Everything ``configs/tiny_cpu.yaml`` expects under ``root``: ``models/{student,teacher}`` and
    ``data/{prompts,train,bench}.jsonl`` (text-only prompts for the traces, image rows for training and eval).

    ``python -m vold.testing [root]`` runs it; the tests call it on a temporary folder.
    """
    root = Path(root)
    student, teacher = save_tiny_models(root / "models")
    return {
        "student": student, "teacher": teacher,
        "prompts": write_tiny_dataset(root / "data", 8, images=False, seed=0, filename="prompts.jsonl"),
        "train": write_tiny_dataset(root / "data", 8, images=True, seed=1, filename="train.jsonl"),
        "bench": write_tiny_dataset(root / "data", 4, images=True, seed=2, filename="bench.jsonl"),
    }


def tiny_overrides(paths: dict[str, Path], output_dir: str | Path) -> list[str]:
    """``key=value`` overrides pointing ``configs/tiny_cpu.yaml`` at the folders of :func:`prepare_tiny_run`."""
    return [f"model.student={paths['student']}", f"model.teacher={paths['teacher']}",
            f"data.train_files=[{paths['train']}]", f"data.eval_files=[{paths['bench']}]",
            f"traces.input_files=[{paths['prompts']}]", f"output_dir={output_dir}"]


if __name__ == "__main__":
    import sys

    for name, path in prepare_tiny_run(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny").items():
        print(f"{name}: {path}")
