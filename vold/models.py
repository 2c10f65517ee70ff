"""Student and teacher models: loading, last hidden states and lm_head weights (never full logits).

The losses in ``vold.kernels`` take ``hidden [B, T, H]`` and the head ``weight [V, H]`` and compute
log-probs chunk by chunk, so the models here are run without their ``lm_head``:
``hidden_states(model, ...) @ lm_head_weight(model).T`` equals ``model(...).logits``.

Supported: Qwen2.5-VL (and Qwen2-VL) students, any causal LM as a text student, and causal LM
teachers (Qwen2/Qwen3, Llama/SmolLM2, ...): every model whose ``base_model`` returns
``last_hidden_state`` after the final norm.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    PreTrainedModel,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
)

from vold.config import LoraSettings, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class QwenVLProcessor(Qwen2_5_VLProcessor):
    """The Qwen2.5-VL processor for images and text only: no video processor, so no torchvision.

    Built from an image processor (use ``Qwen2VLImageProcessorPil``) and a tokenizer whose vocabulary
    has ``<|image_pad|>``; behaves like ``Qwen2_5_VLProcessor`` for ``text=``/``images=`` inputs.
    """

    attributes = ["image_processor", "tokenizer"]  # transformers 4.x reads this; 5.x reads __init__

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


# ---- devices, dtypes, attention -----------------------------------------------------------------

def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto``: cuda when available, else cpu; else ``torch.device(name)``, which must be available here.

    ``ValueError`` naming the config key for an accelerator this torch build or machine lacks (``device=cuda`` on
    a CPU-only torch used to fail inside ``torch.cuda.set_device`` with an AttributeError traceback)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    backend = getattr(torch, device.type, None)
    if device.type not in ("cpu", "meta") and callable(getattr(backend, "is_available", None)):
        if not backend.is_available():
            raise ValueError(f"config key 'device' = {name!r}, but torch {torch.__version__} sees no {device.type} "
                             "device on this machine: set device=cpu (or auto)")
        count = getattr(backend, "device_count", None)
        if device.index is not None and callable(count) and device.index >= count():
            raise ValueError(f"config key 'device' = {name!r}, but this machine has {count()} {device.type} "
                             "device(s)")
    return device


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {tuple(DTYPES)}")
    return DTYPES[dtype]


def resolve_attn_implementation(requested: str, device: str | torch.device) -> str:
    """``auto``: flash_attention_2 on CUDA when ``flash_attn`` is importable, else sdpa."""
    if requested != "auto":
        return requested
    device = resolve_device(device) if device == "auto" else torch.device(device)  # the type; not availability
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def is_vision_config(config: Any) -> bool:
    """A VLM config (has a vision tower), e.g. Qwen2.5-VL; a causal LM config has none."""
    return getattr(config, "vision_config", None) is not None


# ---- loading ------------------------------------------------------------------------------------

def _load(path: str, vision: bool | None, *, dtype: str | torch.dtype, device: str | torch.device,
          attn_implementation: str, local_files_only: bool, trust_remote_code: bool) -> PreTrainedModel:
    config = AutoConfig.from_pretrained(path, local_files_only=local_files_only, trust_remote_code=trust_remote_code)
    vision = is_vision_config(config) if vision is None else vision
    cls = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    device = resolve_device(device)
    model = cls.from_pretrained(
        path, config=config, dtype=resolve_dtype(dtype), local_files_only=local_files_only,
        trust_remote_code=trust_remote_code,
        attn_implementation=resolve_attn_implementation(attn_implementation, device),
    )
    return model.to(device)


def load_student(path: str, *, dtype: str | torch.dtype = "bfloat16", device: str | torch.device = "auto",
                 attn_implementation: str = "auto", local_files_only: bool = False, trust_remote_code: bool = False,
                 gradient_checkpointing: bool = False, trainable_adapter: bool = False) -> PreTrainedModel:
    """The trainable student: a VLM (Qwen2.5-VL) or, for a text-only config, a causal LM.

    A LoRA adapter folder (:func:`is_adapter_folder`) loads its base model and the adapter on top: kept as a
    trainable adapter with ``trainable_adapter`` (:func:`lora_wrapper`), else merged into the weights."""
    adapter = is_adapter_folder(path)
    model = _load(adapter_base(path) if adapter else path, None, dtype=dtype, device=device,
                  attn_implementation=attn_implementation, local_files_only=local_files_only,
                  trust_remote_code=trust_remote_code)
    if adapter:
        wrapper = _peft().PeftModel.from_pretrained(model, path, is_trainable=trainable_adapter)
        model = _unwrap(wrapper) if trainable_adapter else wrapper.merge_and_unload()
        if not trainable_adapter:
            model.__dict__.pop("_vold_peft", None)
            # PEFT froze every base weight (is_trainable=False); merged, the model is a plain student again, as
            # trainable as a freshly loaded one (apply_freezing then applies model.freeze_*). Without this,
            # `vold train` after a LoRA `vold sft` and `vold eval` of an adapter folder failed: "no trainable
            # parameter".
            model.requires_grad_(True)
    set_gradient_checkpointing(model, gradient_checkpointing)
    return model.train()


def load_teacher(path: str, *, dtype: str | torch.dtype = "bfloat16", device: str | torch.device = "auto",
                 attn_implementation: str = "auto", local_files_only: bool = False,
                 trust_remote_code: bool = False) -> PreTrainedModel:
    """The frozen text teacher (a causal LM), in eval mode with ``requires_grad=False``."""
    model = _load(path, False, dtype=dtype, device=device, attn_implementation=attn_implementation,
                  local_files_only=local_files_only, trust_remote_code=trust_remote_code)
    model.requires_grad_(False)
    return model.eval()


def set_gradient_checkpointing(model: PreTrainedModel, enabled: bool) -> None:
    """Recompute each layer's activations in the backward pass (less memory, one more forward)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 names
        enable, disable = model.activation_checkpointing_enable, model.activation_checkpointing_disable
    else:
        enable, disable = model.gradient_checkpointing_enable, model.gradient_checkpointing_disable
    if enabled:
        enable({"use_reentrant": False})
        model.config.use_cache = False
    elif is_gradient_checkpointing(model):
        disable()


