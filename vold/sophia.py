"""``vold sophia``: semi-off-policy RL for vision-language slow thinking (SOPHIA, Shen et al. 2025).

The behaviour policy is half student, half teacher: the trainable VLM looks at the image, the text-only
teacher reasons. One training step (``sophia.*``; the paper: K = N = 8, alpha = 0.75; math in docs/sophia.md):

1. B items (image + question) from the sampler (``sophia.batch_size``).
2. Captions: the student writes K = ``num_captions`` captions of each image from ``caption_prompt`` (no
   question), through the rollout engine (``rollout.engine``: HF generate or vLLM), item j with the seed
   ``prompt_seeds(seed, step, [j])``.
3. Traces: the teacher writes N = ``traces_per_caption`` traces from ``teacher_prompt_template`` filled with
   the caption and the question (its own chat template), caption c of the step with the seed
   ``prompt_seeds(seed + 1, step, [c])``.
4. Rewards: each trace gets the outcome reward R (``reward.functions``, the same verifiers as ``vold train``);
   each caption gets the mean reward of its N traces (the visual reward, propagated back):
       R(c_k) = (1/N) sum_n R(t_kn)
5. Selection (:func:`select_traces`): per item, among the finished traces with R >= ``correct_threshold``
   whose caption has R(c_k) > alpha (``caption_reward_threshold``), the shortest (ties: the first in sampling
   order); items without one are dropped (``sophia/kept`` of ``sophia/items`` is logged).
6. Update: the student learns (image, question) -> y = caption + ``response_separator`` + trace + EOS, one
   optimizer update per step on the kept items (``grad_accum`` micro-batches), with the off-policy objective
   J = E_mu[(pi_theta(y) / mu(y)) R(y)], mu = the behaviour policy, through ``fused_linear_logprobs`` on the
   student's hidden states (:func:`sophia_objective`)::

       importance_weighting = "none"    (the paper: ratio set to 1, bounded bias = reward-weighted SFT)
           loss = - sum_{i,t} R_i m_it log pi_theta(y_it) / sum_{i,t} m_it
       importance_weighting = "clipped" (truncated importance sampling, weights detached)
           loss = - sum_{i,t} min(rho_it, c) R_i m_it log pi_theta(y_it) / sum_{i,t} m_it
           rho_it = pi_theta(y_it) / mu(y_it)                          is_level = "token"
           rho_it = exp(mean_{t in i} (log pi_theta(y_it) - log mu(y_it)))   is_level = "sequence"

   mu(caption + trace) = mu_student(caption) * mu_teacher(trace): the caption's behaviour log-probs are the
   student's at sampling time (its caption prompt, ``caption_temperature``), the trace's the teacher's log-probs
   of its own tokens (its prompt, ``trace_temperature``); the separator is a fixed template (log mu = 0) and
   the final EOS takes the teacher's log-prob of ending. Both come from frozen ``fused_linear_logprobs`` passes
   (``vold.scoring.score``) before the update. pi_theta is read at temperature 1 (the policy being trained).
7. Gradient clipping, AdamW, lr schedule (``sophia.lr``...), ``rollout_engine.update_weights`` (vLLM sync);
   logs, samples and checkpoints exactly like ``vold sft``/``vold train`` (``--resume auto``).

The teacher's trace tokens are spliced into the student's target as ids when the two share one vocabulary
(``check_vocab_compatible``; needed by the clipped form); otherwise the trace's text is re-tokenized by the
student's tokenizer (ratio-1 form only). One process (no data parallelism yet); the teacher samples with HF
generate.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from vold.config import Config, SophiaConfig
from vold.data import (
    Example,
    PromptBatch,
    PromptSampler,
    build_prompt_batch,
    is_multimodal,
    load_examples,
    require_rows,
    select_rows,
    tokenizer_of,
)
from vold.distributed import prompt_seeds
from vold.models import check_model_path, check_vocab_compatible, student_from_config, teacher_from_config
from vold.rewards import RewardFunctions
from vold.rollout import Rollout, make_rollout_engine, pad_completions
from vold.rollout.hf import HFRolloutEngine
from vold.runs import StreakWarning, seed_everything
from vold.scoring import response_logprobs, score
from vold.stage import Stage, phase_timer, student_start

# ---- the math: selection and the objective -----------------------------------------------------------


def select_traces(rewards: torch.Tensor, lengths: torch.Tensor, finished: torch.Tensor, *, alpha: float,
                  correct_threshold: float = 1.0) -> tuple[torch.Tensor, list[tuple[int, int] | None]]:
    """``(caption_rewards [B, K], picks)`` from trace ``rewards``, ``lengths`` and ``finished`` ``[B, K, N]``.

    ``caption_rewards`` is the mean reward of each caption's N traces. ``picks[b]`` is ``(k, n)``: the shortest
    finished trace with ``reward >= correct_threshold`` among the captions with ``caption_reward > alpha``
    (ties: the smallest ``(k, n)``, i.e. the first in sampling order), or None when item b has none."""
    if not rewards.shape == lengths.shape == finished.shape or rewards.dim() != 3:
        raise ValueError(f"rewards, lengths and finished must all be [B, K, N], got {tuple(rewards.shape)}, "
                         f"{tuple(lengths.shape)}, {tuple(finished.shape)}")
    caption_rewards = rewards.float().mean(dim=-1)
    picks: list[tuple[int, int] | None] = []
    for b in range(rewards.shape[0]):
        best = None
        for k in range(rewards.shape[1]):
            if not caption_rewards[b, k] > alpha:
                continue
            for n in range(rewards.shape[2]):
                if bool(finished[b, k, n]) and rewards[b, k, n] >= correct_threshold:
                    if best is None or lengths[b, k, n] < lengths[b, best[0], best[1]]:
                        best = (k, n)
        picks.append(best)
    return caption_rewards, picks


def importance_weights(logp: torch.Tensor, behaviour: torch.Tensor, mask: torch.Tensor, *, level: str = "token",
                       clip: float = 1.0) -> torch.Tensor:
    """Truncated importance weights ``min(rho, c) * m`` ``[B, T]``, detached (no gradient flows through them).

    ``level="token"``: ``rho_t = exp(log pi_t - log mu_t)``; ``"sequence"``: one ratio per row, the geometric
    mean ``exp(mean_t (log pi_t - log mu_t))`` (GSPO's length-normalised ratio; the plain product over
    thousands of tokens under- or overflows)."""
    if level not in ("token", "sequence"):
        raise ValueError(f"level={level!r} is not one of ('token', 'sequence')")
    mask = mask.to(logp.dtype)
    log_ratio = (logp.detach() - behaviour.to(logp.dtype)) * mask
    if level == "sequence":
        log_ratio = (log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).expand_as(logp)
    return torch.exp(log_ratio.clamp(max=math.log(clip))) * mask


def sophia_objective(logp: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, *, normalizer: float,
                     behaviour: torch.Tensor | None = None, level: str = "token",
                     clip: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``- sum_{i,t} w_it R_i m_it log pi(y_it) / normalizer`` from the response log-probs ``logp [B, T]``
    (with grad), ``mask [B, T]`` and per-sequence ``rewards [B]``; ``w = 1`` without ``behaviour`` (ratio 1),
    else :func:`importance_weights` of ``behaviour = log mu [B, T]``. Metrics (detached sums, for the step's
    token-weighted means): ``nll_sum`` and ``is_weight_sum`` over the micro-batch's tokens."""
    mask = mask.to(logp.dtype)
    weights = rewards.to(logp)[:, None] * mask
    metrics = {"nll_sum": -(logp.detach() * mask).sum()}
    if behaviour is not None:
        is_weights = importance_weights(logp, behaviour, mask, level=level, clip=clip)
        weights = weights * is_weights
        metrics["is_weight_sum"] = is_weights.sum()
    return -(weights * logp).sum() / normalizer, metrics


