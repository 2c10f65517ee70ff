"""Run configuration: pydantic dataclasses, loaded from YAML, overridden by ``key.sub=value`` strings.

    cfg = load_config("configs/run.yaml", ["optim.lr=1e-6", "rollout.engine=vllm"])
    save_config(cfg, Path(cfg.output_dir) / "config.yaml")

Layers, last wins: the dataclass defaults, the YAML file, the ``key.sub=value`` overrides (verl/Hydra's
dotlist form). Each section is a ``pydantic.dataclasses.dataclass`` (stdlib ``dataclasses.fields``,
``asdict`` and ``replace`` work on it): its types carry the checks, so pydantic (v2) parses and checks
every value in one pass — ``Literal`` choices read from the kernels' tuples (``LOSS_TYPES``, ...),
ranges as ``Field(gt=, ge=, le=)``, ``X | None``, lists — and the errors carry the key's location.
:func:`_message` turns pydantic's errors into this module's messages (``config key 'rollout.top_p' must be
in (0, 1], got 0``; ``unknown config key 'optim.lrr'; did you mean 'lr'?``). Checks that span keys
(``reward.weights`` vs ``reward.functions``, the SOPHIA template's placeholders, LoRA) are explicit
``model_validator``s.

Why pydantic and not OmegaConf structured configs: OmegaConf types a key only as int/float/bool/str/enum
(no ``Literal``, no ranges), so every choice and range check here would stay hand-written, and it is not a
dependency here; pydantic is (of DeepSpeed and vLLM; the ``train`` extra names it), and the dotlist
form users know from verl/Hydra is kept by :func:`load_config`'s overrides (``a.b=value``; ``none``/``null`` for an
optional key, ``[a, b]`` or ``a,b`` for a list, ``true``/``false``, ``2e3`` for an int).
"""

import dataclasses
import difflib
import inspect
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from vold.kernels import PolicyLossConfig, vold_loss
from vold.kernels.checks import DIVERGENCES, IMPLS
from vold.kernels.policy_loss import DISTILL_ESTIMATORS, IS_LEVELS, KL_ESTIMATORS, LOSS_TYPES

# extra="forbid": an unknown key is an error; numbers given to a str key (e.g. a YAML 1) become strings;
# allow_inf_nan=False: a float key given nan or inf (optim.lr=inf) is an error, not a NaN run
section = dataclass(config=ConfigDict(extra="forbid", coerce_numbers_to_str=True, allow_inf_nan=False))

_NONE = {"none", "null", "~", ""}


def _none_text(value: Any) -> Any:
    """``none``/``null``/``~``/empty (any case) -> None, for the ``X | None`` keys."""
    return None if isinstance(value, str) and value.strip().lower() in _NONE else value


def _integral_text(value: Any) -> Any:
    """A string that is an integral number in any float notation (``"2e3"``) -> that int."""
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return value
        if number.is_integer():
            return int(number)
    return value


def _list_text(value: Any) -> Any:
    """``"[a, b]"`` (YAML flow list) or ``"a,b"`` -> a list; an empty string -> []."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return yaml.safe_load(text)
            except yaml.YAMLError:
                return value  # not a list: the key's type reports it, naming the key
        return [part.strip() for part in text.split(",")] if text else []
    return value


Int = Annotated[int, BeforeValidator(_integral_text)]
PosInt = Annotated[Int, Field(gt=0)]
NonNegInt = Annotated[Int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Prob = Annotated[float, Field(gt=0, le=1)]  # top_p and the like: (0, 1]
Fraction = Annotated[float, Field(ge=0, le=1)]
StrList = Annotated[list[str], BeforeValidator(_list_text)]
FloatList = Annotated[list[float], BeforeValidator(_list_text)]
Dtype = Literal["float32", "bfloat16", "float16"]
Scheduler = Literal["constant", "linear", "cosine"]  # all after warmup


# the X | None keys: none/null/~ (any case) or an empty string is None
_NONE_TEXT = BeforeValidator(_none_text)
OptStr = Annotated[str | None, _NONE_TEXT]
OptBool = Annotated[bool | None, _NONE_TEXT]
OptInt = Annotated[Int | None, _NONE_TEXT]
OptPosInt = Annotated[PosInt | None, _NONE_TEXT]
OptNonNegInt = Annotated[NonNegInt | None, _NONE_TEXT]
AdamBeta = Annotated[float, Field(ge=0, lt=1)]  # optim.adam_beta1/2 (torch's AdamW refuses others)
ClipEpsLow = Annotated[float, Field(ge=0, lt=1)]  # loss.epsilon_low: the lower clip bound 1 - epsilon_low > 0
OptDualClip = Annotated[Annotated[float, Field(gt=1)] | None, _NONE_TEXT]  # loss.clip_ratio_c: dual clip c > 1
OptFloat = Annotated[float | None, _NONE_TEXT]
OptNonNegFloat = Annotated[NonNegFloat | None, _NONE_TEXT]
OptFloatList = Annotated[FloatList | None, _NONE_TEXT]
OptDtype = Annotated[Dtype | None, _NONE_TEXT]


def _device_text(value: Any) -> Any:
    """``auto`` or a string ``torch.device`` parses (``cpu``, ``cuda``, ``cuda:1``): ``device=gpu`` used to end in
    torch's RuntimeError traceback when the stage resolved it, after the config had been accepted."""
    if isinstance(value, str) and value != "auto":
        try:
            torch.device(value)
        except (RuntimeError, ValueError):
            raise ValueError(f"config key 'device' = {value!r} is not a device: auto, cpu, cuda, cuda:N, or "
                             "another torch device string") from None
    return value


