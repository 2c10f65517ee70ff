"""vold.config: defaults, YAML round trip, CLI overrides with type coercion, and clear errors."""

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import yaml

from vold.config import (
    KERNEL_ENGINE_KEYS,
    KERNEL_OBJECTIVE_KEYS,
    TRAINER_LOSS_DEFAULTS,
    TRAINER_LOSS_KEYS,
    Config,
    LossConfig,
    apply_override,
    load_config,
    save_config,
    validate,
)
from vold.kernels import PolicyLossConfig, vold_loss


def test_defaults_are_the_papers_settings():
    cfg = load_config()
    assert cfg.rollout.engine == "hf" and cfg.rollout.num_generations == 5 and cfg.rollout.temperature == 1.0
    assert (cfg.loss.epsilon_low, cfg.loss.epsilon_high) == (0.2, 0.3)
    assert (cfg.loss.ref_kl_coef, cfg.loss.ref_kl_estimator) == (0.0, "k3")
    assert (cfg.loss.distill_coef, cfg.loss.distill_estimator, cfg.loss.distill_on_wrong_only) == (0.1, "k2", True)
    assert cfg.optim.lr == 6e-6
    assert cfg.checkpoint.resume == "none" and not cfg.overwrite_output_dir  # a run is continued only when asked


def test_loss_options_mirror_vold_loss_keywords():
    """The loss section = PolicyLossConfig's fields + divergence/jsd_beta (objective) + impl/chunk_size (engine),
    all vold_loss keywords with vold_loss's defaults except the documented TRAINER_LOSS_DEFAULTS, + the
    trainer-only keys, which kernel_options() never passes on."""
    keys = [f.name for f in dataclasses.fields(LossConfig)]
    assert sorted(keys) == sorted((*KERNEL_OBJECTIVE_KEYS, *KERNEL_ENGINE_KEYS, *TRAINER_LOSS_KEYS))
    assert {f.name for f in dataclasses.fields(PolicyLossConfig)} <= set(KERNEL_OBJECTIVE_KEYS)
    params = inspect.signature(vold_loss).parameters
    assert not set(TRAINER_LOSS_KEYS) & set(params)
    for name in (*KERNEL_OBJECTIVE_KEYS, *KERNEL_ENGINE_KEYS):
        assert name in params, f"LossConfig.{name} is not a vold_loss keyword"
        default = dataclasses.fields(LossConfig)[keys.index(name)].default
        expected = TRAINER_LOSS_DEFAULTS.get(name, params[name].default)
        assert default == expected, f"LossConfig.{name} default {default!r} != {expected!r}"
    assert TRAINER_LOSS_DEFAULTS == {"distill_estimator": "k2"}  # the paper's k2; vold_loss: "full"
    assert params["distill_estimator"].default == "full"
    options = LossConfig().kernel_options()
    assert set(options) == {*KERNEL_OBJECTIVE_KEYS, *KERNEL_ENGINE_KEYS} and options["distill_estimator"] == "k2"


def test_yaml_round_trip_with_overrides(tmp_path):
    source = tmp_path / "run.yaml"
    source.write_text(yaml.safe_dump({
        "model": {"student": "Qwen/Qwen2.5-VL-3B-Instruct", "teacher": "/models/qwen3", "vocab_size": 151936},
        "data": {"train_files": ["a.jsonl", "b.parquet"]},
        "optim": {"lr": "1e-6", "max_steps": 10},  # YAML reads 1e-6 (no dot) as a string: coerced
        "loss": {"clip_ratio_c": 3},
        "seed": 7,
    }))
    cfg = load_config(source, ["rollout.engine=vllm", "loss.distill_coef=0.05", "logging.tensorboard=true"])
    assert cfg.optim.lr == 1e-6 and isinstance(cfg.optim.lr, float)
    assert cfg.loss.clip_ratio_c == 3.0 and isinstance(cfg.loss.clip_ratio_c, float)
    assert cfg.model.vocab_size == 151936 and cfg.data.train_files == ["a.jsonl", "b.parquet"]
    assert cfg.rollout.engine == "vllm" and cfg.loss.distill_coef == 0.05 and cfg.logging.tensorboard is True

    saved = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert saved.exists()
    assert load_config(saved) == cfg


