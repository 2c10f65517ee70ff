"""Training-step benchmark (``python -m benchmarks.trainer``, ``vold bench trainer``): one update step of
GRPO + on-policy distillation by four systems, on the same models and the same fixed rollouts.

Every system gets the same random-initialised Qwen2 decoder (transformers' ``Qwen2ForCausalLM``, Qwen2.5's
vocabulary V = 151,936, untied lm_head; ``--layers`` / ``--hidden`` small, noted in the results) as student, a
second one (another seed) as teacher, and the same rollout batch: ``--batch`` completions of T tokens after a
``--prompt-len``-token prompt, random token ids, every completion token unmasked, random advantages, on-policy
(no old log-probs: one update per rollout batch, ratio = 1). Generation is excluded: the rollouts are inputs.
The objective is the same in rows (a)-(c): GRPO's clipped loss (eps 0.2 / 0.3, loss_type "dapo", no
reference KL) + ``Settings.distill_coef`` (0.1; no command-line flag) x exact reverse KL(student || teacher)
per token; row (d) is the distillation term alone (DistillationTrainer has no policy term). One timed step of a row is:

(a) vold_train   ``vold train``'s update: the calls ``vold.rl.add_scores`` makes for the teacher
                 (``vold.scoring.score``, no grad: its hidden states for "full", log-probs for k2) then
                 ``vold.rl.optimize`` (student forward + backward through ``vold_loss``, grad clip 1.0, AdamW
                 step, scheduler step) with vold's own optimizer (``vold.runs.make_optimizer``).
(b) vold_trl     vold's ``VoldGRPOTrainer`` (vold/adapters/trl.py) in TRL: ``Trainer.training_step`` (its
                 ``_compute_loss``: teacher forward no grad + student forward + ``vold_loss``, backward through
                 accelerate), then what the HF Trainer loop does after it: grad clip 1.0, AdamW step, scheduler
                 step, zero grad. The batch goes in as TRL's prepared inputs (``_prepare_inputs`` is the identity
                 here: it would generate).
(c) trl_grpo     TRL's ``GRPOTrainer`` (TRL 1.16 always patches the model with its fused lm_head:
                 ``add_fused_lm_head`` -> ``ChunkedLogProbFunction``, log-probs + entropy) plus the distillation
                 term as a TRL user adds it: a subclass whose ``_compute_loss`` adds ``distill_coef`` x TRL's
                 ``_chunked_divergence_loss`` (``ChunkedDivergenceFunction``, beta = 1: reverse KL, the
                 DistillationTrainer's own function) from the student's last hidden states (captured by a
                 forward hook on the backbone during GRPO's forward: no second student forward) and the
                 teacher's (backbone forward, no grad), normalised by the same token count. Same loop as (b).
(d) trl_distill  TRL's ``DistillationTrainer`` (beta = 1: reverse KL), distillation alone: its
                 ``training_step`` (student and teacher backbones, ``_chunked_divergence_loss``), same loop.

Per (system, T) point a fresh child process builds the models and the trainer, runs ``--warmup`` steps
(AdamW's state exists after the first), then ``--steps`` timed steps; reported: seconds per step (median),
time per completion token, and the peak memory of the timed steps: on the CPU the process's RSS high-water
mark (VmHWM, reset after the warm-up; the models, gradients and AdamW state included) and its rise above the
RSS before the step; on CUDA ``torch.cuda.max_memory_allocated``. The memory cap (``--mem-cap-gb``, default 8)
is on the child's whole resident memory: a point fits when it ran and its peak stayed under the cap. A
watchdog thread ends the child as soon as its RSS passes the cap ("over cap"; its address space is also
limited to what it maps at start + twice the cap, a backstop against one huge allocation; CUDA:
``set_per_process_memory_fraction``, an allocation beyond it is "oom"), so a point that needs more fails alone
instead of pushing a shared machine into swap; a system that fails at one length is not run at longer ones
("skipped").

Outputs in --output (default benchmarks/results/): trainer_<tag>.json, trainer_<tag>.md, trainer_<tag>.png
(peak memory and time per token vs completion length); <tag> defaults to the device type.

Examples:
  python -m benchmarks.trainer --quick                 # tiny shapes, seconds per point (the test runs this)
  python -m benchmarks.trainer                         # T = 512 ... 16384, batch 2, H 256, 2 layers, cap 8 GiB
  python -m benchmarks.trainer --lengths 512,1024 --systems vold_train,trl_grpo --mem-cap-gb 4
  python -m benchmarks.trainer --threads 2 --point-budget-s 400   # the committed CPU run (trainer_cpu.*)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .harness import (
    GIB,
    MIB,
    REPO_ROOT,
    RssWatchdog,
    cap_address_space,
    child_main,
    failure,
    fmt,
    log,
    machine_info,
    malloc_trim,
    modified_files,
    proc_status_bytes,
    pyplot,
    reset_peak_rss,
    rss_bytes,
    run_child,
    timed,
    write_result,
)

SYSTEMS = ("vold_train", "vold_trl", "trl_grpo", "trl_distill")
LABELS = {
    "vold_train": "(a) vold train's update (vold.rl.optimize)",
    "vold_trl": "(b) VoldGRPOTrainer in TRL",
    "trl_grpo": "(c) TRL GRPOTrainer (fused lm_head) + chunked reverse KL",
    "trl_distill": "(d) TRL DistillationTrainer (reverse KL alone)",
}
ESTIMATORS_OF = {"vold_train": ("full", "k2"), "vold_trl": ("full", "k2"), "trl_grpo": ("full",),
                 "trl_distill": ("full",)}
QWEN25_VOCAB = 151936
DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
EPSILON_LOW, EPSILON_HIGH, LOSS_TYPE = 0.2, 0.3, "dapo"


@dataclasses.dataclass
class Settings:
    """One sweep (and each of its children): models, rollouts, measurement."""

    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    systems: tuple[str, ...] = SYSTEMS
    estimator: str = "full"
    batch: int = 2
    prompt_len: int = 64
    vocab: int = QWEN25_VOCAB
    hidden: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    distill_coef: float = 0.1
    lr: float = 1e-5
    device: str = "cpu"
    dtype: str = "fp32"
    warmup: int = 1
    steps: int = 1
    mem_cap_bytes: int | None = 8 * GIB
    threads: int | None = None
    seed: int = 0
    child_timeout: float = 7200.0
    point_budget_s: float | None = None  # a system whose point took longer is not run at longer lengths

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[self.dtype]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Settings:
        return cls(**{**d, "lengths": tuple(d["lengths"]), "systems": tuple(d["systems"])})

    def model_note(self) -> str:
        return (f"Qwen2 decoder, random init, V={self.vocab:,}, H={self.hidden}, {self.layers} layers, "
                f"{self.heads} heads ({self.kv_heads} KV), intermediate {2 * self.hidden}, untied lm_head, "
                f"{self.dtype}, sdpa attention")


QUICK = dict(lengths=(16, 32), batch=2, prompt_len=8, vocab=4096, hidden=32, layers=1, warmup=1, steps=1,
             mem_cap_bytes=4 * GIB)


# ---------------------------------------------------------------------------------------------------
# models and rollouts (identical in every child for the same settings)
# ---------------------------------------------------------------------------------------------------


def make_model(s: Settings, seed: int) -> torch.nn.Module:
    """A random-initialised ``Qwen2ForCausalLM`` (Qwen2.5's architecture) with ``s``'s sizes."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=2 * s.hidden,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                         max_position_embeddings=max(s.lengths) + s.prompt_len + 8, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=2, pad_token_id=1, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).to(device=s.device, dtype=s.torch_dtype)


def make_rollouts(s: Settings, length: int) -> dict[str, torch.Tensor]:
    """The fixed rollout batch: prompt / completion ids and masks (no padding), advantages [B]."""
    g = torch.Generator().manual_seed(s.seed + length)
    b = s.batch
    batch = {
        "prompt_ids": torch.randint(3, s.vocab, (b, s.prompt_len), generator=g),
        "prompt_mask": torch.ones(b, s.prompt_len, dtype=torch.long),
        "completion_ids": torch.randint(3, s.vocab, (b, length), generator=g),
        "completion_mask": torch.ones(b, length, dtype=torch.long),
        "advantages": torch.randn(b, generator=g),
    }
    return {k: v.to(s.device) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------
# the systems: each returns step() -> loss (one full update)
# ---------------------------------------------------------------------------------------------------

Step = Callable[[], float]


def _vold_train_step(s: Settings, student: torch.nn.Module, teacher: torch.nn.Module,
                     batch: dict[str, torch.Tensor], length: int) -> Step:
    from vold.config import load_config
    from vold.rl import Experience, optimize
    from vold.runs import make_optimizer, make_scheduler
    from vold.scoring import score

    cfg = load_config(REPO_ROOT / "configs" / "tiny_cpu.yaml", [
        "sft.enabled=false", f"device={s.device}", f"model.dtype={'float32' if s.dtype == 'fp32' else 'bfloat16'}",
        f"loss.loss_type={LOSS_TYPE}", f"loss.epsilon_low={EPSILON_LOW}", f"loss.epsilon_high={EPSILON_HIGH}",
        "loss.ref_kl_coef=0.0", f"loss.distill_coef={s.distill_coef}", f"loss.distill_estimator={s.estimator}",
        "loss.distill_on_wrong_only=false", f"rollout.max_new_tokens={length}", "rollout.temperature=1.0",
        f"rollout.num_generations={s.batch}", "optim.ppo_epochs=1", "optim.minibatches=1", "optim.grad_accum=1",
        "optim.max_grad_norm=1.0", f"optim.lr={s.lr}", "optim.weight_decay=0.0", "optim.max_steps=1000",
    ])
    oc = cfg.optim
    optimizer = make_optimizer(student, oc.lr, weight_decay=oc.weight_decay, betas=(oc.adam_beta1, oc.adam_beta2),
                               eps=oc.adam_eps)
    scheduler = make_scheduler(optimizer, kind=oc.lr_scheduler, warmup=oc.warmup_steps, total=oc.max_steps)
    head = teacher.get_output_embeddings()
    teacher_head = (head.weight, head.bias)
    prompts = {"input_ids": batch["prompt_ids"], "attention_mask": batch["prompt_mask"]}
    ids, mask, n = batch["completion_ids"], batch["completion_mask"], s.batch
    full = s.estimator == "full"

    def step() -> float:
        exp = Experience(prompt_inputs=prompts, num_images=[0] * n, completion_ids=ids, completion_mask=mask,
                         advantages=batch["advantages"], distill_mask=torch.ones(n, device=ids.device))
        # the teacher pass exactly as add_scores makes it (one micro-batch of the n rows)
        scored = score(teacher, prompts, [0] * n, ids, mask, micro_size=n, vocab_size=None,
                       temperature=cfg.rollout.temperature, keep_hidden=full, packing=oc.packing)
        if full:
            exp.teacher_hidden = scored
        else:
            exp.teacher_logprobs = scored
        metrics = optimize(student, exp, cfg, optimizer, scheduler, generator=torch.Generator().manual_seed(0),
                           teacher_head=teacher_head, vocab_size=None)
        return float(metrics["loss"])

    return step


def _tokenizer_and_data(s: Settings) -> tuple[Any, Any]:
    import datasets

    from vold.tiny import make_tiny_tokenizer

    return make_tiny_tokenizer(), datasets.Dataset.from_dict({"prompt": ["x"] * s.batch})


def _trl_args(cls: type, s: Settings, length: int, out: Path, **options: Any) -> Any:
    return cls(output_dir=str(out), per_device_train_batch_size=s.batch, max_completion_length=length,
               learning_rate=s.lr, weight_decay=0.0, max_grad_norm=1.0, report_to="none",
               use_cpu=s.device == "cpu", bf16=False, save_strategy="no", logging_strategy="no", seed=s.seed,
               gradient_accumulation_steps=1, temperature=1.0, **options)


def grpo_with_distillation() -> type:
    """``GRPOTrainer`` plus ``distill_coef`` x reverse KL to a teacher, as a TRL 1.16 user adds it (row (c))."""
    from trl import GRPOTrainer
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    class GRPOWithDistillation(GRPOTrainer):
        """TRL's GRPO loss + ``distill_coef`` x TRL's chunked reverse KL (``ChunkedDivergenceFunction``, beta = 1)
        from the student's last hidden states (captured from GRPO's own forward) and the teacher's."""

        def __init__(self, *args: Any, teacher_model: torch.nn.Module, distill_coef: float, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.teacher_model = teacher_model.requires_grad_(False).eval()
            self.distill_coef = distill_coef

        def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
            captured: dict[str, torch.Tensor] = {}
            backbone = self.accelerator.unwrap_model(model).base_model
            handle = backbone.register_forward_hook(
                lambda _m, _i, out: captured.__setitem__("hidden", out.last_hidden_state))
            try:
                loss = super()._compute_loss(model, inputs)
            finally:
                handle.remove()
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
            attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
            length = inputs["completion_ids"].size(1)
            student_hidden = captured["hidden"][:, :-1][:, -length:]
            with torch.no_grad():
                teacher_hidden = self.teacher_model.base_model(input_ids=ids, attention_mask=attention,
                                                               use_cache=False).last_hidden_state[:, :-1][:, -length:]
            student_head = self.accelerator.unwrap_model(model).get_output_embeddings()
            teacher_head = self.teacher_model.get_output_embeddings()
            kl, _, _ = _chunked_divergence_loss(
                student_hidden, teacher_hidden, student_head.weight, teacher_head.weight, inputs["completion_mask"],
                1.0, num_items_in_batch=inputs["num_items_in_batch"].clamp(min=1.0),
                student_lm_head_bias=student_head.bias, teacher_lm_head_bias=teacher_head.bias,
                temperature=self.temperature)
            return loss + self.distill_coef * kl

    return GRPOWithDistillation


def _hf_loop_step(trainer: Any, inputs: dict[str, Any]) -> Step:
    """One optimizer step as the HF Trainer loop makes it: training_step, clip, optimizer, scheduler, zero grad."""
    trainer._prepare_inputs = lambda x: x  # the batch is already prepared: TRL's would generate
    trainer.current_gradient_accumulation_steps = 1
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    model = trainer.model

    def step() -> float:
        model.train()
        loss = trainer.training_step(model, inputs, None)
        trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad(set_to_none=True)
        return float(loss)

    return step


def _trl_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {**batch, "num_items_in_batch": batch["completion_mask"].sum()}


def _vold_trl_step(s: Settings, student: torch.nn.Module, teacher: torch.nn.Module,
                   batch: dict[str, torch.Tensor], length: int, out: Path) -> Step:
    from trl import GRPOConfig

    from vold.adapters.trl import VoldGRPOTrainer

    tokenizer, data = _tokenizer_and_data(s)
    args = _trl_args(GRPOConfig, s, length, out, num_generations=s.batch, loss_type=LOSS_TYPE, beta=0.0,
                     epsilon=EPSILON_LOW, epsilon_high=EPSILON_HIGH)
    trainer = VoldGRPOTrainer(model=student, reward_funcs=_zero_reward, args=args, train_dataset=data,
                              processing_class=tokenizer, teacher_model=teacher, distill_coef=s.distill_coef,
                              distill_estimator=s.estimator)
    return _hf_loop_step(trainer, _trl_inputs(batch))


def _trl_grpo_step(s: Settings, student: torch.nn.Module, teacher: torch.nn.Module,
                   batch: dict[str, torch.Tensor], length: int, out: Path) -> Step:
    from trl import GRPOConfig

    tokenizer, data = _tokenizer_and_data(s)
    args = _trl_args(GRPOConfig, s, length, out, num_generations=s.batch, loss_type=LOSS_TYPE, beta=0.0,
                     epsilon=EPSILON_LOW, epsilon_high=EPSILON_HIGH)
    trainer = grpo_with_distillation()(model=student, reward_funcs=_zero_reward, args=args, train_dataset=data,
                                       processing_class=tokenizer, teacher_model=teacher,
                                       distill_coef=s.distill_coef)
    return _hf_loop_step(trainer, _trl_inputs(batch))


def _trl_distill_step(s: Settings, student: torch.nn.Module, teacher: torch.nn.Module,
                      batch: dict[str, torch.Tensor], length: int, out: Path) -> Step:
    from trl import DistillationConfig, DistillationTrainer

    tokenizer, data = _tokenizer_and_data(s)
    args = _trl_args(DistillationConfig, s, length, out, beta=1.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  processing_class=tokenizer)
    return _hf_loop_step(trainer, _trl_inputs(batch))


def _zero_reward(completions: list[Any], **_: Any) -> list[float]:
    """A reward function for TRL's constructor; never called (the rollouts and advantages are given)."""
    return [0.0] * len(completions)


def build_step(system: str, s: Settings, length: int, work: Path) -> tuple[Step, dict[str, Any]]:
    """Models, rollouts and ``step()`` of ``system`` at completion length ``length``; also the model sizes."""
    if system not in SYSTEMS:
        raise ValueError(f"system {system!r} is not one of {SYSTEMS}")
    if s.estimator not in ESTIMATORS_OF[system]:
        raise ValueError(f"system {system!r} has no estimator {s.estimator!r} (only {ESTIMATORS_OF[system]})")
    student, teacher = make_model(s, s.seed), make_model(s, s.seed + 1)
    teacher.requires_grad_(False).eval()
    batch = make_rollouts(s, length)
    info = {"student_params": sum(p.numel() for p in student.parameters()),
            "teacher_params": sum(p.numel() for p in teacher.parameters())}
    if system == "vold_train":
        return _vold_train_step(s, student, teacher, batch, length), info
    builder = {"vold_trl": _vold_trl_step, "trl_grpo": _trl_grpo_step, "trl_distill": _trl_distill_step}[system]
    return builder(s, student, teacher, batch, length, work), info


# ---------------------------------------------------------------------------------------------------
# measurement (in a child process per point)
# ---------------------------------------------------------------------------------------------------


def measure_point(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: cap its memory, build the system, warm up, time ``steps`` steps and their peak."""
    import tempfile

    from transformers.utils import logging as hf_logging

    s, system, length = Settings.from_dict(spec["settings"]), spec["system"], spec["length"]
    hf_logging.set_verbosity_error()
    if s.threads:
        torch.set_num_threads(s.threads)
    device = torch.device(s.device)
    limit, watchdog = None, contextlib.nullcontext()
    if device.type == "cuda":
        if s.mem_cap_bytes:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, s.mem_cap_bytes / total), device)
    elif s.mem_cap_bytes:
        limit = cap_address_space(2 * s.mem_cap_bytes)  # backstop; the watchdog is the cap
        watchdog = RssWatchdog(s.mem_cap_bytes, lambda rss: {"status": "over cap", "rss_at_stop_bytes": rss,
                                                            "address_space_limit_bytes": limit})
    result: dict[str, Any] = {"address_space_limit_bytes": limit}
    with tempfile.TemporaryDirectory(prefix="vold_trainer_bench_") as work, watchdog:
        try:
            step, info = build_step(system, s, length, Path(work))
            result.update(info)
            losses = [step() for _ in range(s.warmup)]
            malloc_trim()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            else:
                reset_peak_rss()
                base = rss_bytes()
            times = []
            for _ in range(s.steps):
                elapsed, loss = timed(step, device)
                times.append(elapsed)
                losses.append(loss)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                method = "cuda max_memory_allocated during the timed steps"
            else:
                peak = proc_status_bytes("VmHWM") or rss_bytes()
                method = "child VmHWM during the timed steps (reset after the warm-up)"
            result.update(status="ok", time_s=statistics.median(times), times_s=times, losses=losses,
                          peak_bytes=peak, base_bytes=base, peak_extra_bytes=peak - base, mem_method=method)
        except Exception as exc:  # noqa: BLE001 - this point's status; the sweep goes on
            result["status"] = failure(exc)
    return result


def run_point(system: str, length: int, s: Settings) -> dict[str, Any]:
    """One (system, length) point in ``python -m benchmarks.trainer --child``."""
    spec = {"system": system, "length": length, "settings": dataclasses.asdict(s)}
    out = run_child("benchmarks.trainer", spec, timeout=s.child_timeout)
    if "status" not in out:  # the child died before its own result (killed, timed out)
        out["status"] = out.pop("mem_status", "error: no result")
    return out


# the reason a system is not run beyond a point that exceeded --point-budget-s (sweep writes it, markdown reads it)
OVER_BUDGET = "not run: "


def sweep(s: Settings, on_row: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Every (system, length) point, shortest first; a system that failed is skipped at longer lengths, and so
    is one whose point took longer than ``s.point_budget_s`` (its longer points would take longer still).
    ``on_row(rows)`` is called after each point (the caller writes the partial results)."""
    rows: list[dict[str, Any]] = []
    stopped: dict[str, str] = {}
    tokens = {t: s.batch * t for t in s.lengths}
    for length in sorted(s.lengths):
        for system in s.systems:
            row: dict[str, Any] = {"system": system, "label": LABELS[system], "length": length,
                                   "tokens": tokens[length], "estimator": s.estimator}
            if system in stopped:
                row["status"] = f"skipped ({stopped[system]})"
            else:
                started = time.perf_counter()
                row.update(run_point(system, length, s))
                row["child_s"] = time.perf_counter() - started
                if row["status"] != "ok":
                    stopped[system] = f"failed at T={length}"
                elif s.point_budget_s is not None and row["child_s"] > s.point_budget_s:
                    stopped[system] = (f"{OVER_BUDGET}T={length} took {row['child_s']:.0f} s > "
                                       f"--point-budget-s {s.point_budget_s:g}")
            if row.get("time_s"):
                row["time_per_token_s"] = row["time_s"] / tokens[length]
            peak = row.get("peak_bytes")
            row["over_cap"] = bool(s.mem_cap_bytes and peak is not None and peak > s.mem_cap_bytes)
            row["fits"] = row["status"] == "ok" and not row["over_cap"]
            log(f"[trainer-bench] T={length} {system}: {row['status']}"
                + (f", {row['time_s']:.3f} s/step, peak {peak / MIB:,.0f} MiB" if row["status"] == "ok" else ""))
            rows.append(row)
            if on_row is not None:
                on_row(rows)
    return rows


def longest_fit(rows: list[dict[str, Any]], system: str) -> int | None:
    """The longest completion length at which ``system`` ran and stayed under the cap (None: none)."""
    fits = [r["length"] for r in rows if r["system"] == system and r["fits"]]
    return max(fits) if fits else None


# ---------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    s, m, rows = result["settings"], result["machine"], result["rows"]
    cap = s["mem_cap_bytes"]
    device = m["gpu"] or f"CPU ({m['cpu']}, {m['cpu_count']} cores, {s['threads'] or m['torch_threads']} threads)"
    lines = [
        f"# Training-step benchmark ({result['tag']})",
        "",
        f"One update step (student forward + backward, teacher forward, loss, grad clip, AdamW) on fixed rollouts "
        f"(generation excluded): {s['batch']} completions x T tokens after a {s['prompt_len']}-token prompt; "
        f"student and teacher: {result['models']}; GRPO (dapo, eps 0.2/0.3) + {s['distill_coef']} x reverse KL "
        f"(estimator {s['estimator']}), (d) the KL alone. Median of {s['steps']} step(s) after {s['warmup']} "
        f"warm-up, each point in a fresh process. Memory cap {fmt(cap / GIB if cap else None, '.1f')} GiB. "
        f"{device}; torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}; {m['date']}.",
        "",
        *([f"**Partial: the sweep was still running** ({len(rows)} points so far).", ""]
          if result.get("complete") is False else []),
        "| system | T | tokens | s / step | ms / token | peak memory (MiB) | step's rise (MiB) | loss | status |",
        "|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        status = r["status"] + (" (over the cap)" if r.get("over_cap") else "")
        lines.append(
            f"| {r['label']} | {r['length']} | {r['tokens']} | {fmt(r.get('time_s'), '.3f')} "
            f"| {fmt(None if r.get('time_per_token_s') is None else 1e3 * r['time_per_token_s'], '.3f')} "
            f"| {fmt(None if r.get('peak_bytes') is None else r['peak_bytes'] / MIB, ',.0f')} "
            f"| {fmt(None if r.get('peak_extra_bytes') is None else r['peak_extra_bytes'] / MIB, ',.0f')} "
            f"| {fmt(r['losses'][-1] if r.get('losses') else None, '.6g')} | {status} |")
    lines += ["", f"Longest completion that fits under the cap ({fmt(cap / GIB if cap else None, '.1f')} GiB), "
              f"of T in {sorted({r['length'] for r in rows})}:", "", "| system | longest T | at T: peak MiB |",
              "|---|--:|--:|"]
    for system in result["settings"]["systems"]:
        t = longest_fit(rows, system)
        at = next((r for r in rows if r["system"] == system and r["length"] == t), None)
        # stopped by the time budget: longer lengths were not tried, so the longest fit is a lower bound
        unknown = t is not None and any(r["system"] == system and r["status"].startswith(f"skipped ({OVER_BUDGET}")
                                        for r in rows)
        lines.append(f"| {LABELS[system]} | {'none' if t is None else (f'>= {t} (longer not run)' if unknown else t)} "
                     f"| {fmt(at['peak_bytes'] / MIB if at else None, ',.0f')} |")
    lines += ["", "Peak memory: the process's whole footprint during the timed steps (models, gradients, AdamW "
              "state, activations; CPU: VmHWM, CUDA: max_memory_allocated); rise: above the footprint before the "
              "step. What each row times: see benchmarks/trainer.py.", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Peak memory and time per token vs completion length, one line per system; the cap as a line."""
    plt = pyplot()
    if plt is None:
        return None
    rows, cap = result["rows"], result["settings"]["mem_cap_bytes"]
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, system in enumerate(result["settings"]["systems"]):
        ok = sorted((r for r in rows if r["system"] == system and r["status"] == "ok"), key=lambda r: r["length"])
        if ok:
            xs = [r["length"] for r in ok]
            ax_m.plot(xs, [r["peak_bytes"] / MIB for r in ok], marker="o", color=f"C{i}", label=LABELS[system])
            ax_t.plot(xs, [1e3 * r["time_per_token_s"] for r in ok], marker="o", color=f"C{i}", label=LABELS[system])
        failed = [r for r in rows if r["system"] == system and r["status"] != "ok"
                  and not r["status"].startswith("skipped")]
        for r in failed:
            ax_m.axvline(r["length"], color=f"C{i}", linestyle=":", alpha=0.6)
    if cap:
        ax_m.axhline(cap / MIB, color="k", linestyle="--", label=f"cap {cap / GIB:.1f} GiB")
    for ax, ylabel in ((ax_m, "peak memory (MiB)"), (ax_t, "ms per completion token")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("completion length T (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"One training step ({result['tag']}): {result['models']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of positive integers") from error
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of positive integers")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: a length is listed twice")
    return values


def _systems(text: str) -> tuple[str, ...]:
    values = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in values if x not in SYSTEMS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of {','.join(SYSTEMS)}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: a system is listed twice")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"tiny shapes (T {'/'.join(map(str, QUICK['lengths']))}, prompt {QUICK['prompt_len']}, "
                        f"V {QUICK['vocab']}, H {QUICK['hidden']}, {QUICK['layers']} layer, {QUICK['steps']} step, "
                        f"cap {QUICK['mem_cap_bytes'] // GIB} GiB): a smoke run; flags below override")
    p.add_argument("--lengths", type=_ints, help=f"completion lengths (default {','.join(map(str, DEFAULT_LENGTHS))})")
    p.add_argument("--systems", type=_systems, help=f"subset of {','.join(SYSTEMS)} (default: all)")
    p.add_argument("--estimator", choices=("full", "k2"),
                   help="distillation estimator (default full; k2: the vold rows only, TRL has no k2 path)")
    p.add_argument("--batch", type=int, help="completions per step (default 2)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens (default 64)")
    p.add_argument("--vocab", type=int, help=f"vocabulary (default {QWEN25_VOCAB}, Qwen2.5's)")
    p.add_argument("--hidden", type=int, help="hidden size (default 256)")
    p.add_argument("--layers", type=int, help="decoder layers (default 2)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="model dtype (default fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 1)")
    p.add_argument("--steps", type=int, help="timed steps per point (default 1: a point at T = 16k takes minutes)")
    p.add_argument("--mem-cap-gb", type=float,
                   help="memory cap per point in GiB (default 8; 0: none): fits = ran and peak <= cap")
    p.add_argument("--threads", type=int, help="torch threads in each child (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child-timeout", type=float, default=7200.0, help="seconds per point (default 7200)")
    p.add_argument("--point-budget-s", type=float,
                   help="a system whose point took longer (seconds, child process included) is not run at longer "
                        "lengths, reported as such (default: no budget)")
    p.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results",
                   help="output directory (default: benchmarks/results/)")
    p.add_argument("--tag", help="file name tag: trainer_<tag>.* (default: the device type; 'quick' with --quick)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """``Settings`` from the defaults, ``--quick`` and the flags (in that order); errors name the flag."""
    base: dict[str, Any] = dict(QUICK) if args.quick else {}
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    flags = {"lengths": args.lengths, "systems": args.systems, "estimator": args.estimator, "batch": args.batch,
             "prompt_len": args.prompt_len, "vocab": args.vocab, "hidden": args.hidden, "layers": args.layers,
             "warmup": args.warmup, "steps": args.steps, "threads": args.threads}
    base.update({k: v for k, v in flags.items() if v is not None})
    if args.mem_cap_gb is not None:
        if not math.isfinite(args.mem_cap_gb) or args.mem_cap_gb < 0:
            raise SystemExit(f"--mem-cap-gb must be a finite number >= 0 (0: no cap), got {args.mem_cap_gb}")
        base["mem_cap_bytes"] = int(args.mem_cap_gb * GIB) or None
    for name in ("batch", "prompt_len", "vocab", "hidden", "layers", "steps"):
        if name in base and base[name] < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if base.get("warmup", 1) < 1:
        raise SystemExit("--warmup must be >= 1 (the first step allocates AdamW's state)")
    if base.get("hidden", 256) % 4:
        raise SystemExit("--hidden must be a multiple of 4 (4 attention heads)")
    if args.point_budget_s is not None and not (math.isfinite(args.point_budget_s) and args.point_budget_s > 0):
        raise SystemExit(f"--point-budget-s must be a finite number > 0, got {args.point_budget_s}")
    if not (math.isfinite(args.child_timeout) and args.child_timeout > 0):
        raise SystemExit(f"--child-timeout must be a finite number > 0, got {args.child_timeout}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    s = Settings(device=device, dtype=args.dtype or ("bf16" if device == "cuda" else "fp32"), seed=args.seed,
                 child_timeout=args.child_timeout, point_budget_s=args.point_budget_s, **base)
    grouped = [x for x in s.systems if x in ("vold_trl", "trl_grpo")]
    if s.batch < 2 and grouped:
        raise SystemExit(f"--batch must be >= 2 with {','.join(grouped)}: TRL's GRPOTrainer needs at least 2 "
                         "generations per prompt (the completions of a step form one group)")
    if s.estimator == "k2":
        dropped = [x for x in s.systems if "k2" not in ESTIMATORS_OF[x]]
        if dropped:
            log(f"[trainer-bench] --estimator k2: {','.join(dropped)} have no k2 path, left out")
        s.systems = tuple(x for x in s.systems if x not in dropped)
        if not s.systems:
            raise SystemExit("--estimator k2: none of --systems has a k2 path (vold_train, vold_trl)")
    return s


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run the sweep; write trainer_<tag>.json / .md / .png; print the table; return the result."""
    args = parse_args(argv)
    if args.child:
        child_main(measure_point, args.child)
        return None
    s = settings_from_args(args)
    tag = args.tag or ("quick" if args.quick else torch.device(s.device).type)
    log(f"[trainer-bench] {len(s.systems)} systems x {len(s.lengths)} lengths on {s.device}: {s.model_note()}; "
        f"batch {s.batch}, memory cap {fmt(s.mem_cap_bytes / GIB if s.mem_cap_bytes else None, '.1f')} GiB")
    started = time.perf_counter()
    machine = machine_info(torch.device(s.device))
    machine["git_modified"] = modified_files()

    def report(rows: list[dict[str, Any]], complete: bool) -> tuple[dict[str, Any], str, list[Path]]:
        result = {"tag": tag, "machine": machine, "models": s.model_note(), "settings": dataclasses.asdict(s),
                  "systems": {k: LABELS[k] for k in s.systems}, "rows": rows, "complete": complete,
                  "longest_fit": {k: longest_fit(rows, k) for k in s.systems},
                  "elapsed_s": time.perf_counter() - started}
        text = markdown(result)
        return result, text, write_result(result, text, args.output, f"trainer_{tag}")

    # the results so far are written after every point: a sweep stopped midway keeps what it measured
    rows = sweep(s, on_row=lambda so_far: report(so_far, complete=False))
    result, text, paths = report(rows, complete=True)
    if not args.no_plot:
        png = plot(result, args.output / f"trainer_{tag}.png")
        paths += [png] if png else []
    print(text)
    log("[trainer-bench] wrote " + ", ".join(str(p) for p in paths))
    return result


__all__ = ["LABELS", "SYSTEMS", "Settings", "build_step", "longest_fit", "main", "make_model",
           "make_rollouts", "markdown", "measure_point", "parse_args", "settings_from_args", "sweep"]

if __name__ == "__main__":
    main()
