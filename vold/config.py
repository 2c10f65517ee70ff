"""Run configuration: nested dataclasses, loaded from YAML, overridden by ``key.sub=value`` strings.

    cfg = load_config("configs/run.yaml", ["optim.lr=1e-6", "rollout.engine=vllm"])
    save_config(cfg, Path(cfg.output_dir) / "config.yaml")

Values are coerced to the dataclass field types (bool, int, float, str, ``X | None``, ``list[X]``);
an unknown key is an error that names it. ``validate`` checks the choices and ranges.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vold.kernels.checks import DIVERGENCES, IMPLS
from vold.kernels.policy_loss import DISTILL_ESTIMATORS, IS_LEVELS, KL_ESTIMATORS, LOSS_TYPES


@dataclass
class LoraSettings:
    """``model.lora.*``: LoRA adapters on the student through the ``peft`` library (``pip install peft``).

    The adapted student computes ``W x + (alpha / r) B A x`` for each target linear layer (Hu et al. 2021;
    ``A [r, in]``, ``B [out, r]``, B starts at 0); only A and B train, the base weights (the lm_head
    included: the fused losses read its frozen weight) stay as loaded. Rollouts see the merged weights
    ``W + (alpha / r) B A`` (HF generate runs the adapted modules, vLLM receives merged tensors); checkpoints
    and ``final/`` hold the adapter (``adapter_config.json``, ``adapter_model.safetensors``, PEFT's layout).
    """

    enabled: bool = False
    r: int = 16  # TRL's ModelConfig.lora_r
    alpha: float = 32.0  # lora_alpha
    dropout: float = 0.05  # lora_dropout
    # module names (peft target_modules: exact suffixes) in the language model; default: the attention and MLP
    # projections of Qwen/Llama blocks. The vision tower gets adapters only when it is not frozen.
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])
    save_merged: bool = False  # final/merged: also the merged full model (save_pretrained), loadable without peft


@dataclass
class ModelConfig:
    """Student (a VLM, or any causal LM) and teacher (a text causal LM): local paths or hub ids."""

    student: str = ""
    teacher: str = ""
    student_tokenizer: str | None = None  # defaults to the student path
    teacher_tokenizer: str | None = None  # defaults to the teacher path
    dtype: str = "bfloat16"  # weights: float32 | bfloat16 | float16
    # forward passes of the student under torch.autocast(this dtype), e.g. float32 weights + bfloat16 compute:
    # with pure bfloat16 weights most AdamW updates at lr ~1e-6 round away (bf16 keeps ~3 significant digits)
    autocast: str | None = None
    teacher_dtype: str | None = None  # defaults to dtype
    attn_implementation: str = "auto"  # auto: flash_attention_2 on CUDA when flash_attn imports, else sdpa
    gradient_checkpointing: bool = True
    local_files_only: bool = False
    trust_remote_code: bool = False
    vocab_size: int | None = None  # shared vocabulary when the heads are padded (e.g. 152064 vs 151936 rows)
    min_pixels: int | None = None  # image processor resolution bounds (Qwen2-VL style)
    max_pixels: int | None = None
    teacher_offload: bool = False  # keep the teacher on the CPU, on the device only while it scores
    # which student parameters train (vold.models.apply_freezing; sft, train and sophia). A VLM has three parts:
    # the vision tower (Qwen2.5-VL: visual.patch_embed + visual.blocks), the projector (visual.merger) and the
    # language model (embeddings, decoder, lm_head). Frozen parameters get no gradient, no optimizer state and
    # no DDP/ZeRO traffic, and are saved unchanged.
    freeze_vision_tower: bool = False
    freeze_projector: bool = False
    freeze_language_model: bool = False
    # regular expressions (re.search) on parameter names, applied after the three switches: "frozen" freezes
    # what it matches, then "trainable" unfreezes what it matches (e.g. freeze_language_model + trainable=[lm_head])
    frozen: list[str] = field(default_factory=list)
    trainable: list[str] = field(default_factory=list)
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class DataConfig:
    """JSONL/parquet rows with ``prompt``, ``answer`` and optional ``image(s)``, ``teacher_prompt``."""

    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    image_root: str | None = None  # relative image paths resolve against this (default: the data file's folder)
    system_prompt: str | None = None
    teacher_system_prompt: str | None = None  # defaults to system_prompt
    batch_size: int = 8  # prompts per step (each gets rollout.num_generations completions)
    eval_batch_size: int = 16
    shuffle: bool = True
    check_images: bool = True  # open every image once when the data is loaded
    prompt_column: str = "prompt"  # read this column as the prompt (e.g. "question" for a benchmark)
    answer_column: str = "answer"


@dataclass
class RolloutConfig:
    """Sampling of the student's completions."""

    engine: str = "hf"  # hf | vllm
    num_generations: int = 5
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    # prompt j of a step's global batch samples with its own seed (vold.distributed.prompt_seeds), so its
    # completions depend neither on the rest of the batch nor on the data-parallel rank that samples it. The hf
    # engine then runs one generate call per prompt; false: one call per batch (seed + step), faster with the
    # hf engine on a GPU, but W ranks no longer draw what one process draws. vLLM seeds requests either way.
    seed_per_prompt: bool = True
    # vLLM only (colocated with the trainer on the same GPUs)
    gpu_memory_utilization: float = 0.3
    enable_sleep_mode: bool = True
    sleep_level: int = 1  # 1: offload weights to CPU; 2: discard them (resynced after every update anyway)
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    max_images_per_prompt: int = 1


@dataclass
class LossConfig:
    """Keyword options of ``vold.kernels.vold_loss`` plus how rewards become advantages and masks."""

    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.3
    clip_ratio_c: float | None = None
    importance_sampling_level: str = "token"
    ref_kl_coef: float = 0.0
    ref_kl_estimator: str = "k3"
    # beta of the paper's objective: 0.1 in its hyper-parameter table; the text quotes 1e-3 elsewhere (set
    # loss.distill_coef=1e-3 to try that one). The kernels' default is 0.1 too.
    distill_coef: float = 0.1
    distill_estimator: str = "k2"  # the paper's choice; "full" = exact reverse KL over the vocabulary
    divergence: str = "reverse_kl"
    jsd_beta: float = 0.5
    entropy_coef: float = 0.0
    distill_on_wrong_only: bool = True  # distill_mask = 1 - r with r the correctness reward in [0, 1]
    distill_mask_reward: str = "accuracy"  # which reward function gives that r
    scale_rewards: str = "group"  # group: (r - mean) / (std + eps); none: r - mean (Dr. GRPO)
    # TRL's name (DAPO's overlong filtering, Yu et al. 2025 §3.4): a completion that hit rollout.max_new_tokens
    # without EOS gets mask 0 in the loss (no policy gradient, no KL terms) and leaves the normalisation counts
    # (tokens, sequences); it still counts in its group's reward statistics and in every logged metric
    mask_truncated_completions: bool = False
    impl: str = "auto"  # kernels engine: auto | torch | torch_compile | triton
    chunk_size: int | None = None


@dataclass
class RewardConfig:
    """Reward functions: built-in names ("accuracy", "format") or "module:function" plugins."""

    functions: list[str] = field(default_factory=lambda: ["accuracy"])
    weights: list[float] | None = None  # one per function; default all 1
    # L_cache of the built-in "soft_overlong" reward (DAPO §3.4; TRL's soft_punish_cache): completions longer than
    # rollout.max_new_tokens - overlong_cache lose up to 1 linearly; L_max is rollout.max_new_tokens
    overlong_cache: int = 0


@dataclass
class OptimConfig:
    lr: float = 6e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lr_scheduler: str = "constant"  # constant | linear | cosine (all after warmup)
    warmup_steps: int = 0  # in optimizer updates (ppo_epochs * minibatches per training step)
    min_lr_ratio: float = 0.0  # linear/cosine decay to min_lr_ratio * lr
    max_steps: int = 1000  # training steps (one rollout batch each)
    # micro-batches per minibatch: memory only, the update is the same for every loss type (dapo and bnpo
    # divide by the minibatch's token count, grpo/dr_grpo weight each micro-batch by its share of the sequences)
    grad_accum: int = 1
    max_grad_norm: float = 1.0  # 0 disables clipping
    ppo_epochs: int = 1  # passes over each rollout batch
    minibatches: int = 1  # optimizer steps per pass
    # the policy update and the frozen scoring passes run each micro-batch as ONE row of its real tokens
    # (prompts + completions, no padding; per-sequence position ids): flash-attn varlen with
    # model.attn_implementation=flash_attention_2, a block-diagonal mask with sdpa/eager (fine for small rows)
    packing: bool = False


@dataclass
class TracesConfig:
    """Stage 0 (``vold make-traces``): the teacher writes reasoning traces for text-only prompts.

    Sampling defaults are Qwen3's recommended thinking-mode settings (temperature 0.6, top-p 0.95).
    """

    input_files: list[str] = field(default_factory=list)  # default: data.train_files
    output_file: str | None = None  # default: {output_dir}/traces.jsonl
    num_samples: int = 1  # traces sampled per prompt
    keep_per_prompt: int = 1  # at most this many traces kept per prompt (those passing the filters, in order)
    max_new_tokens: int = 4096
    temperature: float = 0.6
    top_p: float = 0.95
    batch_size: int = 8  # prompts per generate call
    min_tokens: int = 1  # length filter, in teacher tokens (EOS excluded)
    max_tokens: int | None = None
    drop_truncated: bool = True  # a trace cut at max_new_tokens has no final answer
    filter_correct: bool = True  # keep a trace only when its last \boxed{} equals the answer (math_equal)
    max_examples: int | None = None  # the first N prompts only


@dataclass
class SFTConfig:
    """Stage 1 (``vold sft``): cold-start SFT of the student on the teacher's traces.

    AdamW betas/eps, weight decay and gradient clipping come from ``optim``; the rest is here.
    """

    enabled: bool = False  # true: ``vold train`` starts from the SFT model ({output_dir}/sft/final)
    train_files: list[str] = field(default_factory=list)  # default: [traces.output_file]
    response_column: str = "trace"  # the target text; the prompt comes from data.prompt_column
    epochs: int = 1
    max_steps: int | None = None  # default: epochs * (rows // (batch_size * grad_accum))
    lr: float = 1e-5
    lr_scheduler: str = "cosine"  # constant | linear | cosine (after warmup)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # linear/cosine decay to min_lr_ratio * lr
    weight_decay: float | None = None  # AdamW's (matrices only); None: optim.weight_decay
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_length: int = 2048  # prompt + response tokens; longer responses are cut
    packing: bool = False  # each micro-batch as one row of real tokens (see optim.packing)
    # this stage's freezing switches; None: model.freeze_* (e.g. RL with cold start freezes the ViT for SFT only)
    freeze_vision_tower: bool | None = None
    freeze_projector: bool | None = None
    freeze_language_model: bool | None = None


@dataclass
class SophiaConfig:
    """``vold sophia``: semi-off-policy RL (SOPHIA, Shen et al. 2025), see ``vold/sophia.py`` and docs/sophia.md.

    Per step: ``batch_size`` items (image + question); the student writes K captions of each image (the
    caption prompt, no question); the teacher writes N traces from caption + question; trace reward R
    (``reward.functions``), caption reward = mean R of its traces; kept per item: the shortest correct
    trace among captions whose reward exceeds alpha; the student learns (image, question) -> caption +
    trace with weight R (ratio 1, the paper) or R times a truncated importance weight (``clipped``).
    AdamW betas/eps, weight decay and gradient clipping come from ``optim``; the rest is here.
    """

    num_captions: int = 8  # K captions per image (the paper: 8)
    traces_per_caption: int = 8  # N teacher traces per caption (the paper: 8)
    caption_reward_threshold: float = 0.75  # alpha: a caption qualifies when its mean trace reward is > alpha
    correct_threshold: float = 1.0  # a trace is correct when its reward R >= this (accuracy: R in {0, 1})
    caption_prompt: str = ("Describe this image in detail: every object, number, label, symbol and relation in it "
                           "that a question about the image could need.")
    caption_max_new_tokens: int = 512
    caption_temperature: float = 1.0
    caption_top_p: float = 1.0
    # the teacher's user message (through its chat template); {caption} and {question} are filled in
    teacher_prompt_template: str = ("An image is described as follows.\n{caption}\n\nUsing this description, "
                                    "answer the question.\n{question}")
    trace_max_new_tokens: int = 4096
    trace_temperature: float = 0.6  # the teacher's thinking-mode sampling (as traces.*)
    trace_top_p: float = 0.95
    response_separator: str = "\n\n"  # the student's target: caption tokens + this text + trace tokens + EOS
    importance_weighting: str = "none"  # none: ratio 1 (the paper; reward-weighted SFT) | clipped: min(pi/mu, c)
    is_level: str = "token"  # clipped only: token (per-token truncated IS) | sequence (length-normalised ratio)
    is_clip: float = 1.0  # c: the truncation of the importance weight (V-trace's rho-bar = 1)
    batch_size: int = 8  # items (image + question) per step
    grad_accum: int = 1  # micro-batches per optimizer step (of the kept items)
    max_steps: int = 100  # training steps (one sampling round and one optimizer update each)
    lr: float = 1e-6
    lr_scheduler: str = "constant"  # constant | linear | cosine (after warmup)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # linear/cosine decay to min_lr_ratio * lr (the paper: 0.25)
    weight_decay: float | None = None  # AdamW's (matrices only); None: optim.weight_decay
    max_length: int = 8192  # prompt + response tokens of the update; longer responses are cut


@dataclass
class EvalConfig:
    """``vold eval``: pass@1 and mean@k accuracy on a JSONL benchmark (image path or text, question, answer)."""

    model: str | None = None  # default: model.student
    files: list[str] = field(default_factory=list)  # default: data.eval_files
    num_samples: int = 8  # k completions per question
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = None  # default: rollout.max_new_tokens
    max_examples: int | None = None  # the first N questions of each file only
    output_dir: str | None = None  # default: {output_dir}/eval


@dataclass
class CheckpointConfig:
    every: int = 100  # steps; 0 disables periodic checkpoints
    resume: str = "auto"  # auto (latest in output_dir, if any) | none | a checkpoint path
    keep_last: int = 2
    save_optimizer: bool = True


@dataclass
class LoggingConfig:
    every: int = 1
    jsonl: bool = True
    tensorboard: bool = False  # needs the tensorboard package; skipped with a warning without it
    wandb: bool = False  # needs wandb; skipped with a warning without it
    wandb_project: str = "vold"
    progress: bool = True  # tqdm progress bars, when tqdm is installed
    num_completions: int = 2  # completions written to the log per step


@dataclass
class DistributedConfig:
    """Data parallelism over the processes of a ``torchrun``/``deepspeed`` launch (see ``vold.distributed``).

    Batch sizes stay global (``data.batch_size`` prompts, ``sft.batch_size * sft.grad_accum`` rows per step):
    rank r takes every W-th one. A single process ignores this section (backend ddp)."""

    backend: str = "ddp"  # ddp | deepspeed
    process_group_backend: str = "auto"  # auto: nccl on CUDA, gloo on the CPU
    deepspeed_config: str | None = None  # JSON (e.g. configs/deepspeed/zero2.json); default: ZeRO-2
    find_unused_parameters: bool = True  # DDP: the vision tower gets no gradient from text-only batches
    timeout_minutes: int = 60  # collectives wait this long (one rank may still be sampling long rollouts)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    traces: TracesConfig = field(default_factory=TracesConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    sophia: SophiaConfig = field(default_factory=SophiaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    seed: int = 0
    output_dir: str = "runs/vold"
    device: str = "auto"  # auto: cuda when available, else cpu


# ---- coercion ------------------------------------------------------------------------------------

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~", ""}


def _is_optional(tp: Any) -> tuple[bool, Any]:
    """``X | None`` -> (True, X); anything else -> (False, tp)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value or a CLI string to the field type ``tp``; errors name ``key``."""
    optional, tp = _is_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE):
        if optional:
            return None
        raise ValueError(f"config key '{key}' cannot be None (expected {getattr(tp, '__name__', tp)})")
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = yaml.safe_load(text)
            else:
                value = [part.strip() for part in text.split(",")] if text else []
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key '{key}' expects a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"config key '{key}' expects a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"config key '{key}' expects an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise ValueError(f"config key '{key}' expects an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"config key '{key}' expects a float, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"config key '{key}' expects a float, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"config key '{key}' expects a string, got {value!r}")
        return str(value)
    raise TypeError(f"config key '{key}' has an unsupported type {tp!r}")


def _unknown_key(key: str, valid: list[str]) -> ValueError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    section = key.rsplit(".", 1)[0] if "." in key else "the top level"
    return ValueError(f"unknown config key '{key}'{hint} (valid keys in {section}: {', '.join(valid)})")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a (nested) dict, coercing every value."""
    if not isinstance(values, dict):
        raise ValueError(f"config section '{prefix.rstrip('.') or 'root'}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(prefix + str(key), names)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def apply_override(cfg: Config, override: str) -> None:
    """Apply one ``key.sub=value`` string to ``cfg`` in place."""
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like key.sub=value")
    path, raw = override.split("=", 1)
    parts = path.strip().split(".")
    target: Any = cfg
    for depth, name in enumerate(parts):
        names = [f.name for f in dataclasses.fields(target)]
        if name not in names:
            raise _unknown_key(".".join(parts[: depth + 1]), names)
        tp = typing.get_type_hints(type(target))[name]
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ValueError(f"config key '{path}' is a section; set one of its keys (e.g. {path}.<key>=...)")
            setattr(target, name, _coerce(raw, tp, path))
        else:
            if not dataclasses.is_dataclass(tp):
                raise ValueError(f"config key '{'.'.join(parts[: depth + 1])}' is not a section")
            target = getattr(target, name)


def validate(cfg: Config) -> Config:
    """Check choices and ranges; returns ``cfg`` for chaining."""
    choices = {
        "model.dtype": (cfg.model.dtype, ("float32", "bfloat16", "float16")),
        "model.attn_implementation": (cfg.model.attn_implementation, ("auto", "flash_attention_2", "sdpa", "eager")),
        "rollout.engine": (cfg.rollout.engine, ("hf", "vllm")),
        "loss.loss_type": (cfg.loss.loss_type, LOSS_TYPES),
        "loss.importance_sampling_level": (cfg.loss.importance_sampling_level, IS_LEVELS),
        "loss.ref_kl_estimator": (cfg.loss.ref_kl_estimator, KL_ESTIMATORS),
        "loss.distill_estimator": (cfg.loss.distill_estimator, DISTILL_ESTIMATORS),
        "loss.divergence": (cfg.loss.divergence, DIVERGENCES),
        "loss.scale_rewards": (cfg.loss.scale_rewards, ("group", "none")),
        "loss.impl": (cfg.loss.impl, IMPLS),
        "optim.lr_scheduler": (cfg.optim.lr_scheduler, ("constant", "linear", "cosine")),
        "sft.lr_scheduler": (cfg.sft.lr_scheduler, ("constant", "linear", "cosine")),
        "sophia.lr_scheduler": (cfg.sophia.lr_scheduler, ("constant", "linear", "cosine")),
        "sophia.importance_weighting": (cfg.sophia.importance_weighting, ("none", "clipped")),
        "sophia.is_level": (cfg.sophia.is_level, ("token", "sequence")),
        "distributed.backend": (cfg.distributed.backend, ("ddp", "deepspeed")),
        "distributed.process_group_backend": (cfg.distributed.process_group_backend, ("auto", "gloo", "nccl")),
    }
    if cfg.model.autocast is not None:
        choices["model.autocast"] = (cfg.model.autocast, ("float32", "bfloat16", "float16"))
    if cfg.model.teacher_dtype is not None:
        choices["model.teacher_dtype"] = (cfg.model.teacher_dtype, ("float32", "bfloat16", "float16"))
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"config key '{key}' = {value!r} is not one of {tuple(allowed)}")
    positive = {
        "rollout.num_generations": cfg.rollout.num_generations, "rollout.max_new_tokens": cfg.rollout.max_new_tokens,
        "rollout.temperature": cfg.rollout.temperature, "data.batch_size": cfg.data.batch_size,
        "optim.grad_accum": cfg.optim.grad_accum, "optim.ppo_epochs": cfg.optim.ppo_epochs,
        "optim.minibatches": cfg.optim.minibatches, "optim.lr": cfg.optim.lr,
        "traces.num_samples": cfg.traces.num_samples, "traces.keep_per_prompt": cfg.traces.keep_per_prompt,
        "traces.max_new_tokens": cfg.traces.max_new_tokens, "traces.temperature": cfg.traces.temperature,
        "traces.batch_size": cfg.traces.batch_size, "sft.lr": cfg.sft.lr, "sft.batch_size": cfg.sft.batch_size,
        "sft.grad_accum": cfg.sft.grad_accum, "sft.max_length": cfg.sft.max_length, "sft.epochs": cfg.sft.epochs,
        "eval.num_samples": cfg.eval.num_samples, "eval.temperature": cfg.eval.temperature,
        "data.eval_batch_size": cfg.data.eval_batch_size,
        "distributed.timeout_minutes": cfg.distributed.timeout_minutes,
        "sophia.num_captions": cfg.sophia.num_captions, "sophia.traces_per_caption": cfg.sophia.traces_per_caption,
        "sophia.caption_max_new_tokens": cfg.sophia.caption_max_new_tokens,
        "sophia.caption_temperature": cfg.sophia.caption_temperature,
        "sophia.trace_max_new_tokens": cfg.sophia.trace_max_new_tokens,
        "sophia.trace_temperature": cfg.sophia.trace_temperature, "sophia.is_clip": cfg.sophia.is_clip,
        "sophia.batch_size": cfg.sophia.batch_size, "sophia.grad_accum": cfg.sophia.grad_accum,
        "sophia.max_steps": cfg.sophia.max_steps, "sophia.lr": cfg.sophia.lr,
        "sophia.max_length": cfg.sophia.max_length,
    }
    for key, value in positive.items():
        if not value > 0:
            raise ValueError(f"config key '{key}' must be > 0, got {value!r}")
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        raise ValueError(f"config key 'rollout.top_p' must be in (0, 1], got {cfg.rollout.top_p}")
    if not 0.0 < cfg.rollout.gpu_memory_utilization <= 1.0:
        raise ValueError("config key 'rollout.gpu_memory_utilization' must be in (0, 1]")
    if cfg.rollout.sleep_level not in (1, 2):
        raise ValueError(f"config key 'rollout.sleep_level' must be 1 or 2, got {cfg.rollout.sleep_level}")
    if cfg.reward.weights is not None and len(cfg.reward.weights) != len(cfg.reward.functions):
        raise ValueError(f"reward.weights has {len(cfg.reward.weights)} values for "
                         f"{len(cfg.reward.functions)} reward.functions")
    for key, value in (("traces.top_p", cfg.traces.top_p), ("eval.top_p", cfg.eval.top_p),
                       ("sophia.caption_top_p", cfg.sophia.caption_top_p),
                       ("sophia.trace_top_p", cfg.sophia.trace_top_p)):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"config key '{key}' must be in (0, 1], got {value}")
    for key, value in (("optim.min_lr_ratio", cfg.optim.min_lr_ratio), ("sft.min_lr_ratio", cfg.sft.min_lr_ratio),
                       ("sophia.min_lr_ratio", cfg.sophia.min_lr_ratio)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"config key '{key}' must be in [0, 1], got {value}")
    for key, value in (("optim.weight_decay", cfg.optim.weight_decay), ("sft.weight_decay", cfg.sft.weight_decay),
                       ("sophia.weight_decay", cfg.sophia.weight_decay)):
        if value is not None and value < 0:
            raise ValueError(f"config key '{key}' must be >= 0, got {value}")
    lora = cfg.model.lora
    if lora.enabled:
        if lora.r < 1 or not lora.alpha > 0 or not 0.0 <= lora.dropout < 1.0:
            raise ValueError(f"model.lora needs r >= 1, alpha > 0 and dropout in [0, 1), got r={lora.r}, "
                             f"alpha={lora.alpha}, dropout={lora.dropout}")
        if not lora.target_modules:
            raise ValueError("config key 'model.lora.target_modules' must name at least one module")
    for key, value in (("optim.warmup_steps", cfg.optim.warmup_steps), ("sft.warmup_steps", cfg.sft.warmup_steps),
                       ("traces.min_tokens", cfg.traces.min_tokens), ("sophia.warmup_steps", cfg.sophia.warmup_steps)):
        if value < 0:
            raise ValueError(f"config key '{key}' must be >= 0, got {value}")
    for placeholder in ("{caption}", "{question}"):
        if placeholder not in cfg.sophia.teacher_prompt_template:
            raise ValueError(f"config key 'sophia.teacher_prompt_template' must contain {placeholder} "
                             f"(the teacher reads the student's caption and the question)")
    if not cfg.sophia.caption_prompt.strip():
        raise ValueError("config key 'sophia.caption_prompt' must be a non-empty string")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep_last < 1:
        raise ValueError("checkpoint.every must be >= 0 and checkpoint.keep_last >= 1")
    return cfg


def config_from_dict(values: dict[str, Any] | None, overrides: list[str] | None = None) -> Config:
    """Build a validated :class:`Config` from a nested dict and override strings."""
    cfg = _build(Config, values or {})
    for override in overrides or []:
        apply_override(cfg, override)
    return validate(cfg)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or start from the defaults when ``path`` is None), then apply ``overrides``."""
    values: dict[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: the top level of a config file must be a mapping")
    return config_from_dict(values, overrides)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write ``cfg`` as YAML (loadable by :func:`load_config`); creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
    return path
