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
from vold.data import Example, PromptSampler, build_prompt_batch, load_examples, tokenizer_of
from vold.distributed import Runtime
from vold.kernels import fused_linear_logprobs
from vold.models import autocast, completion_hidden_states, head_for_loss, parameter_summary, student_from_config
from vold.packing import pack, packed_completion_hidden_states
from vold.runs import (
    Logger,
    find_checkpoint,
    make_optimizer,
    make_scheduler,
    progress_bar,
    scalar_metrics,
    start_run,
)
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


def response_logprobs(model: torch.nn.Module, batch: dict[str, Any], *, autocast_dtype: str | None = None,
                      packing: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(y_t), m_t)`` of the responses of one micro-batch (``batch``: ``prompt_inputs``, ``ids``, ``mask``;
    on the model's device), from ``fused_linear_logprobs`` on the hidden states (differentiable, no [N, V]
    logits): ``[B, T]``, or ``[n]`` over the real tokens of one packed row with ``packing`` (``vold.packing``)."""
    device = next(model.parameters()).device
    prompts = {k: v.to(device) for k, v in batch["prompt_inputs"].items()}
    ids, mask = batch["ids"].to(device), batch["mask"].to(device)
    with autocast(device, autocast_dtype):
        if packing:
            hidden, _, select = packed_completion_hidden_states(model, prompts, ids, mask)
            ids, mask = pack(ids, select), pack(mask, select)
        else:
            hidden = completion_hidden_states(model, prompts, ids, mask)
    hidden, weight, bias = head_for_loss(model, hidden, autocast_dtype)
    return fused_linear_logprobs(hidden, weight, ids, bias=bias), mask


def sft_loss(model: torch.nn.Module, batch: dict[str, Any], *, normalizer: float,
             autocast_dtype: str | None = None, packing: bool = False) -> torch.Tensor:
    """``- sum(m * log p(y)) / normalizer`` for one micro-batch (on the model's device); ``packing``: one packed
    row of real tokens (``vold.packing``), the loss over the response tokens only."""
    logp, mask = response_logprobs(model, batch, autocast_dtype=autocast_dtype, packing=packing)
    return -(logp * mask).sum() / normalizer


def sft_model_config(cfg: Config) -> ModelConfig:
    """``cfg.model`` with this stage's freezing switches (``sft.freeze_*`` that are not None) in place."""
    switches = ("freeze_vision_tower", "freeze_projector", "freeze_language_model")
    return dataclasses.replace(cfg.model, **{k: getattr(cfg.sft, k) for k in switches
                                             if getattr(cfg.sft, k) is not None})


def train_sft(cfg: Config) -> Path:
    """Run stage 1; returns the folder of the final model (``{output_dir}/sft/final``)."""
    sc, data = cfg.sft, cfg.data
    runtime = Runtime(cfg.distributed, cfg.device)  # data parallel under torchrun (vold.distributed)
    run = start_run(cfg, "sft", write=runtime.is_main)
    files = sc.train_files or [str(traces_file(cfg))]
    examples = load_examples(files, image_root=data.image_root, check_images=data.check_images,
                             prompt_column=data.prompt_column, answer_column=data.answer_column,
                             required=(sc.response_column,))
    responses = [str(e.extra[sc.response_column]) for e in examples]
    step_size = sc.batch_size * sc.grad_accum
    if len(examples) < step_size:
        raise ValueError(f"sft: {len(examples)} rows in {files}, fewer than one step "
                         f"(sft.batch_size * sft.grad_accum = {step_size})")
    max_steps = sc.max_steps if sc.max_steps is not None else sc.epochs * (len(examples) // step_size)
    sampler = PromptSampler(len(examples), step_size, seed=cfg.seed, shuffle=data.shuffle)
    runtime.check_divisible(step_size, "sft.batch_size * sft.grad_accum")
    if step_size // runtime.world_size < sc.grad_accum:
        raise ValueError(f"sft: {step_size // runtime.world_size} rows per rank cannot fill sft.grad_accum = "
                         f"{sc.grad_accum} micro-batches")

    device = runtime.device
    checkpoint = runtime.broadcast(find_checkpoint(run, cfg.checkpoint.resume) if runtime.is_main else None)
    model, processor = student_from_config(sft_model_config(cfg), device,
                                           path=str(checkpoint / "model") if checkpoint else None)
    oc = cfg.optim
    if runtime.is_main:
        print(parameter_summary(model, "sft"))
    optimizer = make_optimizer(model, sc.lr, weight_decay=oc.weight_decay if sc.weight_decay is None
                               else sc.weight_decay, betas=(oc.adam_beta1, oc.adam_beta2), eps=oc.adam_eps)
    scheduler = make_scheduler(optimizer, kind=sc.lr_scheduler, warmup=sc.warmup_steps, total=max_steps,
                               min_ratio=sc.min_lr_ratio)
    runtime.wrap(model, optimizer, grad_accum=sc.grad_accum, max_grad_norm=oc.max_grad_norm,
                 bf16="bfloat16" in (cfg.model.dtype, cfg.model.autocast))
    step = runtime.resume(run, checkpoint, optimizer, scheduler, sampler, "sft")
    logger = Logger(run, cfg.logging, start_step=step) if runtime.is_main else None
    bar = progress_bar(max_steps, initial=step, desc="sft", enabled=cfg.logging.progress and runtime.is_main)

    model.train()
    while step < max_steps:
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
        world = runtime.world_size
        total = 0.0
        for index, batch in enumerate(micro):
            with runtime.accumulate(last=index == len(micro) - 1):
                loss = runtime.forward(sft_loss, batch, normalizer=max(tokens, 1) / world,
                                       autocast_dtype=cfg.model.autocast, packing=sc.packing)
                runtime.backward(loss)
            total += float(loss.detach())
        lr = scheduler.get_last_lr()[0]
        grad_norm = runtime.step(optimizer, scheduler, oc.max_grad_norm)
        total = runtime.sum([total])[0] / world
        step += 1

        metrics = {"loss": total, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                   "truncated": truncated, "time/step": time.perf_counter() - t0}
        if logger is not None and (step % cfg.logging.every == 0 or step == max_steps):
            logger.log(step, scalar_metrics(metrics))
        bar.update()
        bar.set_postfix(loss=f"{total:.4f}")
        runtime.save_training_checkpoint(run, step, processor, scheduler=scheduler, sampler=sampler,
                                         optimizer=optimizer, checkpoint_cfg=cfg.checkpoint)
    bar.close()
    return runtime.finish(processor, run, logger, "sft", step, merged=cfg.model.lora.save_merged)