Device = Annotated[str, AfterValidator(_device_text)]


# ---- the loss section's bridge to the kernels ----------------------------------------------------------------

_KERNEL_DEFAULTS = {name: p.default for name, p in inspect.signature(vold_loss).parameters.items()
                    if p.default is not inspect.Parameter.empty}
#: loss.* keys that are the objective's options: PolicyLossConfig's fields + the divergence of "full"
KERNEL_OBJECTIVE_KEYS = (*(f.name for f in dataclasses.fields(PolicyLossConfig)), "divergence", "jsd_beta")
#: loss.* keys that choose how vold_loss computes (engine, chunk of the vocabulary), not what
KERNEL_ENGINE_KEYS = ("impl", "chunk_size")
#: loss.* keys that vold_loss never sees: how rewards become advantages, the distill mask and the loss rows
TRAINER_LOSS_KEYS = ("distill_on_wrong_only", "distill_mask_reward", "scale_rewards", "mask_truncated_completions")
#: the trainer's loss defaults that differ from vold_loss's, on purpose (README: "Loss defaults")
TRAINER_LOSS_DEFAULTS = {"distill_estimator": "k2"}  # the paper's estimator; vold_loss: "full" (the exact KL)

@section
class LoraSettings:
    """``model.lora.*``: LoRA adapters on the student through the ``peft`` library (``pip install peft``).

    The adapted student computes ``W x + (alpha / r) B A x`` for each target linear layer (Hu et al. 2021;
    ``A [r, in]``, ``B [out, r]``, B starts at 0); only A and B train, the base weights (the lm_head
    included: the fused losses read its frozen weight) stay as loaded. Rollouts see the merged weights
    ``W + (alpha / r) B A`` (HF generate runs the adapted modules, vLLM receives merged tensors); checkpoints
    and ``final/`` hold the adapter (``adapter_config.json``, ``adapter_model.safetensors``, PEFT's layout).
    """

    enabled: bool = False
    r: Int = 16  # TRL's ModelConfig.lora_r
    alpha: float = 32.0  # lora_alpha
    # lora_dropout: 0 (PEFT's and verl's default; TRL's ModelConfig has 0.05). The trainer runs the student in
    # train mode, so a dropout > 0 makes the policy that is trained (and scored against the teacher) a noisy
    # copy of the merged one that samples the rollouts: the on-policy ratio is no longer 1
    dropout: float = 0.0
    # module names (peft target_modules: exact suffixes) in the language model; default: the attention and MLP
    # projections of Qwen/Llama blocks. The vision tower gets adapters only when it is not frozen.
    target_modules: StrList = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])
    save_merged: bool = False  # final/merged: also the merged full model (save_pretrained), loadable without peft

    @model_validator(mode="after")
    def _check(self) -> "LoraSettings":
        if self.enabled:
            if self.r < 1 or not self.alpha > 0 or not 0.0 <= self.dropout < 1.0:
                raise ValueError(f"model.lora needs r >= 1, alpha > 0 and dropout in [0, 1), got r={self.r}, "
                                 f"alpha={self.alpha}, dropout={self.dropout}")
            if not self.target_modules:
                raise ValueError("config key 'model.lora.target_modules' must name at least one module")
        return self