def is_gradient_checkpointing(model: PreTrainedModel) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def load_tokenizer(path: str, *, local_files_only: bool = False, trust_remote_code: bool = False) -> Any:
    """A tokenizer set up for prompts: left padding, and a pad token (the EOS token if it has none)."""
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only,
                                              trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_processor(path: str, *, vision: bool | None = None, local_files_only: bool = False,
                   trust_remote_code: bool = False, min_pixels: int | None = None,
                   max_pixels: int | None = None) -> Any:
    """The student's input builder: a :class:`QwenVLProcessor` for a VLM, the tokenizer for a text LM.

    The image processor is always the PIL one (``Qwen2VLImageProcessorPil``) and no video processor
    is built, so torchvision is never needed.
    """
    if vision is None:
        config = AutoConfig.from_pretrained(path, local_files_only=local_files_only,
                                            trust_remote_code=trust_remote_code)
        vision = is_vision_config(config)
    if not vision:
        return load_tokenizer(path, local_files_only=local_files_only, trust_remote_code=trust_remote_code)
    pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    processor = QwenVLProcessor.from_pretrained(path, local_files_only=local_files_only,
                                                trust_remote_code=trust_remote_code)
    processor.image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=local_files_only,
                                                                         **pixels)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if processor.chat_template is None:
        processor.chat_template = tokenizer.chat_template
    return processor


# ---- hidden states and heads --------------------------------------------------------------------