def sophia_loss(model: torch.nn.Module, batch: dict[str, Any], *, normalizer: float, sc: SophiaConfig,
                autocast_dtype: str | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one micro-batch (``prompt_inputs``, ``ids``, ``mask``, ``rewards``, ``behaviour``):
    the student's response log-probs (``vold.scoring.response_logprobs``: fused, no [N, V] logits) into
    :func:`sophia_objective`."""
    logp, mask = response_logprobs(model, batch, autocast_dtype=autocast_dtype)
    behaviour = batch.get("behaviour") if sc.importance_weighting == "clipped" else None
    return sophia_objective(logp, mask, batch["rewards"].to(logp.device), normalizer=normalizer,
                            behaviour=None if behaviour is None else behaviour.to(logp.device),
                            level=sc.is_level, clip=sc.is_clip)


# ---- one sampling round ---------------------------------------------------------------------------


@dataclass
class Round:
    """What one step sampled: B items, B*K captions (item-major), B*K*N traces (caption-major)."""

    examples: list[Example]
    captions: PromptBatch  # the student's caption prompts (with the images), one row per item
    caption_rollout: Rollout  # [B*K]
    teacher_prompts: PromptBatch  # the teacher's prompts, one row per caption
    trace_rollout: Rollout  # [B*K*N]
    rewards: torch.Tensor  # [B, K, N]
    caption_rewards: torch.Tensor  # [B, K]
    picks: list[tuple[int, int] | None]


def caption_text(rollout: Rollout, row: int) -> str:
    return rollout.texts[row].strip()


def teacher_prompt(template: str, caption: str, question: str) -> str:
    """The teacher's user message (``str.replace``: captions and questions may contain braces)."""
    return template.replace("{caption}", caption).replace("{question}", question)


def sample_round(step: int, examples: list[Example], cfg: Config, *, processor: Any, teacher_tokenizer: Any,
                 caption_engine: Any, trace_engine: HFRolloutEngine, rewards: RewardFunctions,
                 timings: dict[str, float] | None = None, device: torch.device | None = None) -> Round:
    """Steps 2-5: captions (student), traces (teacher), rewards, selection."""
    sc, data = cfg.sophia, cfg.data
    K, N, B = sc.num_captions, sc.traces_per_caption, len(examples)
    views = [replace(e, prompt=sc.caption_prompt) for e in examples]  # the image, no question
    with phase_timer(timings, "captions", device):
        captions = build_prompt_batch(views, processor, system_prompt=data.system_prompt)
        caption_rollout = caption_engine.generate(
            captions, K, sc.caption_max_new_tokens, temperature=sc.caption_temperature, top_p=sc.caption_top_p,
            seed=prompt_seeds(cfg.seed, step, range(B)))
    teacher_examples = [Example(prompt=teacher_prompt(sc.teacher_prompt_template, caption_text(caption_rollout, c),
                                                      examples[c // K].prompt),
                                answer=examples[c // K].answer, where=examples[c // K].where)
                        for c in range(B * K)]
    system = data.teacher_system_prompt if data.teacher_system_prompt is not None else data.system_prompt
    with phase_timer(timings, "traces", device):
        teacher_prompts = build_prompt_batch(teacher_examples, teacher_tokenizer, system_prompt=system)
        trace_rollout = trace_engine.generate(
            teacher_prompts, N, sc.trace_max_new_tokens, temperature=sc.trace_temperature, top_p=sc.trace_top_p,
            seed=prompt_seeds(cfg.seed + 1, step, range(B * K)))
    with phase_timer(timings, "reward", device):
        questions = [e.prompt for e in examples for _ in range(K * N)]
        total, _ = rewards(questions, trace_rollout.texts, **captions.reward_columns(repeat=K * N))
        lengths = trace_rollout.lengths - trace_rollout.finished.long()  # EOS excluded
        caption_rewards, picks = select_traces(total.view(B, K, N), lengths.view(B, K, N),
                                               trace_rollout.finished.view(B, K, N),
                                               alpha=sc.caption_reward_threshold,
                                               correct_threshold=sc.correct_threshold)
    return Round(examples, captions, caption_rollout, teacher_prompts, trace_rollout, total.view(B, K, N),
                 caption_rewards, picks)


def _tokens(rollout: Rollout, row: int, *, strip_eos: bool) -> list[int]:
    """Row ``row``'s sampled token ids (its EOS dropped when ``strip_eos`` and the row finished)."""
    ids = rollout.completion_ids[row][rollout.completion_mask[row].bool()].tolist()
    return ids[:-1] if strip_eos and bool(rollout.finished[row]) else ids


def build_update(rnd: Round, cfg: Config, *, processor: Any, shared_vocab: bool, student: torch.nn.Module,
                 teacher: torch.nn.Module | None, vocab_size: int | None) -> dict[str, Any] | None:
    """Step 6's batch for the kept items: ``prompt_inputs`` (image + question, left-padded), ``ids``/``mask``
    ``[b, T]`` (caption + separator + trace + EOS, right-padded, cut to ``max_length``), ``rewards [b]`` and,
    for the clipped form, ``behaviour [b, T]`` (log mu); None when no item was kept."""
    sc = cfg.sophia
    K, N = sc.num_captions, sc.traces_per_caption
    kept = [(i, pick) for i, pick in enumerate(rnd.picks) if pick is not None]
    if not kept:
        return None
    tokenizer = tokenizer_of(processor)
    separator = tokenizer(sc.response_separator, add_special_tokens=False)["input_ids"] if sc.response_separator else []
    caption_rows = [i * K + k for i, (k, _) in kept]
    trace_rows = [(i * K + k) * N + n for i, (k, n) in kept]
    behaviour_caption = behaviour_trace = None
    if sc.importance_weighting == "clipped":  # mu: frozen passes of the two behaviour policies, before the update
        micro = max(1, -(-len(kept) // sc.grad_accum))
        cap, trc = rnd.caption_rollout, rnd.trace_rollout
        caption_prompts = select_rows(rnd.captions.student_inputs, rnd.captions.num_images, [i for i, _ in kept])
        behaviour_caption = score(student, caption_prompts, [rnd.captions.num_images[i] for i, _ in kept],
                                  cap.completion_ids[caption_rows], cap.completion_mask[caption_rows],
                                  micro_size=micro, vocab_size=vocab_size, temperature=sc.caption_temperature,
                                  autocast_dtype=cfg.model.autocast)
        teacher_rows = [i * K + k for i, (k, _) in kept]
        teacher_prompts = select_rows(rnd.teacher_prompts.student_inputs, [0] * len(rnd.teacher_prompts), teacher_rows)
        behaviour_trace = score(teacher, teacher_prompts, [0] * len(kept), trc.completion_ids[trace_rows],
                                trc.completion_mask[trace_rows], micro_size=micro, vocab_size=vocab_size,
                                temperature=sc.trace_temperature)
    prompts = build_prompt_batch([rnd.examples[i] for i, _ in kept], processor,
                                 system_prompt=cfg.data.system_prompt).student_inputs
    room = (sc.max_length - prompts["attention_mask"].sum(dim=1)).clamp(min=0).tolist()
    responses, behaviours, cut = [], [], 0
    for j, (caption_row, trace_row) in enumerate(zip(caption_rows, trace_rows, strict=True)):
        caption = _tokens(rnd.caption_rollout, caption_row, strip_eos=True)
        if shared_vocab:
            trace = _tokens(rnd.trace_rollout, trace_row, strip_eos=True)
        else:
            trace = tokenizer(rnd.trace_rollout.texts[trace_row], add_special_tokens=False)["input_ids"]
        response = caption + separator + trace + [tokenizer.eos_token_id]
        cut += len(response) > room[j]
        responses.append(response[:room[j]])
        if behaviour_caption is not None:
            # the caption's log mu, 0 for the fixed separator, the teacher's for its trace and for ending it
            length = int(rnd.trace_rollout.completion_mask[trace_row].sum())
            behaviour = (behaviour_caption[j, :len(caption)].tolist() + [0.0] * len(separator)
                         + behaviour_trace[j, :length].tolist())
            behaviours.append(behaviour[:room[j]])
    ids = pad_completions(responses, tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                          else tokenizer.eos_token_id)
    mask = torch.zeros_like(ids)
    for j, response in enumerate(responses):
        mask[j, :len(response)] = 1
    batch: dict[str, Any] = {"prompt_inputs": prompts, "num_images": [len(rnd.examples[i].images) for i, _ in kept],
                             "ids": ids, "mask": mask, "truncated": cut,
                             "rewards": torch.stack([rnd.rewards[i, k, n] for i, (k, n) in kept]).float()}
    if behaviours:
        behaviour = torch.zeros(ids.shape, dtype=torch.float32)
        for j, values in enumerate(behaviours):
            behaviour[j, :len(values)] = torch.tensor(values, dtype=torch.float32)
        batch["behaviour"] = behaviour
    return batch


def micro_batches(batch: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    """Split the update batch into at most ``parts`` micro-batches (rows in order; no empty ones)."""
    out = []
    for rows in torch.arange(batch["ids"].shape[0]).tensor_split(parts):
        if len(rows):
            rows = rows.tolist()
            part = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
                    if k not in ("prompt_inputs", "num_images", "truncated")}
            part["prompt_inputs"] = select_rows(batch["prompt_inputs"], batch["num_images"], rows)
            out.append(part)
    return out


def round_metrics(rnd: Round, sc: SophiaConfig) -> dict[str, float]:
    kept = [p for p in rnd.picks if p is not None]
    trace_lengths = rnd.trace_rollout.lengths.float()
    metrics = {
        "sophia/items": len(rnd.picks), "sophia/kept": len(kept), "caption/reward_mean": rnd.caption_rewards.mean(),
        "caption/above_threshold": (rnd.caption_rewards > sc.caption_reward_threshold).float().mean(),
        "caption/mean_length": rnd.caption_rollout.lengths.float().mean(), "trace/reward_mean": rnd.rewards.mean(),
        "trace/correct": (rnd.rewards >= sc.correct_threshold).float().mean(),
        "trace/mean_length": trace_lengths.mean(), "trace/finished": rnd.trace_rollout.finished.float().mean(),
    }
    return {k: float(v) for k, v in metrics.items()}


def round_samples(rnd: Round, sc: SophiaConfig, limit: int) -> list[dict[str, Any]]:
    """The kept items of the round (up to ``limit``): question, caption, trace and their rewards."""
    K, N = sc.num_captions, sc.traces_per_caption
    out = []
    for i, pick in enumerate(rnd.picks):
        if pick is not None and len(out) < limit:
            k, n = pick
            out.append({"prompt": rnd.examples[i].prompt, "answer": rnd.examples[i].answer,
                        "caption": rnd.caption_rollout.texts[i * K + k],
                        "trace": rnd.trace_rollout.texts[(i * K + k) * N + n], "reward": float(rnd.rewards[i, k, n]),
                        "caption_reward": float(rnd.caption_rewards[i, k]), "caption_index": k, "trace_index": n})
    return out


# ---- the trainer ----------------------------------------------------------------------------------


def update_student(stage: Stage, batch: dict[str, Any] | None, sc: SophiaConfig, *,
           autocast_dtype: str | None) -> dict[str, float]:
    """Step 6: one optimizer update on the kept items' batch (``grad_accum`` micro-batches of
    :func:`sophia_loss`; nothing kept: no gradient, no update); returns ``loss``, ``nll``, ``lr``, ``grad_norm``,
    ``tokens``, ``truncated`` (and ``is_weight`` with the clipped form)."""
    rt = stage.runtime
    total, sums = 0.0, {"nll_sum": 0.0, "is_weight_sum": 0.0}
    tokens = int(batch["mask"].sum()) if batch is not None else 0
    parts = micro_batches(batch, sc.grad_accum) if batch is not None else []
    for index, part in enumerate(parts):
        with rt.accumulate(last=index == len(parts) - 1):
            loss, parts_metrics = rt.forward(sophia_loss, part, normalizer=max(tokens, 1), sc=sc,
                                             autocast_dtype=autocast_dtype)
            rt.backward(loss)
        total += float(loss.detach())
        for key, value in parts_metrics.items():
            sums[key] += float(value)
    lr = stage.scheduler.get_last_lr()[0]
    grad_norm = rt.step(stage.optimizer, stage.scheduler, stage.cfg.optim.max_grad_norm)
    metrics = {"loss": total, "nll": sums["nll_sum"] / max(tokens, 1), "lr": lr, "grad_norm": grad_norm,
               "tokens": tokens, "truncated": batch["truncated"] if batch is not None else 0}
    if sc.importance_weighting == "clipped":
        metrics["is_weight"] = sums["is_weight_sum"] / max(tokens, 1)
    return metrics


def train_sophia(cfg: Config) -> Path:
    """Run SOPHIA; returns the folder of the final model (``{output_dir}/sophia/final``)."""
    sc, mc, data = cfg.sophia, cfg.model, cfg.data
    stage = Stage(cfg, "sophia", "sophia", max_steps=sc.max_steps)
    if stage.runtime.distributed:
        raise ValueError("vold sophia runs in one process (no data parallelism yet): launch it without torchrun")
    # every check on the user's input comes before the run folder is written (Stage.open)
    if not data.train_files:
        raise ValueError("no training items: set data.train_files (rows with an image, a question and an answer)")
    examples = load_examples(data.train_files, image_root=data.image_root, check_images=data.check_images,
                             prompt_column=data.prompt_column, answer_column=data.answer_column)
    require_rows(examples, data.train_files, sc.batch_size, f"sophia.batch_size={sc.batch_size} (items per step)")
    if not all(e.images for e in examples):
        where = next(e.where for e in examples if not e.images)
        raise ValueError(f"{where}: vold sophia needs an image in every row (the student captions it)")
    sampler = PromptSampler(len(examples), sc.batch_size, seed=cfg.seed, shuffle=data.shuffle)
    rewards = RewardFunctions(cfg.reward.functions, cfg.reward.weights)
    start_path = student_start(cfg)
    if stage.prepare() is None:
        check_model_path(start_path, "sft.enabled -> sft/final" if cfg.sft.enabled else "model.student",
                         local_files_only=mc.local_files_only)
    check_model_path(mc.teacher, "model.teacher", local_files_only=mc.local_files_only)
    seed_everything(cfg.seed)  # here, as always; the run folder is written once the models passed their checks

    device = stage.device
    student, processor = student_from_config(mc, device, path=stage.model_path(start_path))
    if not is_multimodal(processor):
        raise ValueError("vold sophia needs a vision-language student (model.student has no image processor)")
    teacher, teacher_tokenizer = teacher_from_config(mc, device)
    try:
        vocab_size, shared_vocab = check_vocab_compatible(student, teacher, mc.vocab_size, tokenizer_of(processor),
                                                          teacher_tokenizer), True
    except ValueError as error:
        if sc.importance_weighting == "clipped":
            raise ValueError(f"sophia.importance_weighting='clipped' needs the teacher's behaviour log-probs of the "
                             f"student's target tokens, so one vocabulary: {error}") from error
        vocab_size, shared_vocab = mc.vocab_size, False
    stage.open(student, processor, sampler, section=sc, updates=sc.max_steps, start_from=start_path,
               examples=len(examples), files=data.train_files, extra={"teacher": mc.teacher})
    caption_engine = make_rollout_engine(cfg.rollout, student, processor, model_path=start_path,
                                         dtype=mc.autocast or mc.dtype, seed=cfg.seed, vocab_size=vocab_size)
    caption_engine.update_weights(student)
    trace_engine = HFRolloutEngine(teacher, teacher_tokenizer, vocab_size=vocab_size if shared_vocab else None)

    nothing_kept = StreakWarning(min(10, sc.max_steps), lambda n: (
        f"sophia: no item has been kept for {n} steps (sophia/kept = 0), so nothing is trained: a caption counts "
        f"when its mean trace reward is > sophia.caption_reward_threshold ({sc.caption_reward_threshold}) and a trace "
        f"is correct when its reward is >= sophia.correct_threshold ({sc.correct_threshold}); check both against the "
        f"scale of reward.functions ({', '.join(cfg.reward.functions)}) and the answers"))
    no_tokens = StreakWarning(min(10, sc.max_steps), lambda n: (
        f"sophia: items were kept but no target token fit in {n} steps (train/tokens = 0), so nothing is trained: "
        f"the prompts fill sophia.max_length={sc.max_length}; raise sophia.max_length"))
    student.train()
    while stage.step < sc.max_steps:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        items = [examples[i] for i in sampler.next_indices()]
        rnd = sample_round(stage.step, items, cfg, processor=processor, teacher_tokenizer=teacher_tokenizer,
                           caption_engine=caption_engine, trace_engine=trace_engine, rewards=rewards,
                           timings=timings, device=device)
        metrics: dict[str, Any] = round_metrics(rnd, sc)
        with phase_timer(timings, "behaviour", device):
            batch = build_update(rnd, cfg, processor=processor, shared_vocab=shared_vocab, student=student,
                                 teacher=teacher, vocab_size=vocab_size)
        with phase_timer(timings, "update_actor", device):
            metrics.update(update_student(stage, batch, sc, autocast_dtype=mc.autocast))
        with phase_timer(timings, "update_weights", device):
            caption_engine.update_weights(student)
        metrics.update({"time/step": time.perf_counter() - t0, **{f"time/{k}": v for k, v in timings.items()}})
        samples = [{"step": stage.step + 1, **s} for s in round_samples(rnd, sc, cfg.logging.num_completions)]
        stage.end_step(metrics, samples=samples,
                       postfix={"kept": f"{metrics['sophia/kept']:.0f}/{len(items)}", "loss": f"{metrics['loss']:.4f}"})
        nothing_kept.update(metrics["sophia/kept"] == 0)
        no_tokens.update(metrics["sophia/kept"] > 0 and metrics["tokens"] == 0)
    return stage.close()