@section
class ModelConfig:
    """Student (a VLM, or any causal LM) and teacher (a text causal LM): local paths or hub ids."""

    student: str = ""
    teacher: str = ""
    student_tokenizer: OptStr = None  # defaults to the student path
    teacher_tokenizer: OptStr = None  # defaults to the teacher path
    dtype: Dtype = "bfloat16"  # weights: float32 | bfloat16 | float16
    # forward passes of the student under torch.autocast(this dtype), e.g. float32 weights + bfloat16 compute:
    # with pure bfloat16 weights most AdamW updates at lr ~1e-6 round away (bf16 keeps ~3 significant digits)
    autocast: OptDtype = None
    teacher_dtype: OptDtype = None  # defaults to dtype
    # auto: flash_attention_2 on CUDA when flash_attn imports, else sdpa
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    gradient_checkpointing: bool = True
    local_files_only: bool = False
    trust_remote_code: bool = False
    vocab_size: OptPosInt = None  # shared vocabulary when the heads are padded (e.g. 152064 vs 151936 rows)
    min_pixels: OptPosInt = None  # image processor resolution bounds (Qwen2-VL style)
    max_pixels: OptPosInt = None  # >= min_pixels
    teacher_offload: bool = False  # keep the teacher on the CPU, on the device only while it scores
    # which student parameters train (vold.models.apply_freezing; sft, train and sophia). A VLM has three parts:
    # the vision tower (Qwen2.5-VL: visual.patch_embed + visual.blocks), the projector (visual.merger) and the
    # language model (embeddings, decoder, lm_head). Frozen parameters get no gradient, no optimizer state and
    # no gradient traffic (no DDP bucket, no ZeRO gradient partition; ZeRO-3 still shards and gathers their
    # weights), and are saved unchanged.
    freeze_vision_tower: bool = False
    freeze_projector: bool = False
    freeze_language_model: bool = False
    # regular expressions (re.search) on parameter names, applied after the three switches: "frozen" freezes
    # what it matches, then "trainable" unfreezes what it matches (e.g. freeze_language_model + trainable=[lm_head])
    frozen: StrList = field(default_factory=list)
    trainable: StrList = field(default_factory=list)
    lora: LoraSettings = field(default_factory=LoraSettings)

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"config key 'model.min_pixels' ({self.min_pixels}) must be <= 'model.max_pixels' "
                             f"({self.max_pixels})")
        return self


@section
class DataConfig:
    """JSONL/parquet rows with ``prompt``, ``answer`` and optional ``image(s)``, ``teacher_prompt``."""

    train_files: StrList = field(default_factory=list)
    eval_files: StrList = field(default_factory=list)
    image_root: OptStr = None  # relative image paths resolve against this (default: the data file's folder)
    system_prompt: OptStr = None
    teacher_system_prompt: OptStr = None  # defaults to system_prompt
    batch_size: PosInt = 8  # prompts per step (each gets rollout.num_generations completions)
    eval_batch_size: PosInt = 16
    shuffle: bool = True
    check_images: bool = True  # open every image once when the data is loaded
    prompt_column: str = "prompt"  # read this column as the prompt (e.g. "question" for a benchmark)
    answer_column: str = "answer"


@section
class RolloutConfig:
    """Sampling of the student's completions."""

    engine: Literal["hf", "vllm"] = "hf"  # hf | vllm
    num_generations: PosInt = 5
    max_new_tokens: PosInt = 1024
    temperature: PosFloat = 1.0
    top_p: Prob = 1.0
    # prompt j of a step's global batch samples with its own seed (vold.distributed.prompt_seeds), so its
    # completions depend neither on the rest of the batch nor on the data-parallel rank that samples it. The hf
    # engine then runs one generate call per prompt; false: one call per batch (seed + step), faster with the
    # hf engine on a GPU, but W ranks no longer draw what one process draws. vLLM seeds requests either way.
    seed_per_prompt: bool = True
    # vLLM only (colocated with the trainer on the same GPUs)
    gpu_memory_utilization: Prob = 0.3
    enable_sleep_mode: bool = True
    # 1: offload weights to CPU; 2: discard them (resynced after every update anyway)
    sleep_level: Annotated[Int, Field(ge=1, le=2)] = 1
    max_model_len: OptPosInt = None
    tensor_parallel_size: PosInt = 1
    enforce_eager: bool = False
    max_images_per_prompt: PosInt = 1


