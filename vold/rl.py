"""Stage 2, ``vold train``: GRPO on the student's rollouts + beta * reverse KL(student || teacher).

One training step (defaults reproduce the paper: G = 5, eps 0.2/0.3, lr 6e-6, beta 0.1 with k2, w = 1 - r,
no reference KL):

1. B prompts from the sampler; G = ``rollout.num_generations`` completions each from the student
   (``rollout.engine``: HF generate by default, or vLLM); prompt j of the step's batch samples with its own
   seed ``prompt_seeds(seed, step, j)``. Data parallel (``torchrun``, ``vold.distributed``): B is global,
   rank r samples prompts r, r + W, ... and the update is the one of a single process on all B prompts.
2. Rewards ``r_i = sum_f w_f r_f`` (``reward.functions``) and group-normalised advantages
       A_i = (r_i - mean_g r) / (std_g r + 1e-4)     loss.scale_rewards = "group"
       A_i =  r_i - mean_g r                         loss.scale_rewards = "none"   (Dr. GRPO)
   A group whose rewards are all equal gets A = 0 (it moves the policy only through the KL term).
3. Distillation weights ``w_i = 1 - r^acc_i`` (``loss.distill_on_wrong_only``; the paper distils on
   wrong rollouts only), ``r^acc`` from ``loss.distill_mask_reward``, which must lie in [0, 1]: a
   partial-credit reward gives a partial weight (distil more the more wrong); a reward function
   that returned None for a row (no verdict) gives w = 1. Without the switch w = 1.
4. The teacher scores the SAME completion token ids after ITS OWN text prompt (``teacher_prompt``
   or the prompt; the student's may carry images), under ``torch.no_grad``: ``"full"`` keeps its
   hidden states (the exact reverse KL over the vocabulary is computed in the loss), k1/k2/k3 its
   log-probs ``log q(y_t)`` of the sampled tokens (``fused_linear_logprobs``).
5. Old-policy log-probs ``log pi_old(y_t)`` (no grad) only when a rollout batch feeds more than one
   optimizer update (``ppo_epochs * minibatches > 1``). With a single update pi_old = pi_theta, so
   ``old_logprobs=None``: vold_loss then uses ``logp.detach()`` (ratio 1, gradient of logp), which
   saves a forward pass and gives the same gradient.
6. ``ppo_epochs`` passes over ``minibatches`` shuffled minibatches, each split into ``grad_accum``
   micro-batches; per micro-batch :func:`compute_loss` (``vold_loss``)::

       loss = sum_t n_t [ -min(rho_t A_i, clip(rho_t, 1 - 0.2, 1 + 0.3) A_i) + beta w_i D_t ]
       D_t  = (log pi(y_t) - log q(y_t))^2 / 2   (k2; "full": KL(pi(.|s_t) || q(.|s_t)) exactly)

   ``dapo`` and ``bnpo`` normalise by the token count of the whole minibatch (``token_normalizer``), so
   their micro-batch split changes nothing (TRL's bnpo divides each micro-batch by its own count instead;
   in vold's trainer bnpo and dapo therefore give the same update); grpo and dr_grpo weight each
   micro-batch by its share of the minibatch's sequences (exact: their n_t are per sequence).
   ``loss.mask_truncated_completions`` (DAPO's overlong filtering, TRL's name): completions that hit
   ``rollout.max_new_tokens`` without EOS get mask 0 in the loss and leave both counts; they still shape
   their group's advantages and count in the rollout metrics (not in the loss metrics: kl, clip fractions).
7. Gradient clipping, AdamW, lr schedule, then ``rollout_engine.update_weights(student)`` (the vLLM sync).

All log-probs use the sampling temperature (``softmax(logits / T)``), the teacher's too. The trainer
never builds ``[N, V]`` logits: models return hidden states, the kernels take the lm_head weights.

Phase timings: :func:`rollout_step`, :func:`add_scores` and :func:`optimize` take ``timings=`` (a dict)
and add the wall seconds of each phase they run to it (:data:`PHASES`, verl's ``timing_s/*`` names;
CUDA is synchronised around each phase); :func:`train_rl` logs them as ``time/<phase>`` beside
``time/step`` (``python -m benchmarks.step`` reads them).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vold.config import Config, LossConfig
from vold.data import (
    PromptBatch,
    PromptSampler,
    build_prompt_batch,
    is_multimodal,
    load_examples,
    require_rows,
    select_rows,
)
from vold.data import tokenizer_of as tokenizer_of_processor
from vold.distributed import Runtime, prompt_seeds
from vold.kernels import vold_loss
from vold.models import (
    autocast,
    check_model_path,
    check_vocab_compatible,
    completion_hidden_states,
    head_for_loss,
    lm_head_bias,
    lm_head_weight,
    load_student,
    logit_options,
    student_from_config,
    teacher_from_config,
)
from vold.packing import pack, packed_completion_hidden_states
from vold.rewards import RewardFunctions, group_advantages
from vold.rollout import RolloutEngine, make_rollout_engine
from vold.runs import StreakWarning, distill_metric, seed_everything
from vold.scoring import score
from vold.stage import Stage, phase_timer, student_start

# the phases of one training step, in order (the keys of a ``timings`` dict; logged as ``time/<phase>``)
PHASES = {
    "prompts": "prompt batch: chat template, tokenizer, image processor (train_rl)",
    "gen": "generation: the rollout engine samples G completions per prompt (rollout_step)",
    "reward": "reward functions, group advantages, distillation weights (rollout_step)",
    "teacher": "teacher forward over the completions, no grad, incl. offload moves (add_scores)",
    "old_log_prob": "old-policy log-probs, only when ppo_epochs * minibatches > 1 (add_scores)",
    "ref": "reference-policy log-probs, only when loss.ref_kl_coef != 0 (add_scores)",
    "update_actor": "policy update: forward + backward of every micro-batch, clipping, AdamW (optimize)",
    "update_weights": "rollout_engine.update_weights after each update: the vLLM weight sync (optimize)",
}


@dataclass
class Experience:
    """One rollout batch of N = B * G rows (prompt-major): everything the loss needs. The per-token tensors
    live on the training device; the prompts (pixels included) and the teacher's hidden states, which
    can take gigabytes, on the CPU: they move to the device one micro-batch at a time."""

    prompt_inputs: dict[str, torch.Tensor]  # the student's prompts, one row per completion (left-padded, images)
    num_images: list[int]  # images of each row (to slice pixel_values)
    completion_ids: torch.Tensor  # [N, T]
    completion_mask: torch.Tensor  # [N, T]
    advantages: torch.Tensor  # [N]
    distill_mask: torch.Tensor  # [N], w_i
    old_logprobs: torch.Tensor | None = None  # [N, T]; None: on-policy (one update per rollout batch)
    ref_logprobs: torch.Tensor | None = None  # [N, T]; only with loss.ref_kl_coef != 0
    teacher_logprobs: torch.Tensor | None = None  # [N, T], log q(y_t): k1/k2/k3
    teacher_hidden: torch.Tensor | None = None  # [N, T, Ht]: "full" (CPU)
    # [N] 1/0: 0 leaves row i out of the loss and its normalisation (loss.mask_truncated_completions); None: all in
    loss_rows: torch.Tensor | None = None

    def loss_mask(self) -> torch.Tensor:
        """``completion_mask`` with the rows left out of the loss (``loss_rows == 0``) zeroed ``[N, T]``."""
        if self.loss_rows is None:
            return self.completion_mask
        return self.completion_mask * self.loss_rows.to(self.completion_mask)[:, None]

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def select(self, rows: list[int]) -> Experience:
        """The rows ``rows`` (a minibatch or a micro-batch)."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.completion_ids.device)
        picked = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in picked.items():
            if isinstance(value, torch.Tensor):
                picked[name] = value.index_select(0, index.to(value.device))
        picked["prompt_inputs"] = select_rows(self.prompt_inputs, self.num_images, rows)
        picked["num_images"] = [self.num_images[i] for i in rows]
        return Experience(**picked)


