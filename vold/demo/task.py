"""The demo's task: short arithmetic expressions (``3+4*2``) solved in steps, as text and as images.

A problem is ``a o1 b o2 c`` with digits ``a, b, c`` in 0..9 and operators from ``+ - *`` (at most
one ``*``; every intermediate result is >= 0), evaluated with the usual precedence. Its step-by-step
solution (the teacher's trace format) restates the problem, then does one operation a line:

    3+4*2          the problem, restated
    4*2=8          the product first
    3+8=11         then left to right
    \\boxed{11}

The restatement is what lets reasoning learnt on text run on an image: the student reads the image
into the same characters the text prompt has, and everything after that line depends only on
those characters (the toy counterpart of a VLM whose visual and textual inputs are aligned by
pre-training). A "direct" answer (``3+4*2=\\boxed{11}``) restates and answers without the steps:
what the perception-aligned student is taught, the analogue of a base VLM that reads well and
reasons poorly.

Images are rendered with a built-in 5x7 bitmap font (no font files: the same pixels on every
machine), one 28 x 28 px cell per character (a 5-character problem is 28 x 140 px). With
Qwen2.5-VL's 14 px patches and 2 x 2 merging, one image token covers one character.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

OPS = "+-*"
INSTRUCTION = "Solve."  # after the problem (text) or after the image
READ_INSTRUCTION = "Read."  # after the image: transcribe it (the perception stage; SOPHIA's caption prompt)
COMPUTE_INSTRUCTION = "Compute."  # after one operation (text): its result (the student LM's pre-training)

# 5 x 7 glyphs ('#' = ink)
GLYPHS = {
    "0": [".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."],
    "1": ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."],
    "2": [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"],
    "3": ["####.", "....#", "....#", ".###.", "....#", "....#", "####."],
    "4": ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."],
    "5": ["#####", "#....", "####.", "....#", "....#", "#...#", ".###."],
    "6": ["..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."],
    "7": ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."],
    "8": [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."],
    "9": [".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."],
    "+": [".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."],
    "-": [".....", ".....", ".....", "#####", ".....", ".....", "....."],
    "*": [".....", "#.#.#", ".###.", "#####", ".###.", "#.#.#", "....."],
    "=": [".....", ".....", "#####", ".....", "#####", ".....", "....."],
    " ": ["....."] * 7,
}
CELL_W, CELL_H, SCALE_X, SCALE_Y = 28, 28, 4, 3  # a glyph is 20 x 21 px in a 28 x 28 px cell


@dataclass(frozen=True)
class Problem:
    a: int
    o1: str
    b: int
    o2: str
    c: int

    @property
    def text(self) -> str:
        return f"{self.a}{self.o1}{self.b}{self.o2}{self.c}"

    def steps(self) -> list[tuple[int, str, int, int]]:
        """The operations in evaluation order: ``(x, op, y, result)``."""
        if self.o2 == "*" and self.o1 != "*":  # a o1 (b*c)
            first = (self.b, "*", self.c, self.b * self.c)
            return [first, (self.a, self.o1, first[3], apply(self.a, self.o1, first[3]))]
        first = (self.a, self.o1, self.b, apply(self.a, self.o1, self.b))
        return [first, (first[3], self.o2, self.c, apply(first[3], self.o2, self.c))]

    @property
    def answer(self) -> int:
        return self.steps()[-1][3]

    def solution(self) -> str:
        """The step-by-step trace (what the teacher learns to write)."""
        lines = [self.text] + [f"{x}{op}{y}={r}" for x, op, y, r in self.steps()]
        return "\n".join(lines) + f"\n\\boxed{{{self.answer}}}"

    def transcription(self) -> str:
        """What the image shows, as text (the answer to the read prompt; a caption in SOPHIA's sense)."""
        return self.text

    def direct(self) -> str:
        """Restate and answer at once, no steps (the perception stage's target)."""
        return f"{self.text}=\\boxed{{{self.answer}}}"


def apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y if op == "-" else x * y


def facts() -> list[tuple[int, str, int]]:
    """Every one-operation problem ``x o y`` that occurs as a step of some problem (1125 of them), in a
    fixed order: the primitive operations the student's language model learns in its text pre-training."""
    seen = {(x, op, y) for p in all_problems() for x, op, y, _ in p.steps()}
    return sorted(seen, key=lambda f: (OPS.index(f[1]), f[0], f[2]))


def fact_rows(per_row: int = 5, passes: int = 5, seed: int = 0) -> list[dict]:
    """Text rows of the primitive operations, ``per_row`` independent ones a row, every fact in ``passes`` rows:
    ``4*2\n81-9\n...\nCompute.`` -> ``4*2=8\n81-9=72\n...`` (each line the form a step of a solution has;
    no line uses another's result: operations, not the procedure). Several a row: a fact is seen ``passes`` times
    per epoch at the cost of ``passes / per_row`` rows."""
    rng = random.Random(seed)
    lines = []
    for _ in range(passes):
        order = facts()
        rng.shuffle(order)
        lines += order
    rows = []
    for i in range(0, len(lines), per_row):
        group = lines[i:i + per_row]
        texts = [f"{x}{op}{y}" for x, op, y in group]
        prompt = "\n".join(texts) + f"\n{COMPUTE_INSTRUCTION}"
        results = [apply(x, op, y) for x, op, y in group]
        rows.append({"prompt": prompt, "answer": str(results[-1]), "teacher_prompt": prompt,
                     "data_source": "arith_fact",
                     "response": "\n".join(f"{t}={r}" for t, r in zip(texts, results, strict=True))})
    return rows


def all_problems() -> list[Problem]:
    """Every valid problem (at most one ``*``, no negative intermediate result), in a fixed order."""
    out = []
    for a in range(10):
        for o1 in OPS:
            for b in range(10):
                for o2 in OPS:
                    if o1 == o2 == "*":
                        continue
                    for c in range(10):
                        p = Problem(a, o1, b, o2, c)
                        if all(r >= 0 for *_, r in p.steps()):
                            out.append(p)
    return out


def split_problems(seed: int, *, eval: int, perception: int, train: int, teacher: int) -> dict[str, list[Problem]]:
    """Random problem sets of :func:`all_problems`: ``eval`` (held out from all the others), then
    ``perception`` and ``train`` (disjoint from each other), and the ``teacher``'s own training set,
    drawn from everything but ``eval`` (a teacher has seen much; only the benchmark is new to it)."""
    problems = all_problems()
    if eval + perception + train > len(problems) or eval + teacher > len(problems):
        raise ValueError(f"asked for more problems than the {len(problems)} that exist")
    random.Random(seed).shuffle(problems)
    rest = problems[eval:]
    return {"eval": problems[:eval], "perception": rest[:perception], "train": rest[perception:perception + train],
            "teacher": random.Random(seed + 1).sample(rest, teacher)}


def render(text: str) -> Image.Image:
    """``text`` in the bitmap font: black on white, 28 px high, width a multiple of 28."""
    width = -(-len(text) * CELL_W // 28) * 28
    canvas = np.full((CELL_H, width), 255, dtype=np.uint8)
    gh, gw = 7 * SCALE_Y, 5 * SCALE_X
    top, left_pad = (CELL_H - gh) // 2, (CELL_W - gw) // 2
    for i, char in enumerate(text):
        glyph = np.array([[ch == "#" for ch in row] for row in GLYPHS[char]], dtype=bool)
        ink = np.kron(glyph, np.ones((SCALE_Y, SCALE_X), dtype=bool))
        x0 = i * CELL_W + left_pad
        canvas[top:top + gh, x0:x0 + gw][ink] = 0
    return Image.fromarray(canvas).convert("RGB")


def text_prompt(p: Problem) -> str:
    return f"{p.text}\n{INSTRUCTION}"


def image_prompt(instruction: str = INSTRUCTION) -> str:
    """The text after the image. The image takes the problem's place and its end marker (``<|vision_end|>``)
    the line break's, so the k-th character of the problem is as far from the instruction (and from the
    answer) as in the text prompt ``3+4*2\nSolve.``: a copy learnt on text reads the image the same way."""
    return instruction


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def text_rows(problems: list[Problem], response: str | None = None) -> list[dict]:
    """JSONL rows of text problems (``prompt`` = ``teacher_prompt``); ``response``: "solution" | "direct"."""
    rows = []
    for p in problems:
        row = {"prompt": text_prompt(p), "answer": str(p.answer), "teacher_prompt": text_prompt(p),
               "data_source": "arith_text"}
        if response:
            row["response"] = getattr(p, response)()
        rows.append(row)
    return rows


def image_rows(problems: list[Problem], image_dir: Path, rel_to: Path, response: str | None = None,
               instruction: str = INSTRUCTION) -> list[dict]:
    """JSONL rows of image problems (one PNG each, paths relative to ``rel_to``); the teacher's view is the text.
    ``response``: "solution" | "direct" | "transcription" (with ``instruction=READ_INSTRUCTION``)."""
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in problems:
        name = f"{p.a}{'pmt'[OPS.index(p.o1)]}{p.b}{'pmt'[OPS.index(p.o2)]}{p.c}.png"
        path = image_dir / name
        if not path.exists():
            render(p.text).save(path)
        row = {"prompt": image_prompt(instruction), "image": str(path.relative_to(rel_to)), "answer": str(p.answer),
               "teacher_prompt": text_prompt(p), "data_source": "arith_image"}
        if response:
            row["response"] = getattr(p, response)()
        rows.append(row)
    return rows