@section
class LossConfig:
    """``loss.*``: the options of ``vold.kernels.vold_loss`` and how rewards become advantages and masks.

    One flat section, as TRL's ``GRPOConfig`` keeps ``loss_type``, ``scale_rewards`` and
    ``mask_truncated_completions`` side by side, split into three named groups that the code reads
    (:data:`KERNEL_OBJECTIVE_KEYS`, :data:`KERNEL_ENGINE_KEYS`, :data:`TRAINER_LOSS_KEYS`):

    - the objective: exactly ``PolicyLossConfig``'s fields plus ``divergence`` and ``jsd_beta`` (checked when
      this module is imported, so a kernel option cannot be missing here or misspelled); their defaults are
      read from ``vold_loss``'s signature, except the deliberate :data:`TRAINER_LOSS_DEFAULTS`;
    - the engine: how ``vold_loss`` computes (``impl``, ``chunk_size``), never what;
    - trainer only: never passed to ``vold_loss`` (rewards -> advantages, distill and loss masks).

    :meth:`kernel_options` gives the first two groups as ``vold_loss`` keywords.
    """

    # ---- the objective (vold_loss keywords; PolicyLossConfig's fields + divergence, jsd_beta) ----
    loss_type: Literal[LOSS_TYPES] = _KERNEL_DEFAULTS["loss_type"]
    epsilon_low: ClipEpsLow = _KERNEL_DEFAULTS["epsilon_low"]  # in [0, 1), as vold_loss
    epsilon_high: NonNegFloat = _KERNEL_DEFAULTS["epsilon_high"]
    clip_ratio_c: OptDualClip = _KERNEL_DEFAULTS["clip_ratio_c"]  # None, or c > 1 (vold_loss refuses c <= 1)
    importance_sampling_level: Literal[IS_LEVELS] = _KERNEL_DEFAULTS["importance_sampling_level"]
    ref_kl_coef: float = _KERNEL_DEFAULTS["ref_kl_coef"]
    ref_kl_estimator: Literal[KL_ESTIMATORS] = _KERNEL_DEFAULTS["ref_kl_estimator"]
    # beta of the paper's objective: 0.1 in its hyper-parameter table; the text quotes 1e-3 elsewhere (set
    # loss.distill_coef=1e-3 to try that one). vold_loss's default, as PolicyLossConfig's.
    distill_coef: float = _KERNEL_DEFAULTS["distill_coef"]
    # the paper's k2 (a trainer default, TRAINER_LOSS_DEFAULTS); vold_loss's "full" = exact reverse KL
    distill_estimator: Literal[DISTILL_ESTIMATORS] = TRAINER_LOSS_DEFAULTS["distill_estimator"]
    divergence: Literal[DIVERGENCES] = _KERNEL_DEFAULTS["divergence"]
    jsd_beta: Annotated[float, Field(ge=0, le=1)] = _KERNEL_DEFAULTS["jsd_beta"]  # 0: forward KL, 1: reverse KL
    entropy_coef: float = _KERNEL_DEFAULTS["entropy_coef"]
    # ---- the engine (vold_loss keywords that change how, not what) ----
    impl: Literal[IMPLS] = _KERNEL_DEFAULTS["impl"]  # auto | torch | torch_compile | triton
    chunk_size: OptPosInt = _KERNEL_DEFAULTS["chunk_size"]
    # ---- trainer only (never passed to vold_loss) ----
    distill_on_wrong_only: bool = True  # distill_mask = 1 - r with r the correctness reward in [0, 1]
    distill_mask_reward: str = "accuracy"  # which reward function gives that r
    scale_rewards: Literal["group", "none"] = "group"  # group: (r - mean) / (std + eps); none: r - mean (Dr. GRPO)
    # TRL's name (DAPO's overlong filtering, Yu et al. 2025 §3.4): a completion that hit rollout.max_new_tokens
    # without EOS gets mask 0 in the loss (no policy gradient, no KL terms) and leaves the normalisation counts
    # (tokens, sequences); it still counts in its group's reward statistics and in the rollout metrics (rewards,
    # lengths, completion/truncated_frac), not in the loss metrics (kl, clip fractions: over the loss's tokens)
    mask_truncated_completions: bool = False

    def kernel_options(self) -> dict[str, Any]:
        """The ``vold_loss`` keywords of this section (objective + engine; no trainer-only key)."""
        return {name: getattr(self, name) for name in (*KERNEL_OBJECTIVE_KEYS, *KERNEL_ENGINE_KEYS)}


@section
class RewardConfig:
    """Reward functions: built-in names ("accuracy", "format") or "module:function" plugins."""

    functions: StrList = field(default_factory=lambda: ["accuracy"])
    weights: OptFloatList = None  # one per function; default all 1
    # L_cache of the built-in "soft_overlong" reward (DAPO §3.4; TRL's soft_punish_cache): completions longer than
    # rollout.max_new_tokens - overlong_cache lose up to 1 linearly; L_max is rollout.max_new_tokens
    overlong_cache: NonNegInt = 0

    @model_validator(mode="after")
    def _check(self) -> "RewardConfig":
        if self.weights is not None and len(self.weights) != len(self.functions):
            raise ValueError(f"reward.weights has {len(self.weights)} values for {len(self.functions)} "
                             "reward.functions")
        return self