def compute_loss(student: torch.nn.Module, exp: Experience, lc: LossConfig, *,
                 teacher_head: tuple[torch.Tensor, torch.Tensor | None] | None = None, vocab_size: int | None = None,
                 temperature: float = 1.0, max_completion_length: int | None = None,
                 token_normalizer: float | None = None, autocast_dtype: str | None = None,
                 packing: bool = False, teacher_logits: dict[str, float] | None = None,
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The trainer's loss on one micro-batch: the student's hidden states (with grad) -> ``vold_loss``.

    ``teacher_head`` is the teacher's ``(lm_head weight, bias)``, needed by ``distill_estimator="full"``
    with ``exp.teacher_hidden``, and ``teacher_logits`` its logit transform (``logit_options(teacher,
    "teacher_")``); k1/k2/k3 read ``exp.teacher_logprobs``. The student's logit transform (Cohere's
    ``logit_scale``, Gemma-2's ``final_logit_softcapping``) comes from its config. ``packing``: one packed row of
    real tokens (``vold.packing``) and the loss in its packed layout (``cu_seqlens``): no padding anywhere.
    """
    ids, mask = exp.completion_ids, exp.completion_mask
    prompts = {k: v.to(ids.device) for k, v in exp.prompt_inputs.items()}
    select = cu_seqlens = None
    loss_mask = exp.loss_mask()  # the hidden states still cover every row (packing needs the real tokens)
    with autocast(ids.device, autocast_dtype):
        if packing:
            hidden, cu_seqlens, select = packed_completion_hidden_states(student, prompts, ids, mask)
        else:
            hidden = completion_hidden_states(student, prompts, ids, mask)
    tokens = (lambda x: x) if select is None else (lambda x: pack(x, select))  # [N, T, ...] -> [n, ...] packed
    hidden, weight, bias = head_for_loss(student, hidden, autocast_dtype)
    teacher: dict[str, Any] = {}
    if lc.distill_coef != 0.0 and lc.distill_estimator == "full":
        if exp.teacher_hidden is None or teacher_head is None:
            raise ValueError("distill_estimator='full' needs the teacher's hidden states and head")
        teacher = {"teacher_hidden": tokens(exp.teacher_hidden).to(ids.device), "teacher_weight": teacher_head[0],
                   "teacher_bias": teacher_head[1], **(teacher_logits or {})}
    elif lc.distill_coef != 0.0:
        teacher = {"teacher_logprobs": tokens(exp.teacher_logprobs)}
    return vold_loss(
        hidden, weight, tokens(ids), exp.advantages, tokens(exp.old_logprobs), tokens(loss_mask), student_bias=bias,
        ref_logprobs=tokens(exp.ref_logprobs), distill_mask=exp.distill_mask, temperature=temperature,
        max_completion_length=max_completion_length, token_normalizer=token_normalizer, vocab_size=vocab_size,
        cu_seqlens=cu_seqlens, **teacher, **logit_options(student, "student_"), **lc.kernel_options(),
    )


def distill_weights(per_function: dict[str, torch.Tensor], lc: LossConfig) -> torch.Tensor:
    """``w_i = 1 - r_i`` from the reward ``lc.distill_mask_reward`` (in [0, 1]; None -> w = 1), or all ones."""
    n = next(iter(per_function.values())).shape[0]
    if not lc.distill_on_wrong_only:
        return torch.ones(n)
    reward = per_function.get(lc.distill_mask_reward)
    if reward is None:
        raise ValueError(f"loss.distill_mask_reward={lc.distill_mask_reward!r} is not one of the reward "
                         f"functions {sorted(per_function)}: add it to reward.functions")
    reward = torch.nan_to_num(reward, nan=0.0)
    if bool(((reward < 0) | (reward > 1)).any()):
        raise ValueError(f"reward {lc.distill_mask_reward!r} gave values outside [0, 1] "
                         f"({reward.min().item():g} .. {reward.max().item():g}): the distillation mask 1 - r needs "
                         f"a correctness reward in [0, 1] (or set loss.distill_on_wrong_only=false)")
    return 1.0 - reward


def rollout_step(step: int, batch: PromptBatch, engine: RolloutEngine, rewards: RewardFunctions, cfg: Config, *,
                 device: torch.device, timings: dict[str, float] | None = None, positions: list[int] | None = None,
                 runtime: Runtime | None = None) -> tuple[Experience, dict[str, float], list[dict[str, Any]]]:
    """Sample G completions per prompt, reward them, make advantages and distillation weights
    (``timings``: adds the ``gen`` and ``reward`` seconds).

    Prompt j of the global batch samples with seed ``prompt_seeds(seed, step, [j])`` (``positions``: the
    global positions of ``batch``'s prompts, default 0..B-1), so its completions do not depend on the
    rank that samples it; the metrics are computed over every rank's rollouts (``runtime``)."""
    rc, G = cfg.rollout, cfg.rollout.num_generations
    rt = runtime or Runtime.single()
    seeds = (prompt_seeds(cfg.seed, step, range(len(batch)) if positions is None else positions)
             if rc.seed_per_prompt else cfg.seed + step)
    with phase_timer(timings, "gen", device), autocast(device, cfg.model.autocast):
        rollout = engine.generate(batch, G, rc.max_new_tokens, temperature=rc.temperature, top_p=rc.top_p,
                                  seed=seeds)
    prompts = [p for p in batch.prompts for _ in range(G)]
    with phase_timer(timings, "reward", device):
        ids = [row[m.bool()].tolist() for row, m in zip(rollout.completion_ids, rollout.completion_mask, strict=True)]
        total, per_function = rewards(prompts, rollout.texts, completion_ids=ids, **batch.reward_columns(G))
        advantages = group_advantages(total, G, scale=cfg.loss.scale_rewards)
        weights = distill_weights(per_function, cfg.loss)
    rows = [i for i in range(len(batch)) for _ in range(G)]
    exp = Experience(
        prompt_inputs=select_rows(batch.student_inputs, batch.num_images, rows),
        num_images=[batch.num_images[i] for i in rows], completion_ids=rollout.completion_ids.to(device),
        completion_mask=rollout.completion_mask.to(device), advantages=advantages.to(device),
        distill_mask=weights.to(device),
        # DAPO's overlong filtering: a truncated completion (no EOS within max_new_tokens) leaves the loss
        loss_rows=rollout.finished.float().to(device) if cfg.loss.mask_truncated_completions else None,
    )
    lengths = rollout.lengths.float()
    prompt_mask = exp.prompt_inputs.get("attention_mask", torch.ones_like(exp.prompt_inputs["input_ids"]))
    # over all ranks' rollouts (each rank's rows are whole groups of G, so the groups survive the gather)
    all_total, all_lengths, all_finished, all_weights = (rt.gather(x) for x in (total, lengths, rollout.finished,
                                                                                  weights))
    grouped = all_total.view(-1, G)
    metrics = {
        "reward/mean": all_total.mean(), "reward/std": all_total.std() if len(all_total) > 1 else 0.0,
        **{f"reward/{name}": torch.nanmean(rt.gather(values)) for name, values in per_function.items()},
        "reward/frac_zero_std_groups": (grouped.amax(1) == grouped.amin(1)).float().mean(),
        "completion/mean_length": all_lengths.mean(), "completion/max_length": all_lengths.max(),
        "completion/tokens": all_lengths.sum(), "prompt/tokens": rt.sum([prompt_mask.sum()])[0],
        "completion/truncated_frac": 1.0 - all_finished.float().mean(),
        "distill/weight_mean": all_weights.mean(),
    }
    samples = [{"step": step + 1, "prompt": prompts[i], "completion": rollout.texts[i],
                "answer": batch.examples[i // G].answer, "reward": float(total[i]),
                "advantage": float(advantages[i]), "distill_weight": float(weights[i]),
                "length": int(lengths[i]), "finished": bool(rollout.finished[i])}
               for i in range(min(cfg.logging.num_completions, len(rollout)))]
    return exp, metrics, samples


def add_scores(exp: Experience, batch: PromptBatch, cfg: Config, *, student: torch.nn.Module,
               teacher: torch.nn.Module | None, reference: torch.nn.Module | None, vocab_size: int | None,
               device: torch.device, timings: dict[str, float] | None = None) -> None:
    """Fill ``exp`` with what the frozen passes give (no grad): the teacher's log-probs (k1/k2/k3) or hidden
    states ("full") under its own prompts, the reference's log-probs (ref KL only) and the old policy's
    log-probs (only when the batch feeds several updates; else on-policy: ``old_logprobs=None``).
    ``timings``: adds the ``teacher``, ``ref`` and ``old_log_prob`` seconds of the passes that ran."""
    oc, mc, lc = cfg.optim, cfg.model, cfg.loss
    n, ids, mask, temperature = len(exp), exp.completion_ids, exp.completion_mask, cfg.rollout.temperature
    micro = -(-n // (oc.minibatches * oc.grad_accum))  # the training micro-batch size
    if teacher is not None:
        with phase_timer(timings, "teacher", device):
            if mc.teacher_offload:
                teacher.to(device)
            rows = [i for i in range(len(batch)) for _ in range(cfg.rollout.num_generations)]
            prompts = select_rows(batch.teacher_inputs, [0] * len(batch), rows)
            full = lc.distill_estimator == "full"
            scored = score(teacher, prompts, [0] * n, ids, mask, micro_size=micro, vocab_size=vocab_size,
                           temperature=temperature, keep_hidden=full, packing=oc.packing)
            if full:
                exp.teacher_hidden = scored
            else:
                exp.teacher_logprobs = scored
            if mc.teacher_offload:
                teacher.to("cpu")
    policies = [("ref_logprobs", reference, "ref")]
    if oc.ppo_epochs * oc.minibatches > 1:
        policies.append(("old_logprobs", student, "old_log_prob"))
    for name, model, phase in policies:
        if model is not None:
            with phase_timer(timings, phase, device):
                setattr(exp, name, score(model, exp.prompt_inputs, exp.num_images, ids, mask, micro_size=micro,
                                         vocab_size=vocab_size, temperature=temperature, autocast_dtype=mc.autocast,
                                         packing=oc.packing))


@dataclass
class LossScale:
    """How the micro-batch losses of one minibatch are normalised, so that their gradients add up to the
    minibatch's loss over all ranks. The gradients are averaged over the W ranks, so every rank's loss is scaled
    by W over the *global* counts (rows left out by ``loss.mask_truncated_completions`` count in neither):

    - dapo/bnpo: ``vold_loss`` divides by ``token_normalizer`` = minibatch tokens / W and ``scale`` is 1, so the
      micro-batch split changes nothing;
    - grpo/dr_grpo: each micro-batch's loss is weighted by ``scale = len(micro) * W / minibatch rows`` (exact:
      their per-token weights are per sequence)."""

    token_normalizer: float | None  # dapo/bnpo; None: grpo/dr_grpo
    rows: float  # the minibatch's rows in the loss, over all ranks
    world: int

    @classmethod
    def of(cls, exp: Experience, minibatch: torch.Tensor, loss_type: str, rt: Runtime) -> LossScale:
        rows = minibatch.to(exp.completion_mask.device)
        kept = len(minibatch) if exp.loss_rows is None else float(exp.loss_rows[rows].sum())
        tokens, kept = rt.sum([float(exp.loss_mask()[rows].sum()), kept])
        by_tokens = loss_type in ("dapo", "bnpo")
        return cls(max(tokens, 1.0) / rt.world_size if by_tokens else None, kept, rt.world_size)

    def scale(self, micro_rows: int) -> float:
        """The factor on the loss of a micro-batch of ``micro_rows`` rows."""
        return 1.0 if self.token_normalizer is not None else micro_rows * self.world / max(self.rows, 1.0)


class UpdateMetrics:
    """The loss metrics of one training step's updates: ``loss`` and ``policy_loss`` as the sums of the
    micro-batches' scaled losses (one total per update, then the mean over updates and ranks), every other
    ``vold_loss`` metric token-weighted over the micro-batches of all updates and ranks; ``grad_norm`` the mean
    over updates, ``lr`` the first update's."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.tokens: dict[str, float] = {}
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.lrs: list[float] = []
        self.update_loss = 0.0

    def add_micro(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], *, scale: float, tokens: float) -> None:
        """One micro-batch: its loss (before ``scale``), its ``vold_loss`` metrics, its loss tokens."""
        self.update_loss += float(loss.detach()) * scale
        for key, value in metrics.items():
            if key not in ("loss", "policy_loss"):
                self.sums[key] = self.sums.get(key, 0.0) + float(value) * tokens
                self.tokens[key] = self.tokens.get(key, 0.0) + tokens
        if "policy_loss" in metrics:
            self.sums["policy_loss"] = self.sums.get("policy_loss", 0.0) + float(metrics["policy_loss"]) * scale

    def end_update(self, *, lr: float, grad_norm: float) -> None:
        self.lrs.append(lr)
        self.grad_norms.append(grad_norm)
        self.losses.append(self.update_loss)
        self.update_loss = 0.0

    def result(self, rt: Runtime) -> dict[str, float]:
        """Over the ranks: the losses are means of the ranks' (W-scaled) shares, the token metrics token-weighted."""
        world, updates, keys = rt.world_size, len(self.losses), sorted(self.tokens)
        total_loss, policy_loss, *parts = rt.sum([sum(self.losses), self.sums.get("policy_loss", 0.0),
                                                  *(self.sums[k] for k in keys), *(self.tokens[k] for k in keys)])
        out = {"loss": total_loss / world / updates, "grad_norm": sum(self.grad_norms) / updates, "lr": self.lrs[0],
               "policy_loss": policy_loss / world / updates}
        out.update({key: parts[i] / max(parts[len(keys) + i], 1.0) for i, key in enumerate(keys)})
        return out


def minibatches(n: int, count: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """One epoch's ``count`` minibatches of the rows ``0..n-1``: shuffled by ``generator`` when ``count > 1``."""
    order = torch.randperm(n, generator=generator) if count > 1 else torch.arange(n)
    return order.tensor_split(count)


def check_updates(exp: Experience, cfg: Config) -> None:
    """The rollout batch fills ``minibatches * grad_accum`` micro-batches, and several updates have old log-probs."""
    oc = cfg.optim
    if len(exp) < oc.minibatches * oc.grad_accum:
        raise ValueError(f"{len(exp)} rollouts cannot fill optim.minibatches * optim.grad_accum = "
                         f"{oc.minibatches * oc.grad_accum} micro-batches")
    if exp.old_logprobs is None and oc.ppo_epochs * oc.minibatches > 1:
        raise ValueError("several updates per rollout batch need exp.old_logprobs (the sampling policy's log-probs)")


def optimize(student: torch.nn.Module, exp: Experience, cfg: Config, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, *, generator: torch.Generator,
             teacher_head: tuple[torch.Tensor, torch.Tensor | None] | None, vocab_size: int | None,
             after_update: Any = None, timings: dict[str, float] | None = None,
             runtime: Runtime | None = None, teacher_logits: dict[str, float] | None = None) -> dict[str, float]:
    """ppo_epochs x minibatches optimizer updates on one rollout batch; returns the step's loss metrics
    (:class:`UpdateMetrics`). Each update: the micro-batches' losses (:func:`compute_loss`), scaled by
    :class:`LossScale`, backward, then clip + AdamW + lr schedule. ``timings``: adds the ``update_actor`` seconds
    (forward, backward, clipping, optimizer) and the ``update_weights`` seconds (``after_update``, the rollout
    engine's weight sync).

    ``runtime`` (data parallel, ``vold.distributed``): ``exp`` is this rank's shard; the forward/backward
    passes run through its DDP/DeepSpeed wrapper, the normalisers use the global (all-reduced) minibatch
    token and sequence counts, and the returned metrics are over all ranks."""
    oc, lc = cfg.optim, cfg.loss
    rt = runtime or Runtime.single(student)
    check_updates(exp, cfg)
    device = exp.completion_ids.device
    options = {"teacher_head": teacher_head, "teacher_logits": teacher_logits, "vocab_size": vocab_size,
               "temperature": cfg.rollout.temperature, "max_completion_length": cfg.rollout.max_new_tokens,
               "autocast_dtype": cfg.model.autocast, "packing": oc.packing}
    tally = UpdateMetrics()
    for _ in range(oc.ppo_epochs):
        for minibatch in minibatches(len(exp), oc.minibatches, generator):
            with phase_timer(timings, "update_actor", device):
                norm = LossScale.of(exp, minibatch, lc.loss_type, rt)
                micros = minibatch.tensor_split(oc.grad_accum)
                for index, micro in enumerate(micros):
                    part = exp.select(micro.tolist())
                    with rt.accumulate(last=index == len(micros) - 1):
                        loss, metrics = rt.forward(compute_loss, part, lc, token_normalizer=norm.token_normalizer,
                                                   **options)
                        scale = norm.scale(len(micro))
                        rt.backward(loss * scale)
                    tally.add_micro(loss, metrics, scale=scale, tokens=float(part.loss_mask().sum()))
                lr = scheduler.get_last_lr()[0]
                tally.end_update(lr=lr, grad_norm=rt.step(optimizer, scheduler, oc.max_grad_norm))
            if after_update is not None:
                with phase_timer(timings, "update_weights", device):
                    after_update()
    return tally.result(rt)


def check_num_generations(cfg: Config) -> None:
    """G = 1 gives every group zero reward spread, so the GRPO term is identically 0 (TRL refuses G < 2): refused
    unless the loss has a term that learns without it (distillation, ``loss.distill_coef != 0``)."""
    if cfg.rollout.num_generations < 2 and cfg.loss.distill_coef == 0.0:
        raise ValueError("rollout.num_generations=1: every group has one rollout, so its advantage and the GRPO term "
                         "are 0 and nothing is learned; use rollout.num_generations >= 2 (or distillation, "
                         "loss.distill_coef != 0)")


def train_rl(cfg: Config) -> Path:
    """Run stage 2; returns the folder of the final model (``{output_dir}/rl/final``)."""
    lc, mc, oc, data = cfg.loss, cfg.model, cfg.optim, cfg.data
    stage = Stage(cfg, "rl", "train", max_steps=oc.max_steps)
    runtime = stage.runtime
    # every check on the user's input comes before the run folder is written (Stage.open)
    if not data.train_files:
        raise ValueError("no training prompts: set data.train_files")
    check_num_generations(cfg)
    runtime.check_divisible(data.batch_size, "data.batch_size")
    if runtime.distributed and cfg.rollout.engine == "vllm" and cfg.rollout.tensor_parallel_size != 1:
        raise ValueError("data-parallel training runs one vLLM engine per rank: set rollout.tensor_parallel_size=1")
    examples = load_examples(data.train_files, image_root=data.image_root, check_images=data.check_images,
                             prompt_column=data.prompt_column, answer_column=data.answer_column)
    require_rows(examples, data.train_files, data.batch_size, f"data.batch_size={data.batch_size} (prompts per step)")
    sampler = PromptSampler(len(examples), data.batch_size, seed=cfg.seed, shuffle=data.shuffle)
    rewards = RewardFunctions(cfg.reward.functions, cfg.reward.weights, overlong_cache=cfg.reward.overlong_cache,
                              max_completion_length=cfg.rollout.max_new_tokens)
    if lc.distill_on_wrong_only and lc.distill_mask_reward not in rewards.names:
        raise ValueError(f"loss.distill_mask_reward={lc.distill_mask_reward!r} is not one of reward.functions "
                         f"{rewards.names}")
    start_path = student_start(cfg)
    checkpoint = stage.prepare()
    if runtime.is_main:
        if checkpoint is None or lc.ref_kl_coef != 0.0:  # the reference is the starting student
            check_model_path(start_path, "sft.enabled -> sft/final" if cfg.sft.enabled else "model.student",
                             local_files_only=mc.local_files_only)
        if lc.distill_coef != 0.0:
            check_model_path(mc.teacher, "model.teacher", local_files_only=mc.local_files_only)
    seed_everything(cfg.seed)  # here, as always; the run folder is written once the models passed their checks

    device = stage.device
    student, processor = student_from_config(mc, device, path=stage.model_path(start_path))
    if not is_multimodal(processor) and any(e.images for e in examples):
        raise ValueError("the training data has images but the student is a text-only model")
    use_teacher = lc.distill_coef != 0.0
    teacher = teacher_tokenizer = teacher_head = teacher_logits = None
    vocab_size = mc.vocab_size
    if use_teacher:
        teacher, teacher_tokenizer = teacher_from_config(mc, torch.device("cpu") if mc.teacher_offload else device)
        vocab_size = check_vocab_compatible(student, teacher, mc.vocab_size, tokenizer_of_processor(processor),
                                            teacher_tokenizer)
        if lc.distill_estimator == "full":  # the head stays on the device even when the teacher is offloaded
            bias = lm_head_bias(teacher)
            teacher_head = (lm_head_weight(teacher).to(device), None if bias is None else bias.to(device))
            teacher_logits = logit_options(teacher, "teacher_")
    reference = None
    if lc.ref_kl_coef != 0.0:  # a frozen copy of the starting student (the paper uses none)
        reference = load_student(start_path, dtype=mc.dtype, device=device, attn_implementation=mc.attn_implementation,
                                 local_files_only=mc.local_files_only, trust_remote_code=mc.trust_remote_code)
        reference.requires_grad_(False).eval()
    stage.open(student, processor, sampler, section=oc, updates=oc.max_steps * oc.ppo_epochs * oc.minibatches,
               start_from=start_path, examples=len(examples), files=data.train_files,
               extra={"teacher": mc.teacher if use_teacher else "none (loss.distill_coef=0)",
                      "rollouts": f"{data.batch_size} prompts x {cfg.rollout.num_generations} per step"},
               zero3="is for `vold sft` only: the rollouts and the old-policy pass of `vold train` need the "
                     "student's whole weights on every rank (use ZeRO-2 or DDP)")
    # vLLM samples in the compute dtype (bf16 under autocast), not in the fp32 master weights' dtype
    engine = make_rollout_engine(cfg.rollout, student, processor, model_path=start_path, dtype=mc.autocast or mc.dtype,
                                 seed=cfg.seed, vocab_size=vocab_size)
    # always, not only on resume: vLLM's sleep level 2 drops the weights it loaded as soon as it is built
    engine.update_weights(student)
    system = {"system_prompt": data.system_prompt, "teacher_system_prompt": data.teacher_system_prompt}
    distill = distill_metric(lc.distill_estimator, lc.divergence)

    zero_spread = StreakWarning(min(10, oc.max_steps), lambda n: (
        f"train: every group's rewards have been equal for {n} steps (reward/frac_zero_std_groups = 1): the "
        f"advantages and the GRPO term are 0, so only the distillation term learns. Check the reward functions and "
        f"the answers, or raise rollout.num_generations / rollout.temperature"))
    student.train()
    while stage.step < oc.max_steps:
        step = stage.step
        timings: dict[str, float] = {}  # seconds per phase (PHASES)
        t0 = time.perf_counter()
        with phase_timer(timings, "prompts", device):
            indices = sampler.next_indices()  # the global batch; this rank samples positions[r::W] of it
            positions = runtime.shard(range(len(indices)))
            batch = build_prompt_batch([examples[indices[j]] for j in positions], processor, teacher_tokenizer,
                                       **system)
        exp, metrics, samples = rollout_step(step, batch, engine, rewards, cfg, device=device, timings=timings,
                                             positions=positions, runtime=runtime)
        t1 = time.perf_counter()

        add_scores(exp, batch, cfg, student=student, teacher=teacher, reference=reference, vocab_size=vocab_size,
                   device=device, timings=timings)
        t2 = time.perf_counter()

        generator = torch.Generator().manual_seed(cfg.seed + step)
        metrics.update(optimize(student, exp, cfg, stage.optimizer, stage.scheduler, generator=generator,
                                teacher_head=teacher_head, teacher_logits=teacher_logits, vocab_size=vocab_size,
                                after_update=lambda: engine.update_weights(student), timings=timings,
                                runtime=runtime))
        t3 = time.perf_counter()
        metrics.update({"time/rollout": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2,
                        "time/step": t3 - t0, **{f"time/{phase}": seconds for phase, seconds in timings.items()}})
        zero_spread.update(float(metrics["reward/frac_zero_std_groups"]) >= 1.0)
        stage.end_step(metrics, samples=samples, distill=distill,
                       postfix={"reward": f"{float(metrics['reward/mean']):.3f}", "loss": f"{metrics['loss']:.4f}"})
    return stage.close()
