"""``VoldGRPOTrainer``: TRL's ``GRPOTrainer`` with the loss computed by :func:`vold.kernels.vold_loss`.

A TRL user changes one line (``GRPOTrainer`` -> ``VoldGRPOTrainer``) and gets GRPO plus on-policy
distillation from a frozen teacher, computed from the final hidden states and the lm_head weights
in ``[chunk, V]`` pieces::

    trainer = VoldGRPOTrainer(model=model, reward_funcs=accuracy, args=GRPOConfig(...), train_dataset=ds,
                              teacher_model=teacher, distill_coef=0.1, distill_estimator="full")

Per completion token the loss is TRL's clipped policy term (+ ``beta`` * k3 KL to the reference) plus
``distill_coef * w_i * D_t``, where ``D_t`` is KL(student || teacher) at TRL's ``temperature``: exact
over the vocabulary (``distill_estimator="full"``, from the teacher's hidden states and lm_head) or the
sampled-token estimate k1/k2/k3 from the teacher's log-probs; ``w_i = clamp(1 - reward_i, 0, 1)``
with ``distill_on_wrong_only=True`` (meant for binary 0/1 rewards: distil only on wrong rollouts;
``reward_i`` is TRL's weighted sum of the reward functions), else 1. Everything else comes from TRL's
config and batch: ``loss_type`` (grpo, bnpo, dr_grpo, dapo), ``epsilon``/``epsilon_high``, ``delta``
(= vold's dual-clip ``clip_ratio_c``), ``importance_sampling_level``, ``beta``, ``temperature``,
``max_completion_length``, ``num_items_in_batch``, gradient accumulation, ``tool_mask`` and the vLLM
importance-sampling ratio (a positive weight on the policy term, folded into the advantages).

The teacher scores the same prompt + completion ids as the student, or, when the dataset has a
``teacher_prompt`` column (text or conversational, like ``prompt``), that prompt followed by the
student's completion ids: it is tokenized with the student's tokenizer and chat template, so the
teacher must share the tokenizer (for a VLM student, give a text teacher a ``teacher_prompt`` that
describes the image; with the default it would see the image placeholder tokens without the image).

Options whose math ``vold_loss`` does not have raise ``NotImplementedError`` at construction:
``loss_type`` cispo/sapo/luspo/vespo, ``top_entropy_quantile < 1``, the entropy bonus, off-policy
masking, ``beta != 0`` with ``use_bias_correction_kl=True`` (set it to False: vold's reference KL is
TRL's k3 without the importance weight), ``delta <= 1 + epsilon_high``, the MoE auxiliary loss
(set ``router_aux_loss_coef=0``), logit soft-capping/scaling, FSDP and DeepSpeed ZeRO-3 (the lm_head
weight is read outside the forward).
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM
from trl import GRPOTrainer
from trl.data_utils import is_conversational
from trl.models import prepare_deepspeed
from trl.trainer.utils import pad

from vold.kernels import fused_linear_logprobs, vold_loss
from vold.kernels.checks import check_number
from vold.models import check_model_path
from vold.runs import distill_metric

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
DISTILL_ESTIMATORS = ("full", "k1", "k2", "k3")
# Batch entries TRL passes to the model's forward besides the ids (VLMs); the others are bookkeeping.
MODEL_INPUT_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids")
# vold metric -> TRL's name for the same quantity (the others get a "vold/" prefix)
TRL_METRIC_NAMES = {"entropy": "entropy", "ref_kl": "kl", "clip_low": "clip_ratio/low_mean",
                    "clip_high": "clip_ratio/high_mean"}


def completion_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_completion: int,
                             **model_inputs) -> torch.Tensor:
    """Final (normed) hidden states ``[B, T, H]`` that predict the last ``T = num_completion`` tokens.

    The model is called through its (possibly DDP/PEFT-wrapped) forward with ``logits_to_keep=1``, so
    the lm_head runs on one position only; ``hidden_states[-1]`` is the backbone's ``last_hidden_state``.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1,
                use_cache=False, **model_inputs)
    return out.hidden_states[-1][:, -num_completion - 1:-1]


class VoldGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose loss is ``vold_loss`` (GRPO + ref KL + distillation to ``teacher_model``).

    Args (besides ``GRPOTrainer``'s):
        teacher_model: a causal LM (or its name/path) with the student's vocabulary; frozen, put in eval
            mode and on the trainer's device. ``None`` is allowed with ``distill_coef=0`` (plain GRPO).
        distill_coef: weight of KL(student || teacher) per token, normalised like the policy term.
        distill_estimator: ``"full"`` exact reverse KL over the vocabulary from the teacher's hidden
            states, or ``"k1"/"k2"/"k3"`` from the teacher's log-probs of the sampled tokens.
        distill_on_wrong_only: weight each sequence's distillation by ``clamp(1 - reward, 0, 1)``.
    """

    def __init__(self, *args, teacher_model=None, distill_coef: float = 0.1, distill_estimator: str = "full",
                 distill_on_wrong_only: bool = False, **kwargs):
        # vold's own arguments first, before TRL builds the model, the datasets and the generation engine (a NaN
        # distill_coef used to pass here and fail at the first training step, after a round of generation)
        check_number("distill_coef", distill_coef)
        if distill_estimator not in DISTILL_ESTIMATORS:
            raise ValueError(f"distill_estimator must be one of {DISTILL_ESTIMATORS}, got {distill_estimator!r}")
        if distill_coef != 0.0 and teacher_model is None:
            raise ValueError("distill_coef != 0 needs a teacher_model")
        if not isinstance(distill_on_wrong_only, bool):
            raise TypeError(f"distill_on_wrong_only must be a bool, got {type(distill_on_wrong_only).__name__}")
        if isinstance(teacher_model, str):  # a missing path gave the hub's "Repo id must be in the form ..." after
            check_model_path(teacher_model, "teacher_model")  # TRL had built everything else
        super().__init__(*args, **kwargs)
        self.distill_coef, self.distill_estimator = float(distill_coef), distill_estimator
        self.distill_on_wrong_only = distill_on_wrong_only
        self._check_supported()
        if isinstance(teacher_model, str):
            teacher_model = AutoModelForCausalLM.from_pretrained(teacher_model, dtype=self.model.dtype)
        if teacher_model is not None:
            teacher_model.requires_grad_(False).eval()
            if self.is_deepspeed_enabled:
                teacher_model = prepare_deepspeed(teacher_model, self.accelerator)
            else:
                teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        self.teacher_model = teacher_model
        self._last_rewards_per_func = None
        if teacher_model is not None:  # padded heads: the common rows, if they hold every token
            rows = [self.accelerator.unwrap_model(m).get_output_embeddings().weight.shape[0]
                    for m in (self.model, teacher_model)]
            if rows[0] != rows[1] and len(self._tokenizer) > min(rows):
                raise ValueError(f"student and teacher lm_heads have {rows[0]} and {rows[1]} rows, fewer than "
                                 f"the tokenizer's {len(self._tokenizer)} tokens: they must share the vocabulary")

    def _check_supported(self) -> None:
        args, problems = self.args, []
        if self.loss_type not in SUPPORTED_LOSS_TYPES:
            problems.append(f"loss_type={self.loss_type!r} (supported: {SUPPORTED_LOSS_TYPES})")
        if self.top_entropy_quantile < 1.0:
            problems.append("top_entropy_quantile < 1")
        if self._entropy_bonus_enabled:
            problems.append("the entropy bonus (entropy_coef != 0 or use_adaptive_entropy)")
        if self.off_policy_mask_threshold is not None:
            problems.append("off_policy_mask_threshold")
        if self.beta != 0.0 and args.use_bias_correction_kl:
            problems.append("beta != 0 with use_bias_correction_kl=True (set it to False)")
        if args.delta is not None and not args.delta > 1.0 + self.epsilon_high:
            problems.append("delta <= 1 + epsilon_high")
        if self.aux_loss_enabled:
            problems.append("the MoE auxiliary loss (set router_aux_loss_coef=0)")
        text_config = self.accelerator.unwrap_model(self.model).config.get_text_config()
        for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling"):
            if getattr(text_config, name, None) not in (None, 1, 1.0):
                problems.append(f"{name}={getattr(text_config, name)}")
        plugin = self.accelerator.state.deepspeed_plugin if self.is_deepspeed_enabled else None
        if self.is_fsdp_enabled or getattr(plugin, "zero_stage", 0) == 3:
            problems.append("FSDP / DeepSpeed ZeRO-3 (sharded lm_head)")
        if problems:
            raise NotImplementedError("VoldGRPOTrainer does not support: " + "; ".join(problems))

    # ---- rollouts: keep the rewards (distill_on_wrong_only) and tokenize teacher prompts ------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._last_rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._last_rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        device = self.accelerator.device
        if self.distill_on_wrong_only:
            # rewards_per_func holds every process's rows: keep this process's, like TRL's advantages
            rewards = (self._last_rewards_per_func * self.reward_weights.to(device)).nansum(dim=1)
            start = self.accelerator.process_index * len(inputs)
            output["distill_mask"] = (1.0 - rewards[start:start + len(inputs)]).clamp(0.0, 1.0)
        if self.teacher_model is not None and "teacher_prompt" in inputs[0]:
            prompts = [x["teacher_prompt"] for x in inputs]
            tokenizer = self._tokenizer
            if is_conversational({"prompt": prompts[0]}):
                ids = tokenizer.apply_chat_template(prompts, chat_template=self.chat_template, tokenize=True,
                                                    add_generation_prompt=True, return_dict=True,
                                                    **self.chat_template_kwargs)["input_ids"]
            else:
                ids = tokenizer(text=prompts)["input_ids"]
            ids = [torch.tensor(x) for x in ids]
            output["teacher_prompt_ids"] = pad(ids, tokenizer.pad_token_id, padding_side="left").to(device)
            output["teacher_prompt_mask"] = pad([torch.ones_like(x) for x in ids], 0, padding_side="left").to(device)
        return output

    # ---- loss -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _teacher_inputs(self, inputs: dict, vocab_size: int | None) -> dict:
        """``vold_loss`` keyword arguments for the distillation term: the teacher's head, or its log-probs."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        prompt_ids = inputs.get("teacher_prompt_ids", inputs["prompt_ids"])
        prompt_mask = inputs.get("teacher_prompt_mask", inputs["prompt_mask"])
        with self.accelerator.autocast():
            hidden = completion_hidden_states(self.teacher_model, torch.cat([prompt_ids, completion_ids], dim=1),
                                              torch.cat([prompt_mask, completion_mask], dim=1), completion_ids.size(1))
        head = self.accelerator.unwrap_model(self.teacher_model).get_output_embeddings()
        hidden = hidden.to(head.weight.dtype)
        if self.distill_estimator == "full":
            return {"teacher_hidden": hidden, "teacher_weight": head.weight, "teacher_bias": head.bias}
        logps = fused_linear_logprobs(hidden, head.weight, completion_ids, bias=head.bias,
                                      temperature=self.temperature, vocab_size=vocab_size)
        return {"teacher_logprobs": logps}

    def _compute_loss(self, model, inputs):
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        completion_mask = inputs["completion_mask"]
        mask = completion_mask * inputs["tool_mask"] if "tool_mask" in inputs else completion_mask
        model_inputs = {key: inputs[key] for key in MODEL_INPUT_KEYS if inputs.get(key) is not None}
        with self.accelerator.autocast():
            hidden = completion_hidden_states(model, torch.cat([prompt_ids, completion_ids], dim=1),
                                              torch.cat([inputs["prompt_mask"], completion_mask], dim=1),
                                              completion_ids.size(1), **model_inputs)
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        hidden = hidden.to(head.weight.dtype)  # autocast / cast_lm_head_to_fp32

        teacher, vocab_size = {}, None
        if self.distill_coef != 0.0:
            t_rows = self.accelerator.unwrap_model(self.teacher_model).get_output_embeddings().weight.shape[0]
            vocab_size = None if t_rows == head.weight.shape[0] else min(t_rows, head.weight.shape[0])
            teacher = self._teacher_inputs(inputs, vocab_size)

        advantages = inputs["advantages"]
        if "importance_sampling_ratio" in inputs:  # vLLM correction: w * pg(A) = pg(w * A) for w >= 0
            advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
            advantages = (advantages * inputs["importance_sampling_ratio"]).expand(mask.shape)

        # TRL's normalisations: loss_type's per-token weights, then / gradient-accumulation steps, except
        # dapo, whose denominator is the accumulation window's token count (num_items_in_batch).
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        token_normalizer = None
        if self.loss_type == "dapo":
            token_normalizer = inputs["num_items_in_batch"].clamp(min=1.0).item() / self.accelerator.num_processes
            if mode == "train":
                token_normalizer *= accumulation / self.args.steps_per_generation
            accumulation = 1

        loss, metrics = vold_loss(
            hidden, head.weight, completion_ids, advantages, inputs.get("old_per_token_logps"), mask,
            student_bias=head.bias, ref_logprobs=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            distill_mask=inputs.get("distill_mask"), loss_type=self.loss_type, epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high, clip_ratio_c=self.args.delta,
            importance_sampling_level=self.importance_sampling_level, ref_kl_coef=self.beta, ref_kl_estimator="k3",
            distill_coef=self.distill_coef, distill_estimator=self.distill_estimator,
            temperature=self.temperature, max_completion_length=self.max_completion_length,
            token_normalizer=token_normalizer, vocab_size=vocab_size, **teacher,
        )
        self._log_vold_metrics(metrics, mask, mode)
        return loss / accumulation

    def _log_vold_metrics(self, metrics: dict[str, torch.Tensor], mask: torch.Tensor, mode: str) -> None:
        """Token means over all processes (weighted by their token counts), under TRL's names where TRL has one."""
        names = {**TRL_METRIC_NAMES, "distill_kl": f"vold/{distill_metric(self.distill_estimator)}"}  # says what
        means = {names.get(key, f"vold/{key}"): value for key, value in metrics.items()  # D_t is: exact or k2
                 if key not in ("loss", "policy_loss")}
        means["clip_ratio/region_mean"] = metrics["clip_low"] + metrics["clip_high"]  # disjoint: A < 0 vs A > 0
        count = mask.sum().float()
        totals = self.accelerator.reduce(torch.stack([*(v.float() * count for v in means.values()), count]), "sum")
        for name, total in zip(means, totals[:-1], strict=True):
            self._metrics[mode][name].append((total / totals[-1].clamp(min=1.0)).item())
        self._metrics[mode]["vold/policy_loss"].append(self.accelerator.gather(metrics["policy_loss"]).mean().item())