@section
class OptimConfig:
    lr: PosFloat = 6e-6
    weight_decay: NonNegFloat = 0.0
    adam_beta1: AdamBeta = 0.9  # in [0, 1), as torch's AdamW
    adam_beta2: AdamBeta = 0.999
    adam_eps: NonNegFloat = 1e-8
    lr_scheduler: Scheduler = "constant"  # constant | linear | cosine (all after warmup)
    warmup_steps: NonNegInt = 0  # in optimizer updates (ppo_epochs * minibatches per training step)
    min_lr_ratio: Fraction = 0.0  # linear/cosine decay to min_lr_ratio * lr
    max_steps: NonNegInt = 1000  # training steps (one rollout batch each)
    # micro-batches per minibatch: memory only, the update is the same for every loss type (dapo and bnpo
    # divide by the minibatch's token count, grpo/dr_grpo weight each micro-batch by its share of the sequences)
    grad_accum: PosInt = 1
    max_grad_norm: NonNegFloat = 1.0  # 0 disables clipping
    ppo_epochs: PosInt = 1  # passes over each rollout batch
    minibatches: PosInt = 1  # optimizer steps per pass
    # the policy update and the frozen scoring passes run each micro-batch as ONE row of its real tokens
    # (prompts + completions, no padding; per-sequence position ids): flash-attn varlen with
    # model.attn_implementation=flash_attention_2, a block-diagonal mask with sdpa/eager (fine for small rows)
    packing: bool = False


@section
class TracesConfig:
    """Stage 0 (``vold make-traces``): the teacher writes reasoning traces for text-only prompts.

    Sampling defaults are Qwen3's recommended thinking-mode settings (temperature 0.6, top-p 0.95).
    """

    input_files: StrList = field(default_factory=list)  # default: data.train_files
    output_file: OptStr = None  # default: {output_dir}/traces.jsonl
    num_samples: PosInt = 1  # traces sampled per prompt
    keep_per_prompt: PosInt = 1  # at most this many traces kept per prompt (those passing the filters, in order)
    max_new_tokens: PosInt = 4096
    temperature: PosFloat = 0.6
    top_p: Prob = 0.95
    batch_size: PosInt = 8  # prompts per generate call
    min_tokens: NonNegInt = 1  # length filter, in teacher tokens (EOS excluded)
    max_tokens: OptPosInt = None  # >= min_tokens
    drop_truncated: bool = True  # a trace cut at max_new_tokens has no final answer
    filter_correct: bool = True  # keep a trace only when its last \boxed{} equals the answer (math_equal)
    max_examples: OptPosInt = None  # the first N prompts only

    @model_validator(mode="after")
    def _check(self) -> "TracesConfig":
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ValueError(f"config key 'traces.max_tokens' ({self.max_tokens}) must be >= 'traces.min_tokens' "
                             f"({self.min_tokens}): every trace would be dropped")
        return self


@section
class SFTConfig:
    """Stage 1 (``vold sft``): cold-start SFT of the student on the teacher's traces.

    AdamW betas/eps, weight decay and gradient clipping come from ``optim``; the rest is here.
    """

    enabled: bool = False  # true: ``vold train`` starts from the SFT model ({output_dir}/sft/final)
    train_files: StrList = field(default_factory=list)  # default: [traces.output_file]
    response_column: str = "trace"  # the target text; the prompt comes from data.prompt_column
    epochs: PosInt = 1
    max_steps: OptNonNegInt = None  # default: epochs * (rows // (batch_size * grad_accum))
    lr: PosFloat = 1e-5
    lr_scheduler: Scheduler = "cosine"  # constant | linear | cosine (after warmup)
    warmup_steps: NonNegInt = 0
    min_lr_ratio: Fraction = 0.0  # linear/cosine decay to min_lr_ratio * lr
    weight_decay: OptNonNegFloat = None  # AdamW's (matrices only); None: optim.weight_decay
    batch_size: PosInt = 8  # sequences per micro-batch
    grad_accum: PosInt = 1  # micro-batches per optimizer step
    max_length: PosInt = 2048  # prompt + response tokens; longer responses are cut
    packing: bool = False  # each micro-batch as one row of real tokens (see optim.packing)
    # this stage's freezing switches; None: model.freeze_* (e.g. RL with cold start freezes the ViT for SFT only)
    freeze_vision_tower: OptBool = None
    freeze_projector: OptBool = None
    freeze_language_model: OptBool = None


