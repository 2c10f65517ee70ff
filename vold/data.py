"""Prompt data: JSONL/parquet rows -> :class:`Example` -> :class:`PromptBatch` (student + teacher inputs).

A row has ``prompt`` and ``answer``, optionally ``image`` (one path) or ``images`` (a list of paths),
``teacher_prompt`` (the text the teacher sees instead of the prompt, e.g. with the image described)
and ``data_source``; every other column is kept and handed to reward functions as a keyword.
The student's prompt goes through its processor's chat template (images as ``{"type": "image"}``
items, expanded into image tokens by the processor); the teacher's through its tokenizer's.
Prompts are left-padded, so every completion starts at the same column.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

REQUIRED_COLUMNS = ("prompt", "answer")
KNOWN_COLUMNS = ("prompt", "answer", "image", "images", "teacher_prompt", "data_source")

ImageRef = str | bytes  # a file path, or encoded image bytes (parquet exports of image columns)


@dataclass
class Example:
    prompt: str
    answer: str
    images: list[ImageRef] = field(default_factory=list)
    teacher_prompt: str | None = None
    data_source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # the other columns
    where: str = ""  # "file line N" / "file row N", for error messages


# ---- reading ------------------------------------------------------------------------------------

def read_rows(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a ``.jsonl``/``.json`` (one object a line) or ``.parquet`` file, each with where it came from."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow "
                              f"(or convert the file to JSONL)") from None
        table = pq.read_table(path)
        return [(f"{path} row {i + 1}", row) for i, row in enumerate(table.to_pylist())]
    if path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"unsupported data file {path}: expected .jsonl, .json (JSON lines) or .parquet")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((f"{path} line {lineno}", row))
    return rows


def _image_refs(row: dict[str, Any], where: str, root: Path) -> list[ImageRef]:
    value = row.get("images", row.get("image"))
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    refs: list[ImageRef] = []
    for item in items:
        if isinstance(item, dict):  # {"bytes": ..., "path": ...} as written by `datasets`
            item = item.get("bytes") or item.get("path")
        if isinstance(item, (bytes, bytearray)):
            refs.append(bytes(item))
        elif isinstance(item, str) and item:
            path = Path(item).expanduser()
            refs.append(str(path if path.is_absolute() else root / path))
        else:
            raise ValueError(f"{where}: an image must be a path string, got {item!r}")
    return refs


def load_image(ref: ImageRef, where: str = "") -> Image.Image:
    """Decode an image (path or bytes) to RGB; a clear error names the file when it cannot be read."""
    name = ref if isinstance(ref, str) else f"<{len(ref)} bytes>"
    try:
        with Image.open(ref if isinstance(ref, str) else io.BytesIO(ref)) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        context = f" ({where})" if where else ""
        raise ValueError(f"cannot read image {name}{context}: {e}") from None


def require_rows(examples: list[Example], files: str | Path | list[str | Path], need: int, what: str) -> None:
    """Raise a ValueError naming ``files`` when they hold fewer than ``need`` rows (``what`` says who needs them,
    e.g. ``"data.batch_size=8"``): an empty file is an error, never a run over nothing."""
    if len(examples) < need:
        names = ", ".join(map(str, [files] if isinstance(files, (str, Path)) else files))
        have = "empty (no rows)" if not examples else f"{len(examples)} rows"
        raise ValueError(f"{names}: {have}, but {what} needs at least {need}")


def load_examples(paths: str | Path | list[str | Path], *, image_root: str | None = None,
                  check_images: bool = True, prompt_column: str = "prompt", answer_column: str = "answer",
                  required: tuple[str, ...] = ()) -> list[Example]:
    """Read and validate every row of ``paths``; missing columns and unreadable images fail here.

    ``prompt_column``/``answer_column`` name the columns read as ``prompt``/``answer`` (e.g. a
    benchmark's ``question``); ``required`` lists further columns every row must have (kept in ``extra``).
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("no data files given")
    renames = {prompt_column: "prompt", answer_column: "answer"}
    needed = (prompt_column, answer_column, *required)
    examples = []
    for path in paths:
        root = Path(image_root) if image_root is not None else Path(path).parent
        for where, row in read_rows(path):
            for column in needed:
                if row.get(column) is None:
                    raise ValueError(f"{where}: missing column '{column}' (rows need {', '.join(needed)})")
            # every required column is kept in extra under its own name, also one read as prompt/answer or another
            # known column (sft.response_column=answer used to end in KeyError: 'answer')
            kept = {column: row[column] for column in required}
            if renames != {"prompt": "prompt", "answer": "answer"}:
                row = {renames.get(k, k): v for k, v in row.items() if k not in ("prompt", "answer") or k in renames}
            if not isinstance(row["prompt"], str) or not row["prompt"].strip():
                raise ValueError(f"{where}: column '{prompt_column}' must be a non-empty string")
            images = _image_refs(row, where, root)
            if check_images:
                for ref in images:
                    if isinstance(ref, str) and not Path(ref).is_file():
                        raise ValueError(f"cannot read image {ref} ({where}): file not found")
                    try:
                        with Image.open(ref if isinstance(ref, str) else io.BytesIO(ref)) as image:
                            image.verify()
                    except (OSError, UnidentifiedImageError, ValueError) as e:
                        name = ref if isinstance(ref, str) else "<bytes>"
                        raise ValueError(f"cannot read image {name} ({where}): {e}") from None
            teacher_prompt = row.get("teacher_prompt")
            examples.append(Example(
                prompt=row["prompt"],
                answer=str(row["answer"]),
                images=images,
                teacher_prompt=None if teacher_prompt is None else str(teacher_prompt),
                data_source=None if row.get("data_source") is None else str(row["data_source"]),
                extra={**{k: v for k, v in row.items() if k not in KNOWN_COLUMNS}, **kept},
                where=where,
            ))
    return examples


# ---- chat templates and batches -----------------------------------------------------------------

def is_multimodal(processor: Any) -> bool:
    """A processor with an image processor (the VLM student), as opposed to a plain tokenizer."""
    return getattr(processor, "image_processor", None) is not None


def tokenizer_of(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def student_messages(example: Example, system_prompt: str | None, multimodal: bool) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if multimodal:
        content = [{"type": "image"} for _ in example.images] + [{"type": "text", "text": example.prompt}]
        messages.append({"role": "user", "content": content})
    else:
        if example.images:
            raise ValueError(f"{example.where or 'a row'}: the row has images but the student is text-only "
                             f"(its processor has no image processor)")
        messages.append({"role": "user", "content": example.prompt})
    return messages


def teacher_messages(example: Example, system_prompt: str | None) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    text = example.teacher_prompt if example.teacher_prompt is not None else example.prompt
    return messages + [{"role": "user", "content": text}]


@dataclass
class PromptBatch:
    """``B`` prompts, ready for rollouts (student) and for scoring completions (teacher).

    ``student_inputs``: ``input_ids``/``attention_mask [B, Tp]`` left-padded, and for a VLM
    ``pixel_values``, ``image_grid_thw`` (and ``mm_token_type_ids`` where the processor makes them).
    ``teacher_inputs``: ``input_ids``/``attention_mask [B, Tt]`` left-padded, or None without a teacher.
    """

    examples: list[Example]
    student_texts: list[str]
    student_inputs: dict[str, torch.Tensor]
    images: list[list[Image.Image]]
    teacher_texts: list[str] | None = None
    teacher_inputs: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def prompts(self) -> list[str]:
        return [e.prompt for e in self.examples]

    @property
    def num_images(self) -> list[int]:
        return [len(images) for images in self.images]

    def reward_columns(self, repeat: int = 1) -> dict[str, list[Any]]:
        """Dataset columns for reward functions, each value repeated ``repeat`` times (one per completion)."""
        extra_keys = sorted({k for e in self.examples for k in e.extra})
        rows = [{"answer": e.answer, "data_source": e.data_source, "teacher_prompt": e.teacher_prompt,
                 **{k: e.extra.get(k) for k in extra_keys}} for e in self.examples]
        return {key: [row[key] for row in rows for _ in range(repeat)] for key in rows[0]}


def build_prompt_batch(
    examples: list[Example],
    processor: Any,
    teacher_tokenizer: Any | None = None,
    *,
    system_prompt: str | None = None,
    teacher_system_prompt: str | None = None,
) -> PromptBatch:
    """Render and tokenize ``examples`` for the student (``processor``: a VLM processor or a tokenizer)
    and, when ``teacher_tokenizer`` is given, for the teacher (text only)."""
    if not examples:
        raise ValueError("build_prompt_batch needs at least one example")
    multimodal = is_multimodal(processor)
    texts = [processor.apply_chat_template(student_messages(e, system_prompt, multimodal), tokenize=False,
                                           add_generation_prompt=True) for e in examples]
    images = [[load_image(ref, e.where) for ref in e.images] for e in examples]
    flat_images = [image for row in images for image in row]
    kwargs: dict[str, Any] = dict(padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
    if multimodal:
        inputs = processor(text=texts, images=flat_images or None, **kwargs)
    else:
        inputs = processor(texts, **kwargs)
    student_inputs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}

    teacher_texts = teacher_inputs = None
    if teacher_tokenizer is not None:
        t_system = teacher_system_prompt if teacher_system_prompt is not None else system_prompt
        teacher_texts = [teacher_tokenizer.apply_chat_template(teacher_messages(e, t_system), tokenize=False,
                                                               add_generation_prompt=True) for e in examples]
        encoded = teacher_tokenizer(teacher_texts, **kwargs)
        teacher_inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    return PromptBatch(examples, texts, student_inputs, images, teacher_texts, teacher_inputs)


def repeat_inputs(inputs: dict[str, torch.Tensor], num_images: list[int], repeats: int) -> dict[str, torch.Tensor]:
    """Repeat each of the ``B`` rows ``repeats`` times (row i -> rows i*repeats ... i*repeats+repeats-1).

    Per-row tensors are repeat-interleaved; ``pixel_values`` (patches of all images, concatenated)
    and ``image_grid_thw`` (one row per image) are repeated image by image, following ``num_images``.
    """
    batch = len(num_images)
    out: dict[str, torch.Tensor] = {}
    for key, value in inputs.items():
        if key in ("pixel_values", "image_grid_thw"):
            continue
        if value.shape[0] != batch:
            raise ValueError(f"repeat_inputs: {key} has {value.shape[0]} rows for a batch of {batch}")
        out[key] = value.repeat_interleave(repeats, dim=0)
    if "image_grid_thw" in inputs:
        grid = inputs["image_grid_thw"]
        if grid.shape[0] != sum(num_images):
            raise ValueError(f"repeat_inputs: {grid.shape[0]} images in image_grid_thw, num_images says "
                             f"{sum(num_images)}")
        patches = list(inputs["pixel_values"].split(grid.prod(-1).tolist()))
        grids = list(grid)
        pixel_rows, grid_rows, start = [], [], 0
        for count in num_images:
            for _ in range(repeats):
                pixel_rows.extend(patches[start:start + count])
                grid_rows.extend(grids[start:start + count])
            start += count
        out["pixel_values"] = torch.cat(pixel_rows) if pixel_rows else inputs["pixel_values"][:0]
        out["image_grid_thw"] = torch.stack(grid_rows) if grid_rows else grid[:0]
    return out


def select_rows(inputs: dict[str, torch.Tensor], num_images: list[int], rows: list[int]) -> dict[str, torch.Tensor]:
    """Rows ``rows`` (any order, repeats allowed) of a batch of inputs whose row i has ``num_images[i]`` images.

    Per-row tensors are indexed; ``pixel_values`` and ``image_grid_thw`` follow the images of the
    chosen rows (and are left out when those rows have none).
    ``repeat_inputs(x, n, G)`` is ``select_rows(x, n, [i for i in range(B) for _ in range(G)])``.
    """
    index = torch.as_tensor(rows, dtype=torch.long)
    out = {k: v.index_select(0, index.to(v.device)) for k, v in inputs.items()
           if k not in ("pixel_values", "image_grid_thw")}
    if "image_grid_thw" in inputs:
        grid = inputs["image_grid_thw"]
        patches = list(inputs["pixel_values"].split(grid.prod(-1).tolist()))
        first = [0]
        for count in num_images:
            first.append(first[-1] + count)
        chosen = [j for i in rows for j in range(first[i], first[i + 1])]
        if chosen:  # rows without any image: no image inputs at all (the model reads empty ones as images)
            out["pixel_values"] = torch.cat([patches[j] for j in chosen])
            out["image_grid_thw"] = grid[chosen]
    return out


# ---- sampling -----------------------------------------------------------------------------------

class PromptSampler:
    """Endless batches of example indices: a fresh permutation of ``seed + epoch`` every epoch.

    Deterministic and resumable: ``state_dict()`` is ``(epoch, position)``; restoring it continues
    with exactly the batches an uninterrupted run would have drawn. The tail of an epoch that does
    not fill a batch is dropped.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        if batch_size < 1 or num_examples < batch_size:
            raise ValueError(f"batch_size={batch_size} needs 1 <= batch_size <= num_examples={num_examples}")
        self.num_examples, self.batch_size, self.seed, self.shuffle = num_examples, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def next_indices(self) -> list[int]:
        if self.position + self.batch_size > self.num_examples:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        indices = self._order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return indices

    def __iter__(self):
        while True:
            yield self.next_indices()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": self.num_examples, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "num_examples", "batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]}, this run has {getattr(self, key)}: "
                                 f"resuming would draw different batches")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
