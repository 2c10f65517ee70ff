"""Stage 1, ``vold sft``: cold-start SFT of the student on the teacher's traces.

A row is the student's chat-templated prompt (with its images, for a VLM) followed by the response
``tokenizer(trace) + [EOS]``. Prompts are left-padded and responses right-padded, so the hidden
states that predict the response are ``completion_hidden_states`` (as in the RL stage) and the loss
is the masked NLL of the response tokens only, from ``fused_linear_logprobs`` (no [N, V] logits):

    L = - sum_{b,t} m_bt log p(y_bt | x_b, y_b,<t) / sum_{b,t} m_bt

where the sums run over every micro-batch of the optimizer step, so gradient accumulation gives
the same update as one big batch. A response is cut so that prompt + response <= sft.max_length
(a row without room contributes nothing). Rows are padded, not packed: packing VLM rows needs
per-sequence M-RoPE positions and varlen attention kernels, which this CPU-testable loop avoids.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from vold.config import Config
from vold.data import Example, PromptSampler, build_prompt_batch, load_examples, tokenizer_of
from vold.kernels import fused_linear_logprobs
from vold.models import autocast, completion_hidden_states, head_for_loss, resolve_device, student_from_config
from vold.runs import (
    Logger,
    clip_grad_norm,
    find_checkpoint,
    load_checkpoint_state,
    make_optimizer,
    make_scheduler,
    progress_bar,
    reset_logs,
    restore_run,
    save_checkpoint,
    save_model,
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


def sft_loss(model: torch.nn.Module, batch: dict[str, Any], *, normalizer: float,
             autocast_dtype: str | None = None) -> torch.Tensor:
    """``- sum(m * log p(y)) / normalizer`` for one micro-batch (on the model's device)."""
    device = next(model.parameters()).device
    prompts = {k: v.to(device) for k, v in batch["prompt_inputs"].items()}
    ids, mask = batch["ids"].to(device), batch["mask"].to(device)
    with autocast(device, autocast_dtype):
        hidden = completion_hidden_states(model, prompts, ids, mask)
    hidden, weight, bias = head_for_loss(model, hidden, autocast_dtype)
    logp = fused_linear_logprobs(hidden, weight, ids, bias=bias)
    return -(logp * mask).sum() / normalizer


def train_sft(cfg: Config) -> Path:
    """Run stage 1; returns the folder of the final model (``{output_dir}/sft/final``)."""
    sc, data = cfg.sft, cfg.data
    run = start_run(cfg, "sft")
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

    device = resolve_device(cfg.device)
    checkpoint = find_checkpoint(run, cfg.checkpoint.resume)
    model, processor = student_from_config(cfg.model, device, path=str(checkpoint / "model") if checkpoint else None)
    oc = cfg.optim
    optimizer = make_optimizer(model, sc.lr, weight_decay=oc.weight_decay, betas=(oc.adam_beta1, oc.adam_beta2),
                               eps=oc.adam_eps)
    scheduler = make_scheduler(optimizer, kind=sc.lr_scheduler, warmup=sc.warmup_steps, total=max_steps,
                               min_ratio=sc.min_lr_ratio)
    step = 0
    if checkpoint is not None:
        state = load_checkpoint_state(checkpoint)
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        step = state["step"]
        restore_run(run, state)
        print(f"sft: resumed from {checkpoint} (step {step})")
    else:
        reset_logs(run)
    logger = Logger(run, cfg.logging, start_step=step)
    bar = progress_bar(max_steps, initial=step, desc="sft", enabled=cfg.logging.progress)

    model.train()
    while step < max_steps:
        t0 = time.perf_counter()
        indices = sampler.next_indices()
        micro = [
            sft_batch([examples[i] for i in chunk], processor, [responses[i] for i in chunk],
                      max_length=sc.max_length, system_prompt=data.system_prompt)
            for chunk in torch.tensor(indices).tensor_split(sc.grad_accum) if len(chunk)
        ]
        tokens = sum(int(b["mask"].sum()) for b in micro)
        total = 0.0
        for batch in micro:
            loss = sft_loss(model, batch, normalizer=max(tokens, 1), autocast_dtype=cfg.model.autocast)
            loss.backward()
            total += float(loss.detach())
        grad_norm = clip_grad_norm(model.parameters(), oc.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        metrics = {"loss": total, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                   "truncated": sum(b["truncated"] for b in micro), "time/step": time.perf_counter() - t0}
        if step % cfg.logging.every == 0 or step == max_steps:
            logger.log(step, scalar_metrics(metrics))
        bar.update()
        bar.set_postfix(loss=f"{total:.4f}")
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            state = {"scheduler": scheduler.state_dict(), "sampler": sampler.state_dict()}
            if cfg.checkpoint.save_optimizer:
                state["optimizer"] = optimizer.state_dict()
            save_checkpoint(run, step, model, processor, state, keep_last=cfg.checkpoint.keep_last)
    bar.close()
    logger.close()
    final = save_model(model, processor, run / "final")
    print(f"sft: {step} steps -> {final}")
    return final