@section
class SophiaConfig:
    """``vold sophia``: semi-off-policy RL (SOPHIA, Shen et al. 2025), see ``vold/sophia.py`` and docs/sophia.md.

    Per step: ``batch_size`` items (image + question); the student writes K captions of each image (the
    caption prompt, no question); the teacher writes N traces from caption + question; trace reward R
    (``reward.functions``), caption reward = mean R of its traces; kept per item: the shortest correct
    trace among captions whose reward exceeds alpha; the student learns (image, question) -> caption +
    trace with weight R (ratio 1, the paper) or R times a truncated importance weight (``clipped``).
    AdamW betas/eps, weight decay and gradient clipping come from ``optim``; the rest is here.
    """

    num_captions: PosInt = 8  # K captions per image (the paper: 8)
    traces_per_caption: PosInt = 8  # N teacher traces per caption (the paper: 8)
    caption_reward_threshold: float = 0.75  # alpha: a caption qualifies when its mean trace reward is > alpha
    correct_threshold: float = 1.0  # a trace is correct when its reward R >= this (accuracy: R in {0, 1})
    caption_prompt: str = ("Describe this image in detail: every object, number, label, symbol and relation in it "
                           "that a question about the image could need.")
    caption_max_new_tokens: PosInt = 512
    caption_temperature: PosFloat = 1.0
    caption_top_p: Prob = 1.0
    # the teacher's user message (through its chat template); {caption} and {question} are filled in
    teacher_prompt_template: str = ("An image is described as follows.\n{caption}\n\nUsing this description, "
                                    "answer the question.\n{question}")
    trace_max_new_tokens: PosInt = 4096
    trace_temperature: PosFloat = 0.6  # the teacher's thinking-mode sampling (as traces.*)
    trace_top_p: Prob = 0.95
    response_separator: str = "\n\n"  # the student's target: caption tokens + this text + trace tokens + EOS
    # none: ratio 1 (the paper; reward-weighted SFT) | clipped: min(pi/mu, c)
    importance_weighting: Literal["none", "clipped"] = "none"
    # clipped only: token (per-token truncated IS) | sequence (length-normalised ratio)
    is_level: Literal["token", "sequence"] = "token"
    is_clip: PosFloat = 1.0  # c: the truncation of the importance weight (V-trace's rho-bar = 1)
    batch_size: PosInt = 8  # items (image + question) per step
    grad_accum: PosInt = 1  # micro-batches per optimizer step (of the kept items)
    max_steps: PosInt = 100  # training steps (one sampling round and one optimizer update each)
    lr: PosFloat = 1e-6
    lr_scheduler: Scheduler = "constant"  # constant | linear | cosine (after warmup)
    warmup_steps: NonNegInt = 0
    min_lr_ratio: Fraction = 0.0  # linear/cosine decay to min_lr_ratio * lr (the paper: 0.25)
    weight_decay: OptNonNegFloat = None  # AdamW's (matrices only); None: optim.weight_decay
    max_length: PosInt = 8192  # prompt + response tokens of the update; longer responses are cut

    @model_validator(mode="after")
    def _check(self) -> "SophiaConfig":
        for placeholder in ("{caption}", "{question}"):
            if placeholder not in self.teacher_prompt_template:
                raise ValueError(f"config key 'sophia.teacher_prompt_template' must contain {placeholder} "
                                 "(the teacher reads the student's caption and the question)")
        if not self.caption_prompt.strip():
            raise ValueError("config key 'sophia.caption_prompt' must be a non-empty string")
        return self


@section
class EvalConfig:
    """``vold eval``: pass@1 and mean@k accuracy on a JSONL benchmark (image path or text, question, answer)."""

    model: OptStr = None  # default: model.student
    files: StrList = field(default_factory=list)  # default: data.eval_files
    num_samples: PosInt = 8  # k completions per question
    temperature: PosFloat = 1.0
    top_p: Prob = 1.0
    max_new_tokens: OptPosInt = None  # default: rollout.max_new_tokens
    max_examples: OptPosInt = None  # the first N questions of each file only
    output_dir: OptStr = None  # default: {output_dir}/eval/{model as a folder name, e.g. runs--x--rl--final}


@section
class CheckpointConfig:
    every: NonNegInt = 100  # steps; 0 disables periodic checkpoints
    # none (default): start fresh; a run folder that already holds checkpoints or a final model is refused
    # (unless overwrite_output_dir). auto: the latest checkpoint of the run folder (fresh if it has none).
    # A path: that checkpoint folder. Resuming is refused when the saved config differs in a key that
    # changes the result (vold.runs.RESUMABLE_CHANGES lists the keys that may differ, e.g. max_steps).
    resume: str = "none"
    keep_last: Annotated[Int, Field(ge=1)] = 2
    save_optimizer: bool = True


