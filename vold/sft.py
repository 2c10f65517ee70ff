"""Stage 1, ``vold sft``: cold-start SFT of the student on the teacher's traces.

A row is the student's chat-templated prompt (with its images, for a VLM) followed by the response
``tokenizer(trace) + [EOS]``. Prompts are left-padded and responses right-padded, so the hidden
states that predict the response are ``completion_hidden_states`` (as in the RL stage) and the loss
is the masked NLL of the response tokens only, from ``fused_linear_logprobs`` (no [N, V] logits):

    L = - sum_{b,t} m_bt log p(y_bt | x_b, y_b,<t) / sum_{b,t} m_bt

where the sums run over every micro-batch of the optimizer step, so gradient accumulation gives
the same update as one big batch. A response is cut so that prompt + response <= sft.max_length
(a row without room contributes nothing). Rows are padded, or with ``sft.packing`` each micro-batch is one
row of its real tokens (``vold.packing``: per-sequence positions, M-RoPE for image rows, flash-attn varlen
or a block-diagonal mask). Under ``torchrun`` each rank takes every W-th row of the step's global batch
and the normaliser is the all-reduced token count / W (the gradients are averaged): ``vold.distributed``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from vold.config import Config, ModelConfig
from vold.data import Example, PromptSampler, build_prompt_batch, load_examples, require_rows, tokenizer_of
from vold.models import check_model_path, student_from_config
from vold.runs import StreakWarning, seed_everything
from vold.scoring import response_logprobs
from vold.stage import Stage
from vold.traces import output_file as traces_file


def sft_batch(examples: list[Example], processor: Any, responses: list[str], *, max_length: int,
              system_prompt: str | None = None) -> dict[str, Any]:
    """Prompt inputs (left-padded, with images) and response ids/mask ``[B, T]`` (right-padded, EOS-terminated)."""
    tokenizer = tokenizer_of(processor)
    prompts = build_prompt_batch(examples, processor, system_prompt=system_prompt).student_inputs
    room = (max_length - prompts["attention_mask"].sum(dim=1)).clamp(min=0).tolist()
    encoded = tokenizer(responses, add_special_tokens=False)["input_ids"]
    rows = [(list(ids) + [tokenizer.eos_token_id])[:r] for ids, r in zip(encoded, room, strict=True)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max([len(r) for r in rows] + [1])
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    cut = sum(len(e) + 1 > r for e, r in zip(encoded, room, strict=True))
    return {"prompt_inputs": prompts, "ids": ids, "mask": mask, "truncated": cut}


def sft_loss(model: torch.nn.Module, batch: dict[str, Any], *, normalizer: float,
             autocast_dtype: str | None = None, packing: bool = False) -> torch.Tensor:
    """``- sum(m * log p(y)) / normalizer`` for one micro-batch (on the model's device); ``packing``: one packed
    row of real tokens (``vold.packing``), the loss over the response tokens only."""
    logp, mask = response_logprobs(model, batch, autocast_dtype=autocast_dtype, packing=packing)
    return -(logp * mask).sum() / normalizer


SWITCHES = ("freeze_vision_tower", "freeze_projector", "freeze_language_model")


def sft_model_config(cfg: Config) -> ModelConfig:
    """``cfg.model`` with this stage's freezing switches (``sft.freeze_*`` that are not None) in place."""
    return dataclasses.replace(cfg.model, **{k: getattr(cfg.sft, k) for k in SWITCHES
                                             if getattr(cfg.sft, k) is not None})


def train_sft(cfg: Config) -> Path:
    """Run stage 1; returns the folder of the final model (``{output_dir}/sft/final``)."""
    sc, data = cfg.sft, cfg.data
    # every check on the user's input comes before the run folder is written (Stage.open)
    files = sc.train_files or [str(traces_file(cfg))]
    if not sc.train_files and not Path(files[0]).exists():
        raise FileNotFoundError(f"data file not found: {files[0]} (sft.train_files is empty, so vold sft reads "
                                f"vold make-traces' output: run `vold make-traces` with this config first, or set "
                                f"sft.train_files)")
    examples = load_examples(files, image_root=data.image_root, check_images=data.check_images,
                             prompt_column=data.prompt_column, answer_column=data.answer_column,
                             required=(sc.response_column,))
    responses = [str(e.extra[sc.response_column]) for e in examples]
    step_size = sc.batch_size * sc.grad_accum
    require_rows(examples, files, step_size, f"one sft step (sft.batch_size * sft.grad_accum = {step_size})")
    max_steps = sc.max_steps if sc.max_steps is not None else sc.epochs * (len(examples) // step_size)
    stage = Stage(cfg, "sft", "sft", max_steps=max_steps)
    runtime = stage.runtime
    sampler = PromptSampler(len(examples), step_size, seed=cfg.seed, shuffle=data.shuffle)
    runtime.check_divisible(step_size, "sft.batch_size * sft.grad_accum")
    if step_size // runtime.world_size < sc.grad_accum:
        raise ValueError(f"sft: {step_size // runtime.world_size} rows per rank cannot fill sft.grad_accum = "
                         f"{sc.grad_accum} micro-batches")
    if stage.prepare() is None and runtime.is_main:
        check_model_path(cfg.model.student, "model.student", local_files_only=cfg.model.local_files_only)
    seed_everything(cfg.seed)
    model, processor = student_from_config(sft_model_config(cfg), stage.device, path=stage.model_path(None),
                                           switch_keys={k: f"sft.{k}" for k in SWITCHES if getattr(sc, k) is not None})
    stage.open(model, processor, sampler, section=sc, updates=max_steps, start_from=cfg.model.student,
               examples=len(examples), files=files)

    no_tokens = StreakWarning(min(10, max_steps), lambda n: (
        f"sft: no response token in {n} steps (train/tokens = 0), so nothing is trained: every row's prompt fills "
        f"sft.max_length={sc.max_length} (a response is cut to prompt + response <= sft.max_length); raise "
        f"sft.max_length"))
    model.train()
    world = runtime.world_size
    while stage.step < max_steps:
        t0 = time.perf_counter()
        indices = runtime.shard(sampler.next_indices())  # this rank's rows of the global batch: [r::W]
        micro = [
            sft_batch([examples[i] for i in chunk], processor, [responses[i] for i in chunk],
                      max_length=sc.max_length, system_prompt=data.system_prompt)
            for chunk in torch.tensor(indices).tensor_split(sc.grad_accum) if len(chunk)
        ]
        # the global token count; the gradients are averaged over the W ranks, so each divides by tokens / W
        tokens, truncated = (int(x) for x in runtime.sum([sum(int(b["mask"].sum()) for b in micro),
                                                          sum(b["truncated"] for b in micro)]))
        total = 0.0
        for index, batch in enumerate(micro):
            with runtime.accumulate(last=index == len(micro) - 1):
                loss = runtime.forward(sft_loss, batch, normalizer=max(tokens, 1) / world,
                                       autocast_dtype=cfg.model.autocast, packing=sc.packing)
                runtime.backward(loss)
            total += float(loss.detach())
        lr = stage.scheduler.get_last_lr()[0]
        grad_norm = runtime.step(stage.optimizer, stage.scheduler, cfg.optim.max_grad_norm)
        total = runtime.sum([total])[0] / world
        stage.end_step({"loss": total, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "truncated": truncated,
                        "time/step": time.perf_counter() - t0}, postfix={"loss": f"{total:.4f}"})
        no_tokens.update(tokens == 0)
    return stage.close()