@pytest.mark.parametrize("override, key, expected", [
    ("optim.lr=3e-6", ("optim", "lr"), 3e-6),
    ("optim.max_steps=200", ("optim", "max_steps"), 200),
    ("optim.max_steps=2e3", ("optim", "max_steps"), 2000),
    ("data.shuffle=false", ("data", "shuffle"), False),
    ("data.shuffle=Yes", ("data", "shuffle"), True),
    ("model.vocab_size=none", ("model", "vocab_size"), None),
    ("model.vocab_size=152064", ("model", "vocab_size"), 152064),
    ("loss.clip_ratio_c=null", ("loss", "clip_ratio_c"), None),
    ("data.system_prompt=Think, then answer.", ("data", "system_prompt"), "Think, then answer."),
    ("data.train_files=a.jsonl,b.jsonl", ("data", "train_files"), ["a.jsonl", "b.jsonl"]),
    ("reward.weights=[2]", ("reward", "weights"), [2.0]),
    ("reward.functions=[accuracy, my.mod:fn]", ("reward", "functions"), ["accuracy", "my.mod:fn"]),
    ("output_dir=runs/x=1", ("output_dir",), "runs/x=1"),
])
def test_override_coercion(override, key, expected):
    cfg = load_config(None, [override])
    value = cfg
    for part in key:
        value = getattr(value, part)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'; did you mean 'lr'"),
    ("optimizer.lr=1", "unknown config key 'optimizer'"),
    ("optim=1", "'optim' is a section"),
    ("seed.x=1", "'seed' is not a section"),
    ("seed=abc", "config key 'seed' expects an int"),
    ("rollout.num_generations=2.5", "'rollout.num_generations' expects an int"),
    ("data.shuffle=maybe", "'data.shuffle' expects a bool"),
    ("optim.lr=fast", "'optim.lr' expects a float"),
    ("model.dtype=none", "'model.dtype' = 'none' is not one of"),
    ("loss.distill_estimator=k4", "'loss.distill_estimator' = 'k4' is not one of"),
    ("rollout.engine=sglang", "'rollout.engine' = 'sglang'"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("rollout.num_generations=0", "'rollout.num_generations' must be > 0"),
    ("reward.weights=[1, 2]", "reward.weights has 2 values for 1 reward.functions"),
    ("no_equals_sign", "key.sub=value"),
    ("=5", "override '=5' must look like key.sub=value"),
    ("optim.=1", "override 'optim.=1' must look like key.sub=value"),
    ("optim.lr=inf", "config key 'optim.lr' must be a finite number, got 'inf'"),
    ("loss.distill_coef=nan", "config key 'loss.distill_coef' must be a finite number, got 'nan'"),
    ("rollout.temperature=-inf", "config key 'rollout.temperature' must be a finite number"),
    ("optim.max_grad_norm=NaN", "config key 'optim.max_grad_norm' must be a finite number"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, [override])


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("loss:\n  distill_coeff: 0.2\n")
    with pytest.raises(ValueError, match="unknown config key 'loss.distill_coeff'; did you mean 'distill_coef'"):
        load_config(path)
    path.write_text("optim:\n  lr: null\n")
    with pytest.raises(ValueError, match="config key 'optim.lr' cannot be None"):
        load_config(path)
    path.write_text("rollout: 5\n")
    with pytest.raises(ValueError, match="section 'rollout' must be a mapping"):
        load_config(path)


def test_apply_override_mutates_in_place():
    cfg = Config()
    apply_override(cfg, "sft.enabled=true")
    apply_override(cfg, "checkpoint.every=0")
    assert cfg.sft.enabled is True and cfg.checkpoint.every == 0


def test_every_bad_key_is_named_on_one_line():
    with pytest.raises(ValueError) as error:
        load_config(None, ["rollout.num_generations=0", "optim.lr=-1", "loss.divergence=kl"])
    message = str(error.value)
    assert "\n" not in message
    for part in ("'rollout.num_generations' must be > 0", "'optim.lr' must be > 0",
                 "'loss.divergence' = 'kl' is not one of 'reverse_kl', 'forward_kl' or 'jsd'"):
        assert part in message


@pytest.mark.parametrize("override, message", [
    ("loss.jsd_beta=1.5", "config key 'loss.jsd_beta' must be in [0, 1], got '1.5'"),
    ("loss.chunk_size=0", "config key 'loss.chunk_size' must be > 0"),
    ("rollout.sleep_level=3", "config key 'rollout.sleep_level' must be in [1, 2]"),
    ("checkpoint.keep_last=0", "config key 'checkpoint.keep_last' must be >= 1"),
    ("model.lora.rr=3", "unknown config key 'model.lora.rr'; did you mean 'r'?"),
    ("data.train_files=[a", "config key 'data.train_files' expects a list, got '[a'"),
    ("optim.lr.x=1", "config key 'optim.lr' is not a section"),
    # refused when the run reaches them otherwise: vold_loss without the key's name after the first rollouts, a
    # ZeroDivisionError at the end of step 1, a run of no steps
    ("loss.clip_ratio_c=0.5", "config key 'loss.clip_ratio_c' must be > 1, got '0.5'"),
    # the lower clip bound 1 - epsilon_low <= 0 (vold_loss refuses it too)
    ("loss.epsilon_low=1.5", "config key 'loss.epsilon_low' must be in [0, 1), got '1.5'"),
    ("loss.epsilon_low=1", "config key 'loss.epsilon_low' must be in [0, 1), got '1'"),
    ("loss.epsilon_low=-0.1", "config key 'loss.epsilon_low' must be in [0, 1), got '-0.1'"),
    ("logging.every=0", "config key 'logging.every' must be > 0"),
    ("optim.max_steps=-1", "config key 'optim.max_steps' must be >= 0"),
    ("sft.max_steps=-1", "config key 'sft.max_steps' must be >= 0"),
])
def test_ranges_and_nested_keys_are_named(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, [override])


def test_yaml_forms(tmp_path):
    """An empty section is its defaults; none/null for optional keys; a string for a one-item list."""
    path = tmp_path / "run.yaml"
    path.write_text("loss:\nmodel:\n  vocab_size: none\n  lora:\nreward:\n  functions: format\n"
                    "optim:\n  max_steps: 2e3\n")
    cfg = load_config(path)
    assert cfg.loss == LossConfig() and cfg.model.vocab_size is None and cfg.reward.functions == ["format"]
    assert cfg.optim.max_steps == 2000 and type(cfg.optim.max_steps) is int


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_every_shipped_config_round_trips(name, tmp_path):
    cfg = load_config(Path(__file__).parents[1] / "configs" / name)
    assert load_config(save_config(cfg, tmp_path / "config.yaml")) == cfg


def test_validate_checks_assignments_again():
    cfg = Config()
    cfg.rollout.top_p = 2.0  # attribute assignment is not checked (pydantic's default) ...
    with pytest.raises(ValueError, match=re.escape("config key 'rollout.top_p' must be in (0, 1], got 2.0")):
        validate(cfg)  # ... validate() checks the whole config again
    cfg.rollout.top_p = 0.5
    assert validate(cfg) == cfg


def test_config_file_errors_are_one_line(tmp_path):
    # a YAML syntax error used to reach the CLI as a multi-line yaml.ParserError traceback
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: [\n")
    with pytest.raises(ValueError, match=r"bad.yaml line 3, column 1: not valid YAML \(expected the node content"):
        load_config(path)
    with pytest.raises(ValueError, match="config file not found: .*nothere.yaml"):
        load_config(tmp_path / "nothere.yaml")
    with pytest.raises(ValueError, match=r"config file not found: .* \(a folder\)"):
        load_config(tmp_path)


def _leaf_keys(cls=Config, prefix=""):
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING else None):
            yield from _leaf_keys(type(f.default_factory()), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


# numeric keys where a negative value means something (or that are checked only when their feature is on)
NEGATIVE_ALLOWED = {
    "seed",
    "loss.ref_kl_coef", "loss.distill_coef", "loss.entropy_coef",  # signed coefficients, as vold_loss takes them
    "sophia.caption_reward_threshold", "sophia.correct_threshold",  # on the reward functions' own scale
    "reward.weights",  # signed, as TRL's reward_weights
    "model.lora.r", "model.lora.alpha", "model.lora.dropout",  # checked when model.lora.enabled (LoraSettings)
}


def test_every_numeric_key_has_its_range():
    """Every int/float key refuses -1 (and the optional ones 0 where 0 means nothing) unless listed above.

    Found by a new user: optim.adam_beta1=1.5 / optim.adam_eps=-1 were refused by torch's AdamW only after the
    models loaded and the run folder was made (the message naming no key); optim.max_grad_norm=-1 silently
    disabled clipping; eval.max_examples=-1 / traces.max_examples=-1 silently dropped the last row;
    eval.max_new_tokens=0, traces.max_tokens=-1 (every trace dropped), model.min_pixels=-1,
    reward.overlong_cache=-3, rollout.tensor_parallel_size=0 ran."""
    numeric = []
    for key in _leaf_keys():
        try:
            load_config(None, [f"{key}=abc"])
        except ValueError as error:
            if re.search(r"expects (an int|a float)", str(error)):
                numeric.append(key)
    assert {"seed", "optim.lr", "optim.adam_beta1", "eval.max_examples", "model.min_pixels"} <= set(numeric)
    accepted = []
    for key in numeric:
        try:
            load_config(None, [f"{key}=-1"])
        except ValueError as error:
            assert f"'{key}'" in str(error), (key, str(error))
        else:
            accepted.append(key)
    assert sorted(accepted) == sorted(NEGATIVE_ALLOWED)


@pytest.mark.parametrize("overrides,message", [
    (["optim.adam_beta1=1.5"], "config key 'optim.adam_beta1' must be in [0, 1), got '1.5'"),
    (["optim.adam_beta2=1"], "config key 'optim.adam_beta2' must be in [0, 1), got '1'"),
    (["optim.max_grad_norm=-1"], "config key 'optim.max_grad_norm' must be >= 0"),
    (["eval.max_new_tokens=0"], "config key 'eval.max_new_tokens' must be > 0"),
    (["model.min_pixels=5000", "model.max_pixels=1000"],
     "config key 'model.min_pixels' (5000) must be <= 'model.max_pixels' (1000)"),
    (["traces.max_tokens=3", "traces.min_tokens=5"],
     "config key 'traces.max_tokens' (3) must be >= 'traces.min_tokens'"),
])
def test_numeric_ranges_and_pairs_are_named(overrides, message):
    with pytest.raises(ValueError) as info:
        load_config(None, overrides)
    assert message in str(info.value)