def _accepts(fn: Any, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def text_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (as ``generate`` does), so left padding shifts nothing."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def multimodal_token_types(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """0 for text, 1 for image tokens, 2 for video tokens (what Qwen2.5-VL's 3D RoPE needs)."""
    types = torch.zeros_like(input_ids)
    for value, attr in ((1, "image_token_id"), (2, "video_token_id")):
        token = getattr(model.config, attr, None)
        if token is not None:
            types = types.masked_fill(input_ids == token, value)
    return types


def hidden_states(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Last hidden states ``[B, T, H]`` (after the final norm, before the lm_head) of ``input_ids [B, T]``.

    With left padding, text positions follow ``attention_mask`` like ``generate``; with images,
    Qwen2.5-VL computes its 3D (M-RoPE) positions from the image grid and the mask.
    """
    base = model.base_model
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if pixel_values is not None:
        if image_grid_thw is None:
            raise ValueError("pixel_values needs image_grid_thw")
        kwargs.update(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
        if _accepts(base.forward, "mm_token_type_ids"):  # transformers >= 5 marks image tokens explicitly
            kwargs["mm_token_type_ids"] = (multimodal_token_types(model, input_ids)
                                           if mm_token_type_ids is None else mm_token_type_ids)
    elif attention_mask is not None:
        kwargs["position_ids"] = text_position_ids(attention_mask)
    return base(**kwargs).last_hidden_state


def completion_hidden_states(
    model: PreTrainedModel,
    prompt_inputs: dict[str, torch.Tensor],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """Hidden states ``[N, Tc, H]`` that predict ``completion_ids [N, Tc]`` after left-padded prompts.

    ``prompt_inputs`` has ``input_ids``/``attention_mask [N, Tp]`` (one row per completion, see
    ``vold.data.repeat_inputs``) and, for a VLM, ``pixel_values``/``image_grid_thw``. Row t of the
    result is the state at position ``Tp - 1 + t``, whose logits give ``log p(completion_ids[:, t])``.
    """
    prompt_ids, prompt_mask = prompt_inputs["input_ids"], prompt_inputs["attention_mask"]
    if prompt_ids.shape[0] != completion_ids.shape[0]:
        raise ValueError(f"{prompt_ids.shape[0]} prompt rows for {completion_ids.shape[0]} completions: "
                         f"repeat the prompts once per completion first")
    input_ids = torch.cat([prompt_ids, completion_ids.to(prompt_ids.device)], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask)], dim=1)
    types = prompt_inputs.get("mm_token_type_ids")
    if types is not None:
        types = torch.cat([types, torch.zeros_like(completion_ids, dtype=types.dtype)], dim=1)
    hidden = hidden_states(model, input_ids, attention_mask, pixel_values=prompt_inputs.get("pixel_values"),
                           image_grid_thw=prompt_inputs.get("image_grid_thw"), mm_token_type_ids=types)
    start = prompt_ids.shape[1] - 1
    return hidden[:, start:start + completion_ids.shape[1]]


def lm_head_weight(model: PreTrainedModel) -> torch.Tensor:
    """The output head's weight ``[V_rows, H]`` (the embedding matrix when the two are tied)."""
    return model.get_output_embeddings().weight


def lm_head_bias(model: PreTrainedModel) -> torch.Tensor | None:
    return getattr(model.get_output_embeddings(), "bias", None)


# Heads whose forward multiplies the logits by a config value v (MuP-style) as ``z -> z * v**power``, by the
# top-level model_type (the class whose forward applies it; a VLM reads v from its text_config): Granite and
# MiniCPM3 divide by ``logits_scaling`` (MiniCPM3 divides the hidden states: the same, its head has no bias),
# HyperCLOVA X multiplies by it, Falcon-H1 by ``lm_head_multiplier``, Muse by ``output_multiplier``
# (transformers 5.24's modeling files). A LLaVA-NeXT with a Granite language model does not apply it (LLaVA's
# forward), hence the top-level key.
HEAD_SCALING = {
    **dict.fromkeys(("granite", "granitemoe", "granitemoehybrid", "granitemoeshared", "granite_swa",
                     "granitemoe_swa", "granite4_vision", "granite_docling", "minicpm3"), ("logits_scaling", -1)),
    "hyperclovax": ("logits_scaling", 1), "hyperclovax_vision_v2": ("logits_scaling", 1),
    "falcon_h1": ("lm_head_multiplier", 1),
    "muse_glimmer": ("output_multiplier", 1), "muse_spark": ("output_multiplier", 1),
}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def logit_options(model: PreTrainedModel, prefix: str = "") -> dict[str, float]:
    """The kernels' logit-transform keywords for ``model``'s head, read from its config (the language model's
    ``text_config`` for a VLM): ``{prefix}logit_scale`` (Cohere's ``logit_scale`` s, times a MuP head multiplier:
    Granite's ``1 / logits_scaling`` and the others of :data:`HEAD_SCALING`) and ``{prefix}final_logit_softcapping``
    (Gemma-2's cap c), so the fused losses see the distribution the model's own forward (and ``generate``) gives,
    ``z' = c tanh(s z / c) / T`` (``vold.kernels``). Only the keys the config sets (a number; ``None`` caps are
    left out): ``{}`` for Qwen, Llama and most models. ``prefix``: ``""`` for ``fused_linear_logprobs``,
    ``"student_"``/``"teacher_"`` for ``vold_loss`` and ``fused_linear_divergence``.

    ``ValueError`` for a language model (no ``text_config``) of a type not in :data:`HEAD_SCALING` whose config
    sets one of those multipliers (``logits_scaling``, ``lm_head_multiplier``, ``output_multiplier``) to a value
    other than 1: whether its forward multiplies or divides is not known here, and ignoring it gives log-probs of
    another distribution (TRL adapter: the same refusal)."""
    top = getattr(model, "config", None)
    config = getattr(top, "text_config", None) or top
    out = {}
    for key in ("logit_scale", "final_logit_softcapping"):
        value = _number(getattr(config, key, None))
        if value is not None:
            out[prefix + key] = value
    model_type = getattr(top, "model_type", None)
    if model_type in HEAD_SCALING:
        key, power = HEAD_SCALING[model_type]
        value = _number(getattr(config, key, None))
        if value is not None and value != 1.0:
            out[prefix + "logit_scale"] = out.get(prefix + "logit_scale", 1.0) * value ** power
    elif config is top:
        for key in ("logits_scaling", "lm_head_multiplier", "output_multiplier"):
            value = _number(getattr(config, key, None))
            if value is not None and value != 1.0:
                raise ValueError(f"the {model_type!r} model's config sets {key}={value:g}: vold does not know whether "
                                 f"its forward multiplies or divides the logits by it (known: "
                                 f"{', '.join(sorted(HEAD_SCALING))})")
    return out


def check_vocab_compatible(student: PreTrainedModel, teacher: PreTrainedModel, vocab_size: int | None = None,
                           student_tokenizer: Any | None = None, teacher_tokenizer: Any | None = None) -> int:
    """The vocabulary size ``K`` shared by student and teacher (rows ``[0, K)`` of both heads).

    Heads of different sizes (padded to a multiple, e.g. 152064 vs 151936) need an explicit
    ``vocab_size``; with tokenizers, every id below ``K`` known to both must name the same token.
    """
    s_rows, t_rows = lm_head_weight(student).shape[0], lm_head_weight(teacher).shape[0]
    if vocab_size is None:
        if s_rows != t_rows:
            raise ValueError(
                f"student lm_head has {s_rows} rows and teacher lm_head {t_rows}: if the extra rows are padding, "
                f"set model.vocab_size to the shared vocabulary (at most {min(s_rows, t_rows)})")
        vocab_size = s_rows
    elif not 0 < vocab_size <= min(s_rows, t_rows):
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {min(s_rows, t_rows)}] "
                         f"(student rows {s_rows}, teacher rows {t_rows})")
    if student_tokenizer is not None and len(student_tokenizer) > vocab_size:
        raise ValueError(f"the student tokenizer has {len(student_tokenizer)} tokens, more than the shared "
                         f"vocab_size={vocab_size}: the teacher could not score all of them")
    if student_tokenizer is not None and teacher_tokenizer is not None:
        s_ids = {i: t for t, i in student_tokenizer.get_vocab().items() if i < vocab_size}
        t_ids = {i: t for t, i in teacher_tokenizer.get_vocab().items() if i < vocab_size}
        conflicts = sorted(i for i in s_ids.keys() & t_ids.keys() if s_ids[i] != t_ids[i])
        if conflicts:
            examples = ", ".join(f"{i}: {s_ids[i]!r} vs {t_ids[i]!r}" for i in conflicts[:3])
            raise ValueError(f"student and teacher tokenizers disagree on {len(conflicts)} token ids ({examples}); "
                             f"distillation needs one vocabulary")
    return vocab_size


# ---- from a run config -----------------------------------------------------------------------------

def check_model_path(path: str, key: str, *, local_files_only: bool = False, timeout: float = 10.0) -> None:
    """Fail early, naming the config ``key``, when the model ``path`` cannot be loaded: a local folder must hold a
    ``config.json`` (a model) or an ``adapter_config.json`` (a PEFT adapter, :func:`is_adapter_folder`);
    anything else must be a valid hub id, found in the local hub cache or (online, not
    ``local_files_only``/``HF_HUB_OFFLINE``) on the hub (one metadata request, ``timeout`` seconds).
    Raises FileNotFoundError (not found) or ValueError (not a folder nor a hub id)."""
    import os

    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not path:
        raise ValueError(f"no model: set {key} (a local folder or a hub id)")
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file() and not is_adapter_folder(local):
            inner = local / "model"
            if (inner / "config.json").is_file() or is_adapter_folder(inner):  # a checkpoints/step_N folder
                raise FileNotFoundError(f"{key}={path!r} is a checkpoint folder: its model is {str(inner)!r}")
            raise FileNotFoundError(f"{key}={path!r}: the folder has no config.json (not a save_pretrained model; "
                                    f"a GGUF file? convert it with `vold convert-gguf`)")
        return
    if local.exists():
        raise ValueError(f"{key}={path!r} is a file; give the model's folder (save_pretrained) or a hub id"
                         + (" (a GGUF file: convert it with `vold convert-gguf`)" if path.endswith(".gguf") else ""))
    try:
        validate_repo_id(path)
        hub_id = not path.startswith((".", "/", "~")) and path.count("/") <= 1
    except HFValidationError:
        hub_id = False
    if not hub_id:
        raise FileNotFoundError(f"{key}={path!r}: not found (no such folder, and not a hub id like 'org/name')")
    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return
    offline = local_files_only or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    if offline:
        raise FileNotFoundError(f"{key}={path!r}: not found (no such folder, and not in the hub cache; downloads are "
                                f"off: {'model.local_files_only=true' if local_files_only else 'HF_HUB_OFFLINE'})")
    from huggingface_hub import model_info
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError

    try:
        model_info(path, timeout=timeout)
    except GatedRepoError:
        return  # it exists; loading it needs a token (transformers says so)
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{key}={path!r}: not found (no such folder, and no such model on the hub)") from None
    except Exception as error:  # no network, a proxy, a gated repo: say which, in one line
        raise FileNotFoundError(f"{key}={path!r}: no such folder, and the hub could not be asked "
                                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                                f"give a local folder, or set HF_HUB_OFFLINE=1 to use the hub cache") from None


def student_from_config(mc: ModelConfig, device: torch.device, path: str | None = None, *,
                        switch_keys: dict[str, str] | None = None, freeze: bool = True) -> tuple[PreTrainedModel, Any]:
    """The student (``path`` or ``mc.student``) in training mode and its processor (or tokenizer), with
    ``model.lora`` adapters (:func:`add_lora`) and ``model.freeze_*``/``frozen``/``trainable`` applied
    (:func:`apply_freezing`; ``freeze=False`` skips it and its checks: ``vold eval`` trains nothing, and a text-only
    model evaluated under a VLM training config would fail ``model.freeze_vision_tower``'s check).

    ``path`` may be a LoRA adapter folder (a checkpoint's or ``final/`` of a LoRA run, :func:`is_adapter_folder`):
    its base model is loaded and, with ``model.lora.enabled``, the adapter goes on training (resume); without,
    it is merged into the base weights. ``switch_keys``: see :func:`apply_freezing`."""
    path = path or mc.student
    if not path:
        raise ValueError("no student model: set model.student (a local folder or a hub id)")
    model = load_student(path, dtype=mc.dtype, device=device, attn_implementation=mc.attn_implementation,
                         local_files_only=mc.local_files_only, trust_remote_code=mc.trust_remote_code,
                         gradient_checkpointing=mc.gradient_checkpointing, trainable_adapter=mc.lora.enabled)
    logit_options(model)  # a head multiplier vold has no rule for is refused here, before any run file
    if mc.lora.enabled and lora_wrapper(model) is None:
        model = add_lora(model, mc.lora, freeze_vision_tower=mc.freeze_vision_tower)
    if freeze:
        apply_freezing(model, mc, switch_keys=switch_keys)
    processor = load_processor(mc.student_tokenizer or path, vision=is_vision_config(model.config),
                               local_files_only=mc.local_files_only, trust_remote_code=mc.trust_remote_code,
                               min_pixels=mc.min_pixels, max_pixels=mc.max_pixels)
    return model, processor


# ---- which parameters train: freezing --------------------------------------------------------------

def parameter_part(name: str) -> str:
    """``"vision_tower"``, ``"projector"`` or ``"language_model"``: the part of a VLM a parameter belongs to.

    Qwen2-VL/Qwen2.5-VL (transformers 5: ``model.visual.*``, 4.x: ``visual.*``): the projector is the vision
    tower's ``merger`` (patch merger + MLP into the LLM's width), the tower is the rest of ``visual``
    (``patch_embed``, ``blocks``); everything else (embeddings, decoder, final norm, lm_head) is the language
    model. LoRA parameters belong to the part of the layer they adapt."""
    if re.search(r"(^|\.)visual\.merger\.", name):
        return "projector"
    if re.search(r"(^|\.)visual\.", name):
        return "vision_tower"
    return "language_model"


def apply_freezing(model: torch.nn.Module, mc: ModelConfig, *,
                   switch_keys: dict[str, str] | None = None) -> tuple[int, int]:
    """Set ``requires_grad`` from ``model.freeze_vision_tower``/``freeze_projector``/``freeze_language_model``,
    then ``model.frozen`` (freeze the parameters whose name matches, ``re.search``), then ``model.trainable``
    (unfreeze what matches). Parameters already frozen (LoRA's base weights) stay frozen unless ``trainable``
    names them. Returns ``(trainable, frozen)`` element counts (:func:`parameter_counts`).

    A frozen parameter has ``requires_grad=False``: ``make_optimizer`` gives it no AdamW state, autograd no
    ``.grad``, DDP no bucket and ZeRO no gradient or optimizer partition (ZeRO-3 still shards its weight, as
    it shards every module parameter), and it is saved as loaded.

    ``switch_keys``: the config key each freezing switch of ``mc`` came from, for the error messages (default
    ``model.<switch>``; ``vold sft`` names its ``sft.freeze_*`` overrides).

    Raises ``ValueError`` (naming the key) when a vision switch is set for a model without a vision tower,
    a pattern matches no parameter, ``trainable`` unfreezes a base weight of a LoRA student (its adapter
    checkpoints would drop it), or nothing is left to train."""
    names = [name for name, _ in model.named_parameters()]
    parts = {name: parameter_part(name) for name in names}
    switches = (("freeze_vision_tower", "vision_tower"), ("freeze_projector", "projector"),
                ("freeze_language_model", "language_model"))
    keys = {key: (switch_keys or {}).get(key, f"model.{key}") for key, _ in switches}
    frozen_parts = set()
    for key, part in switches:
        if getattr(mc, key):
            if part not in parts.values():
                raise ValueError(f"{keys[key]}=true but the student has no {part.replace('_', ' ')} parameters "
                                 f"(a text-only model?)")
            frozen_parts.add(part)
    patterns = {}
    for key in ("frozen", "trainable"):
        compiled = []
        for pattern in getattr(mc, key):
            try:
                regex = re.compile(pattern)
            except re.error as error:
                raise ValueError(f"model.{key}: {pattern!r} is not a regular expression ({error})") from None
            if not any(regex.search(name) for name in names):
                raise ValueError(f"model.{key}: {pattern!r} matches no parameter of the student "
                                 f"(names look like {names[0]!r}, {names[-1]!r})")
            compiled.append(regex)
        patterns[key] = compiled
    for name, param in model.named_parameters():
        train = param.requires_grad and parts[name] not in frozen_parts
        if any(regex.search(name) for regex in patterns["frozen"]):
            train = False
        if any(regex.search(name) for regex in patterns["trainable"]):
            train = True
        param.requires_grad_(train)
    if lora_wrapper(model) is not None:  # PEFT's adapter checkpoints hold the lora_* tensors only
        base = [name for name, param in model.named_parameters() if param.requires_grad and "lora_" not in name]
        if base:
            raise ValueError(f"model.trainable {[r.pattern for r in patterns['trainable']]} unfreezes base weights "
                             f"of a LoRA student ({base[0]!r}, ...), which its adapter checkpoints would not save: "
                             f"with model.lora.enabled only the adapters train")
    trainable, frozen = parameter_counts(model)
    if trainable == 0:
        culprits = [keys[k] for k, _ in switches if getattr(mc, k)] + (["model.frozen"] if mc.frozen else [])
        if not culprits:  # nothing the config asked for: the weights came in frozen
            raise ValueError("the student has no trainable parameter (every weight was loaded with "
                             "requires_grad=False) and no model.freeze_*/model.frozen key is set")
        raise ValueError(f"{', '.join(culprits)} (with model.frozen={list(mc.frozen)}) leave no trainable "
                         f"parameter in the student")
    return trainable, frozen


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, frozen)`` numbers of elements (tied tensors counted once)."""
    trainable = frozen = 0
    for param in model.parameters():  # parameters() yields a shared (tied) tensor once
        if param.requires_grad:
            trainable += param.numel()
        else:
            frozen += param.numel()
    return trainable, frozen


def parameter_summary(model: torch.nn.Module) -> str:
    """The parameter line of a stage's start-up summary: trainable and frozen counts (and LoRA's rank)."""
    trainable, frozen = parameter_counts(model)
    total = trainable + frozen
    wrapper = lora_wrapper(model)
    lora = f", LoRA rank {wrapper.peft_config['default'].r}" if wrapper is not None else ""
    return f"{trainable:,} trainable, {frozen:,} frozen ({trainable / max(total, 1):.1%} of {total:,} train){lora}"


# ---- LoRA (peft) ------------------------------------------------------------------------------------

ADAPTER_CONFIG = "adapter_config.json"


def _peft() -> Any:
    try:
        import peft
    except ImportError as error:
        raise ImportError("model.lora.enabled=true needs the peft library: pip install peft "
                          "(or pip install 'vold[lora]')") from error
    return peft


def is_adapter_folder(path: str | Path) -> bool:
    """A local folder with a PEFT adapter (``adapter_config.json``) and no full model (``config.json``)."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def adapter_base(path: str | Path) -> str:
    """The base model of an adapter folder (``base_model_name_or_path`` of its ``adapter_config.json``)."""
    base = json.loads((Path(path) / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path}/{ADAPTER_CONFIG} names no base_model_name_or_path")
    return str(base)


def base_model_path(path: str) -> str:
    """``path``, or the base model of an adapter folder (what vLLM loads before the merged weights arrive)."""
    return adapter_base(path) if is_adapter_folder(path) else path


def lora_wrapper(model: torch.nn.Module) -> Any:
    """The ``peft.PeftModel`` around a student with LoRA adapters, or None.

    The trainer runs the inner transformers model (its ``base_model`` gives the hidden states and its
    ``lm_head`` weight the fused losses); the wrapper, kept in the model's ``__dict__`` (not a submodule,
    so ``named_parameters`` and ``state_dict`` do not see it twice), saves and merges the adapter."""
    return model.__dict__.get("_vold_peft")


def _unwrap(wrapper: Any) -> PreTrainedModel:
    model = wrapper.get_base_model()
    model.__dict__["_vold_peft"] = wrapper
    return model


def add_lora(model: PreTrainedModel, lora: LoraSettings, *, freeze_vision_tower: bool = False) -> PreTrainedModel:
    """LoRA adapters (``r``, ``alpha``, ``dropout``, ``target_modules``) on ``model`` through ``peft``; returns the
    adapted transformers model (its base weights frozen, the adapters trainable; :func:`lora_wrapper` gives the
    ``PeftModel``). With ``freeze_vision_tower`` the vision tower (``visual.*``) gets no adapters."""
    peft = _peft()
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules),
                             exclude_modules=r".*visual\.(patch_embed|blocks).*" if freeze_vision_tower else None)
    try:
        wrapper = peft.get_peft_model(model, config)
    except ValueError as error:
        raise ValueError(f"model.lora.target_modules={lora.target_modules}: {error}") from None
    return _unwrap(wrapper)


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The student's weights as a plain transformers model would hold them: for a LoRA student each adapted
    ``W`` is ``W + (alpha / r) B A`` (``peft``'s ``get_delta_weight``) under its original name, the adapter
    tensors left out; without LoRA, ``model.state_dict()``. Detached, no copy of unadapted tensors."""
    wrapper = lora_wrapper(model)
    if wrapper is None:
        return model.state_dict()
    from peft.tuners.lora import LoraLayer

    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            weight = base.weight.detach()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            out[f"{name}.weight"] = weight
            if getattr(base, "bias", None) is not None:
                out[f"{name}.bias"] = base.bias.detach()
    for key, value in model.state_dict().items():
        if "lora_" not in key and ".base_layer." not in key:
            out.setdefault(key, value)
    return out


def merged_copy(model: torch.nn.Module) -> PreTrainedModel:
    """A plain transformers model with the LoRA adapters merged (a deep copy: ``model`` keeps training)."""
    import copy

    wrapper = lora_wrapper(model)
    if wrapper is None:
        return model
    merged = copy.deepcopy(wrapper).merge_and_unload()
    merged.__dict__.pop("_vold_peft", None)  # the copy's link to its (now spent) wrapper
    return merged


def teacher_from_config(mc: ModelConfig, device: torch.device) -> tuple[PreTrainedModel, Any]:
    """The frozen teacher (eval mode, no grad, ``teacher_dtype``) and its tokenizer."""
    if not mc.teacher:
        raise ValueError("no teacher model: set model.teacher (a local folder or a hub id)")
    teacher = load_teacher(mc.teacher, dtype=mc.teacher_dtype or mc.dtype, device=device,
                           attn_implementation=mc.attn_implementation, local_files_only=mc.local_files_only,
                           trust_remote_code=mc.trust_remote_code)
    logit_options(teacher)  # a head multiplier vold has no rule for is refused here, before any run file
    tokenizer = load_tokenizer(mc.teacher_tokenizer or mc.teacher, local_files_only=mc.local_files_only,
                               trust_remote_code=mc.trust_remote_code)
    return teacher, tokenizer


def convert_gguf(folder: str | Path, gguf_file: str, out_dir: str | Path, *, dtype: str = "float32") -> Path:
    """Dequantise a GGUF checkpoint (e.g. SmolLM2's) into a ``save_pretrained`` folder: model + tokenizer.
    ``out_dir`` is replaced as a whole (written as ``<out_dir>.tmp``, then renamed).

    Needs the ``gguf`` package, not ``accelerate``: the model is built from the GGUF's config and the
    dequantised tensors are loaded with ``load_state_dict`` (tied heads are the only keys allowed missing).
    """
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, out_dir = Path(folder), Path(out_dir)
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
    tensors = load_gguf_checkpoint(str(folder / gguf_file), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{folder / gguf_file}: weights do not match the model "
                         f"(missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)})")
    model.tie_weights()
    # written beside OUT, then put in its place: OUT never holds a half-written model, nor files of the model an
    # earlier conversion wrote there (``vold convert-gguf --overwrite``)
    # (the same steps as vold.runs.replaced_whole, which this module cannot import: vold.runs imports it)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def autocast(device: torch.device, dtype: str | None) -> Any:
    """``torch.autocast`` for ``model.autocast`` (a no-op context when None)."""
    import contextlib

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=resolve_dtype(dtype))


def head_for_loss(model: PreTrainedModel, hidden: torch.Tensor,
                  dtype: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(hidden, weight, bias)`` of ``model``'s head in one dtype for the fused losses: ``dtype`` (the
    autocast dtype) when given, else the weight's. Casts are differentiable: gradients reach the weights."""
    weight, bias = lm_head_weight(model), lm_head_bias(model)
    target = resolve_dtype(dtype) if dtype is not None else weight.dtype
    cast = (lambda x: x if x is None or x.dtype == target else x.to(target))
    return cast(hidden), cast(weight), cast(bias)