@section
class LoggingConfig:
    every: PosInt = 1  # steps between log lines (and the last step)
    jsonl: bool = True
    tensorboard: bool = False  # needs the tensorboard package; skipped with a warning without it
    wandb: bool = False  # needs wandb; skipped with a warning without it
    wandb_project: str = "vold"
    progress: bool = True  # tqdm progress bars, when tqdm is installed
    num_completions: NonNegInt = 2  # completions written to the log per step


@section
class DistributedConfig:
    """Data parallelism over the processes of a ``torchrun``/``deepspeed`` launch (see ``vold.distributed``).

    Batch sizes stay global (``data.batch_size`` prompts, ``sft.batch_size * sft.grad_accum`` rows per step):
    rank r takes every W-th one. A single process ignores this section (backend ddp)."""

    backend: Literal["ddp", "deepspeed"] = "ddp"  # ddp | deepspeed
    process_group_backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on CUDA, gloo on the CPU
    deepspeed_config: OptStr = None  # JSON (e.g. configs/deepspeed/zero2.json); default: ZeRO-2
    find_unused_parameters: bool = True  # DDP: the vision tower gets no gradient from text-only batches
    timeout_minutes: PosInt = 60  # collectives wait this long (one rank may still be sampling long rollouts)


@section
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
    seed: Int = 0
    output_dir: str = "runs/vold"
    # HF TrainingArguments' name: true lets a stage start over in a run folder that holds an earlier run's
    # checkpoints/final model (they are deleted first); false (default) refuses it (use --resume auto to continue)
    overwrite_output_dir: bool = False
    device: Device = "auto"  # auto: cuda when available, else cpu; or a torch device string (cpu, cuda, cuda:1)




# ---- the bridge's invariants, checked once at import: a kernel option cannot be missing or misspelled ----------

def _check_loss_bridge() -> None:
    keys = [f.name for f in dataclasses.fields(LossConfig)]
    groups = (*KERNEL_OBJECTIVE_KEYS, *KERNEL_ENGINE_KEYS, *TRAINER_LOSS_KEYS)
    if sorted(keys) != sorted(groups):
        raise ImportError(f"vold.config.LossConfig has keys {sorted(keys)} but its groups (PolicyLossConfig's "
                          f"fields, the engine's and the trainer's keys) name {sorted(groups)}")
    missing = [k for k in (*KERNEL_OBJECTIVE_KEYS, *KERNEL_ENGINE_KEYS) if k not in _KERNEL_DEFAULTS]
    if missing:
        raise ImportError(f"vold.config.LossConfig keys {missing} are not vold_loss keywords")


_check_loss_bridge()


# ---- errors ---------------------------------------------------------------------------------------------------

def _field_at(loc: tuple[str, ...]) -> tuple[list[str], Any]:
    """The keys of the section that holds ``loc[-1]`` (walked from :class:`Config`) and that key's FieldInfo."""
    cls: Any = Config
    for part in loc[:-1]:
        cls = cls.__pydantic_fields__[part].annotation
    fields = cls.__pydantic_fields__
    return list(fields), fields.get(loc[-1])


_OPS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _bounds(info: Any, ctx: dict[str, Any]) -> str:
    """A key's range from its ``Field(gt=, ge=, lt=, le=)`` (``> 0``, ``in (0, 1]``); else the failed bound."""
    bounds = {k: getattr(m, k) for m in getattr(info, "metadata", []) for k in _OPS if hasattr(m, k)} or ctx
    if len(bounds) == 2:
        (low, lo), (high, hi) = sorted(bounds.items(), key=lambda item: item[0].startswith("l"))
        return f"in {'(' if low == 'gt' else '['}{lo:g}, {hi:g}{')' if high == 'lt' else ']'}"
    ((op, value),) = bounds.items()
    return f"{_OPS[op]} {value:g}"


_EXPECTS = {"int": "an int", "bool": "a bool (true/false)", "float": "a float", "string": "a string",
            "list": "a list"}


