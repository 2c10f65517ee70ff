"""RL with cold start (Wei et al. 2025) as a vold recipe: ``vold sft`` on chain-of-thought traces with images,
then ``vold train`` with GRPO on image prompts, a k3 reference KL and no distillation, through the CLI entry on
tiny models. The recipe's keys come from ``configs/coldstart_rl_paper.yaml``; models, sizes and paths from
``configs/tiny_cpu.yaml``."""

import json
from pathlib import Path

import pytest

from vold.cli import main
from vold.config import load_config
from vold.data import load_examples
from vold.runs import read_jsonl
from vold.testing import prepare_tiny_run, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_cpu.yaml")
PAPER = ROOT / "configs" / "coldstart_rl_paper.yaml"


def recipe_overrides() -> list[str]:
    """The recipe's loss and sampling keys, read from the paper config (G is kept small for the CPU)."""
    paper = load_config(PAPER)
    lc = paper.loss
    return [f"loss.distill_coef={lc.distill_coef}", f"loss.ref_kl_coef={lc.ref_kl_coef}",
            f"loss.ref_kl_estimator={lc.ref_kl_estimator}", f"loss.distill_on_wrong_only={lc.distill_on_wrong_only}",
            f"loss.loss_type={lc.loss_type}", f"loss.epsilon_low={lc.epsilon_low}",
            f"loss.epsilon_high={lc.epsilon_high}", f"rollout.temperature={paper.rollout.temperature}",
            f"sft.enabled={paper.sft.enabled}", "model.teacher="]


def test_paper_config_is_the_papers_setting():
    cfg = load_config(PAPER)
    assert cfg.model.student.startswith("Qwen/Qwen2.5-VL-") and cfg.model.teacher == ""
    assert cfg.loss.distill_coef == 0.0 and cfg.loss.ref_kl_coef == 0.01 and cfg.loss.ref_kl_estimator == "k3"
    assert cfg.rollout.num_generations == 10 and cfg.rollout.temperature == 0.7 and cfg.optim.lr == 1e-6
    assert cfg.sft.enabled and cfg.reward.functions == ["accuracy"]


def test_sft_then_grpo_on_images_with_reference_kl(tmp_path_factory, tmp_path):
    tiny = prepare_tiny_run(tmp_path_factory.mktemp("tiny"))
    # cold-start data: the image rows of the training set with a chain-of-thought trace each
    rows = [json.loads(line) for line in Path(tiny["train"]).read_text().splitlines()]
    cot = tmp_path / "cot.jsonl"
    cot.write_text("".join(json.dumps({**r, "image": str(Path(tiny["train"]).parent / r["image"]),
                                       "trace": f"Add them: {r['answer']}. \\boxed{{{r['answer']}}}"}) + "\n"
                           for r in rows))
    common = ["--config", CONFIG, *tiny_overrides(tiny, tmp_path / "run"), *recipe_overrides()]
    assert main(["sft", *common, f"sft.train_files=[{cot}]", "sft.max_steps=2", "checkpoint.every=0"]) == 0
    assert (tmp_path / "run" / "sft" / "final" / "model.safetensors").is_file()

    assert main(["train", *common, "optim.max_steps=2", "rollout.num_generations=3", "checkpoint.every=0",
                 "reward.functions=[accuracy, vold.testing:digit_reward]"]) == 0
    saved = load_config(tmp_path / "run" / "rl" / "config.yaml")
    assert saved.loss.distill_coef == 0 and saved.loss.ref_kl_coef == 0.01 and saved.model.teacher == ""
    metrics = read_jsonl(tmp_path / "run" / "rl" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0]["train/ref_kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is still the reference
    assert metrics[1]["train/ref_kl"] > 0  # after one update the k3 reference KL is active
    assert all(not k.startswith("distill/") or k == "distill/weight_mean" for m in metrics for k in m)  # no teacher
    samples = read_jsonl(tmp_path / "run" / "rl" / "samples.jsonl")
    assert samples and all("\\boxed" in s["prompt"] for s in samples)
    assert all(e.images for e in load_examples(saved.data.train_files))  # GRPO on image prompts
