"""The three recipe configs carry the papers' settings, and the README's "Three recipes" table says what they
carry: every cell of the table is checked against its config, and the papers' values (as collected in issue
#14) against a list of their own, so neither the configs nor the README can drift from the papers."""

import math
import re
from pathlib import Path

import pytest
import yaml

from vold.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"VOLD": "paper_qwen2_5_vl_3b_qwen3_8b.yaml", "RL with cold start": "coldstart_rl_paper.yaml",
           "SOPHIA": "sophia_paper.yaml"}

# the papers' values (issue #14's table: VOLD arXiv 2510.23497; RL-with-Cold-Start's SFT/qwen2.5vl_sft.sh and
# GRPO/examples/config.yaml; SOPHIA arXiv 2507.16814)
PAPERS = {
    "VOLD": {
        "model.teacher": "Qwen/Qwen3-8B", "model.freeze_vision_tower": True, "traces.filter_correct": False,
        "traces.max_tokens": 8192, "sft.lr": 5e-5, "sft.batch_size * sft.grad_accum": 256, "sft.max_steps": 4000,
        "sft.weight_decay": 1e-2, "sft.warmup_steps": 150, "sft.lr_scheduler": "cosine", "sft.max_length": 8192,
        "optim.max_steps": 60, "rollout.num_generations": 5, "data.batch_size": 256, "optim.lr": 6e-6,
        "loss.epsilon_low": 0.2, "loss.epsilon_high": 0.3, "rollout.max_new_tokens": 8192,
        "loss.distill_estimator": "k2", "loss.distill_coef": 0.1, "loss.distill_on_wrong_only": True,
        "loss.distill_mask_reward": "accuracy", "loss.ref_kl_coef": 0.0,
    },
    "RL with cold start": {
        "sft.epochs": 3, "sft.batch_size * sft.grad_accum": 64, "sft.lr": 1e-5, "sft.weight_decay": 0.1,
        "sft.lr_scheduler": "cosine",
        "sft.freeze_vision_tower": True, "sft.freeze_projector": False, "model.freeze_vision_tower": False,
        "model.freeze_language_model": False, "loss.ref_kl_estimator": "k3", "loss.ref_kl_coef": 1e-2,
        "loss.epsilon_low": 0.2, "loss.epsilon_high": 0.3, "loss.clip_ratio_c": 3.0, "rollout.num_generations": 10,
        "rollout.temperature": 0.7, "rollout.top_p": 0.99, "data.batch_size": 512, "optim.minibatches": 4,
        "optim.ppo_epochs": 1, "optim.lr": 1e-6, "optim.lr_scheduler": "constant", "rollout.max_new_tokens": 2048,
        "reward.functions": ["accuracy"], "loss.distill_coef": 0.0,
    },
    "SOPHIA": {
        "sophia.num_captions": 8, "sophia.traces_per_caption": 8, "sophia.caption_reward_threshold": 0.75,
        "sophia.correct_threshold": 1.0, "sophia.importance_weighting": "none", "sophia.batch_size": 512,
        "sophia.lr": 2e-5, "sophia.weight_decay": 0.05, "sophia.lr_scheduler": "cosine", "sophia.min_lr_ratio": 0.25,
        "model.freeze_vision_tower": True, "model.teacher": "Qwen/QwQ-32B-Preview",
    },
}


def value(cfg, key: str):
    """A config value by dotted key; ``a * b`` multiplies two keys (the SFT step's rows)."""
    if "*" in key:
        return math.prod(value(cfg, part.strip()) for part in key.split("*"))
    target = cfg
    for part in key.split("."):
        target = getattr(target, part)
    return target


def same(cell: str, actual) -> bool:
    """A README cell (its first word: the part before " (") equals the config's value."""
    text = cell.split(" (")[0].strip()
    if isinstance(actual, bool):
        return text == str(actual).lower()
    if isinstance(actual, (int, float)):
        return math.isclose(float(text), actual, rel_tol=1e-12)
    if isinstance(actual, list):
        return yaml.safe_load(text) == actual
    return text == str(actual)


def readme_table() -> list[list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Three recipes"):]
    section = section[:section.index("\n## ", 1)]
    header = next(line for line in section.splitlines() if line.startswith("| config key |"))
    columns = [c.strip() for c in header.strip("|").split("|")][1:]
    assert columns == list(CONFIGS)
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if re.match(r"\| `[a-z_.* ]+` \|", line)]


@pytest.fixture(scope="module")
def configs():
    return {name: load_config(ROOT / "configs" / file) for name, file in CONFIGS.items()}


def test_the_configs_carry_the_papers_values(configs):
    for name, facts in PAPERS.items():
        for key, expected in facts.items():
            actual = value(configs[name], key)
            if isinstance(expected, float):
                assert actual == pytest.approx(expected, rel=1e-12), (name, key)
            else:
                assert actual == expected, (name, key, actual)


def test_the_readme_table_is_what_the_configs_carry(configs):
    rows = readme_table()
    assert len(rows) > 30
    checked = 0
    for key, *cells in rows:
        key = key.strip("`")
        for name, cell in zip(CONFIGS, cells, strict=True):
            if cell.startswith("—"):
                continue
            actual = value(configs[name], key)
            assert same(cell, actual), f"README says {key} = {cell!r} for {name}, the config has {actual!r}"
            checked += 1
    assert checked > 60


def test_every_config_line_with_a_paper_value_names_its_source():
    """Lines of the three configs either name a source (the paper, the repository's files) or say
    "not verified"; checked on the keys the papers give."""
    sources = {"VOLD": "VOLD §4.1", "RL with cold start": ("GRPO/examples/", "SFT/qwen2.5vl_sft.sh"),
               "SOPHIA": "SOPHIA (2507.16814)"}
    for name, file in CONFIGS.items():
        lines = (ROOT / "configs" / file).read_text(encoding="utf-8").splitlines()
        for key in PAPERS[name]:
            leaf = key.rsplit(".", 1)[-1]
            if "*" in key:
                continue
            section = key.split(".")[0]
            matches = [line for line in _section_lines(lines, section) if line.strip().startswith(leaf + ":")]
            if not matches:  # a default the config does not restate (e.g. model.freeze_language_model: false)
                continue
            tags = sources[name] if isinstance(sources[name], tuple) else (sources[name],)
            assert any(tag in matches[0] for tag in tags), (file, key, matches[0])


def _section_lines(lines: list[str], section: str) -> list[str]:
    out, inside = [], False
    for line in lines:
        if not line.startswith(" ") and line.strip():
            inside = line.startswith(section + ":")
            continue
        if inside:
            out.append(line)
    return out