def _message(error: dict[str, Any]) -> str:
    """One pydantic error as this module's message, naming the key by its dotted path."""
    loc = tuple(part for part in error["loc"] if isinstance(part, str))
    key = ".".join(loc) or "the top level"
    kind, value = error["type"], error.get("input")
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        valid = _field_at(loc)[0]
        close = difflib.get_close_matches(loc[-1], valid, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        where = ".".join(loc[:-1]) or "the top level"
        return f"unknown config key '{key}'{hint} (valid keys in {where}: {', '.join(valid)})"
    if kind in ("dataclass_type", "dataclass_args_type", "dict_type"):
        return f"config section '{key}' must be a mapping, got {value!r}"
    if kind == "literal_error":
        return f"config key '{key}' = {value!r} is not one of {error['ctx']['expected']}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"config key '{key}' must be {_bounds(_field_at(loc)[1], error['ctx'])}, got {value!r}"
    if kind == "finite_number":  # nan / inf for a float key (allow_inf_nan=False)
        return f"config key '{key}' must be a finite number, got {value!r}"
    if kind == "value_error":  # a model_validator's own message
        return str(error["ctx"]["error"])
    expected = next((v for k, v in _EXPECTS.items() if kind.startswith(k)), None)
    if value is None and expected is not None:
        return f"config key '{key}' cannot be None (expected {expected})"
    if expected is not None:
        return f"config key '{key}' expects {expected}, got {value!r}"
    return f"config key '{key}': {error['msg']}, got {value!r}"


_CONFIG = TypeAdapter(Config)


def _validated(values: dict[str, Any]) -> Config:
    """``Config`` from a nested dict; a ``ValueError`` naming every bad key (one line: ``; `` between them)."""
    try:
        return _CONFIG.validate_python(values)
    except ValidationError as e:
        raise ValueError("; ".join(_message(error) for error in e.errors())) from None


# ---- public API -----------------------------------------------------------------------------------------------

def _set_dotted(values: dict[str, Any], override: str) -> None:
    """Put one ``key.sub=value`` string into the nested dict ``values`` (as text: the key's type parses it)."""
    path, _, raw = override.partition("=")
    parts = path.strip().split(".")
    if "=" not in override or not all(part.strip() for part in parts):  # 'x', '=5', 'optim.=1', 'a..b=1'
        raise ValueError(f"override {override!r} must look like key.sub=value")
    cls: Any = Config
    for depth, name in enumerate(parts):
        key = ".".join(parts[: depth + 1])
        fields = getattr(cls, "__pydantic_fields__", None)
        if fields is None:
            raise ValueError(f"config key '{'.'.join(parts[:depth])}' is not a section")
        if name not in fields:
            raise ValueError(_message({"type": "extra_forbidden", "loc": tuple(parts[: depth + 1])}))
        tp = fields[name].annotation
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ValueError(f"config key '{key}' is a section; set one of its keys (e.g. {key}.<key>=...)")
            values[name] = raw
            return
        sub = values.get(name)
        if sub is None:
            sub = values[name] = {}
        elif not isinstance(sub, dict):
            raise ValueError(_message({"type": "dataclass_type", "loc": tuple(parts[: depth + 1]), "input": sub}))
        values, cls = sub, tp


def _empty_sections(values: dict[str, Any], cls: Any = None) -> dict[str, Any]:
    """A copy of ``values`` where an empty YAML section (``loss:`` alone, read as None) is ``{}``."""
    fields = (cls or Config).__pydantic_fields__
    out = {}
    for name, value in values.items():
        tp = fields[name].annotation if name in fields else None
        if tp is not None and dataclasses.is_dataclass(tp):
            value = {} if value is None else _empty_sections(value, tp) if isinstance(value, dict) else value
        out[name] = value
    return out


def config_from_dict(values: dict[str, Any] | None, overrides: list[str] | None = None) -> Config:
    """A validated :class:`Config` from a nested dict (YAML's) with ``key.sub=value`` ``overrides`` on top."""
    if values is not None and not isinstance(values, dict):
        raise ValueError(f"the top level of a config must be a mapping, got {values!r}")
    values = _empty_sections(values or {})
    for override in overrides or []:
        _set_dotted(values, override)
    return _validated(values)


def apply_override(cfg: Config, override: str) -> None:
    """Apply one ``key.sub=value`` string to ``cfg`` in place (the whole config is checked again)."""
    values = config_to_dict(cfg)
    _set_dotted(values, override)
    new = _validated(values)
    for f in dataclasses.fields(Config):
        setattr(cfg, f.name, getattr(new, f.name))


def validate(cfg: Config) -> Config:
    """``cfg`` checked again (after attribute assignments, which pydantic does not check): a validated copy."""
    return _validated(config_to_dict(cfg))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or start from the defaults when ``path`` is None), then apply ``overrides``."""
    values: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ValueError(f"config file not found: {path}" + (" (a folder)" if Path(path).is_dir() else ""))
        try:
            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:  # one line, as every other user error (the CLI used to print a traceback)
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"{path}{where}: not valid YAML ({problem})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: the top level of a config file must be a mapping")
    return config_from_dict(values, overrides)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """``cfg`` as a nested dict of plain values (what :func:`save_config` writes)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write ``cfg`` as YAML (loadable by :func:`load_config`); creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
    return path
