"""``vold.adapters.trl.VoldGRPOTrainer`` against TRL's own ``GRPOTrainer`` (skipped without TRL).

- distill_coef=0: loss and every parameter gradient equal TRL's ``_compute_loss`` on the same batch
  (same tiny Qwen3, fp32) for each supported loss_type, sequence-level ratios, ref KL, two-sided clip,
  gradient accumulation and a dapo token count spanning the accumulation window;
- distill_coef>0: loss and gradients equal TRL's loss + distill_coef * a naive full-logits reverse KL
  (exact, or k1/k2/k3 of the sampled tokens), normalised like TRL's policy term, weighted per
  sequence (distill_on_wrong_only), with a separate teacher prompt and a teacher head padded with rows;
- two real ``train()`` steps on CPU: generation, binary rewards, teacher prompts, distill metrics logged,
  parameters move.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from vold.adapters.trl import VoldGRPOTrainer  # noqa: E402
from vold.runs import distill_metric  # noqa: E402
from vold.testing import make_tiny_teacher, make_tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

B, P, T = 4, 5, 6
TOL = 1e-5


def has_digit(completions, **_):
    """A binary reward: 1 if the completion contains a digit."""
    return [float(any(c.isdigit() for c in text)) for text in completions]


def make_config(out, **options) -> GRPOConfig:
    options = {"per_device_train_batch_size": B, "num_generations": 2, "max_completion_length": T,
               "report_to": "none", "use_cpu": True, "bf16": False, "save_strategy": "no", **options}
    return GRPOConfig(output_dir=str(out), **options)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """TRL's GRPOTrainer and VoldGRPOTrainer on two copies of one tiny Qwen3, and a teacher with 5 padded rows."""
    tokenizer = make_tiny_tokenizer()
    student = make_tiny_teacher(tokenizer, hidden_size=32, seed=0)
    teacher = make_tiny_teacher(tokenizer, hidden_size=48, vocab_size=len(tokenizer) + 5, seed=1)
    data = datasets.Dataset.from_dict({"prompt": ["1+1=", "2+3="]})
    out = tmp_path_factory.mktemp("trl")
    common = {"reward_funcs": has_digit, "train_dataset": data, "processing_class": tokenizer}
    # TRL bakes the temperature into the model's fused head at construction: 0.7 for every case
    reference = GRPOTrainer(model=copy.deepcopy(student), args=make_config(out, temperature=0.7), **common)
    vold = VoldGRPOTrainer(model=copy.deepcopy(student), args=make_config(out, temperature=0.7), teacher_model=teacher,
                           distill_coef=0.0, **common)
    return reference, vold, tokenizer


def make_batch(trainer, tokenizer, *, seed: int = 0) -> dict:
    """A rollout batch like TRL's: left-padded prompts, right-padded completions, off-policy old log-probs."""
    g = torch.Generator().manual_seed(seed)
    low, high = 8, len(tokenizer)
    prompt_ids = torch.randint(low, high, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0
    prompt_ids[0, :2] = tokenizer.pad_token_id
    completion_ids = torch.randint(low, high, (B, T), generator=g)
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[2, 2:] = 0
    completion_ids[completion_mask == 0] = tokenizer.pad_token_id
    ids, mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, T)
    teacher_prompt_ids = torch.randint(low, high, (B, P + 2), generator=g)
    teacher_prompt_mask = torch.ones(B, P + 2, dtype=torch.long)
    teacher_prompt_mask[3, :3] = 0
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=g),
        "old_per_token_logps": logps + 0.3 * torch.randn(B, T, generator=g),  # ratios up to ~2: clipping happens
        "ref_per_token_logps": logps + 0.5 * torch.randn(B, T, generator=g),
        # the dapo denominator counts the whole generation batch (2 micro-batches of this size here)
        "num_items_in_batch": 2 * completion_mask.sum(),
        "distill_mask": torch.tensor([1.0, 0.0, 1.0, 1.0]),
        "teacher_prompt_ids": teacher_prompt_ids, "teacher_prompt_mask": teacher_prompt_mask,
    }


def configure(trainer, *, loss_type="dapo", level="token", beta=0.0, delta=None, accumulation=1,
              steps_per_generation=1, vllm=False, distill_coef=0.0, estimator="full"):
    """Set the options the loss reads (the trainers are built once; their constructors are not under test)."""
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer.loss_type, trainer.importance_sampling_level, trainer.beta = loss_type, level, beta
    trainer.current_gradient_accumulation_steps = accumulation
    trainer.args.delta, trainer.args.use_bias_correction_kl = delta, False
    trainer.args.steps_per_generation = steps_per_generation
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = vllm  # TRL: IS ratio only with vLLM
    if isinstance(trainer, VoldGRPOTrainer):
        trainer.distill_coef, trainer.distill_estimator = distill_coef, estimator


def trl_reduce(per_token: torch.Tensor, mask: torch.Tensor, trainer, batch) -> torch.Tensor:
    """TRL's aggregation of a per-token loss for ``trainer.loss_type`` (one process, train mode)."""
    mask = mask.float()
    accumulation = trainer.current_gradient_accumulation_steps
    if trainer.loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean() / accumulation
    if trainer.loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1) / accumulation
    if trainer.loss_type == "dr_grpo":
        return (per_token * mask).sum() / (mask.shape[0] * trainer.max_completion_length) / accumulation
    normalizer = batch["num_items_in_batch"] * accumulation / trainer.args.steps_per_generation
    return (per_token * mask).sum() / normalizer


def naive_distill(trainer, teacher, batch, *, estimator: str, separate_prompt: bool) -> torch.Tensor:
    """Per-token KL(student || teacher) [B, T] from full [B, T, V] logits (the student's with gradient)."""
    completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
    vocab = trainer.model.get_output_embeddings().weight.shape[0]

    def log_probs(model, prompt_ids, prompt_mask):
        ids = torch.cat([prompt_ids, completion_ids], 1)
        logits = model(input_ids=ids, attention_mask=torch.cat([prompt_mask, completion_mask], 1)).logits
        return torch.log_softmax(logits[:, -T - 1:-1, :vocab].float() / trainer.temperature, dim=-1)

    student = log_probs(trainer.model, batch["prompt_ids"], batch["prompt_mask"])
    key = "teacher_prompt" if separate_prompt else "prompt"
    with torch.no_grad():
        teacher = log_probs(teacher, batch[f"{key}_ids"], batch[f"{key}_mask"])
    if estimator == "full":
        return (student.exp() * (student - teacher)).sum(-1)
    x = (student - teacher).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    return {"k1": x, "k2": 0.5 * x * x, "k3": torch.expm1(-x) + x}[estimator]


def compare(reference, vold, reference_loss, vold_loss):
    """Loss and every parameter gradient, to TOL relative to the largest gradient magnitude."""
    reference_loss.backward()
    vold_loss.backward()
    errors = {"loss": abs(reference_loss.item() - vold_loss.item())}
    for (name, p_ref), (_, p_vold) in zip(reference.model.named_parameters(), vold.model.named_parameters(),
                                          strict=True):
        scale = max(p_ref.grad.abs().max().item(), 1e-12)
        errors[name] = (p_ref.grad - p_vold.grad).abs().max().item() / scale
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOL, f"{worst}: {errors[worst]:.2e}"
    return errors


GRPO_CASES = {
    "grpo": {"loss_type": "grpo"},
    "bnpo": {"loss_type": "bnpo", "accumulation": 2},
    "dr_grpo": {"loss_type": "dr_grpo", "accumulation": 2},
    "dapo": {"loss_type": "dapo", "accumulation": 2, "steps_per_generation": 2},
    "dapo-beta-delta": {"loss_type": "dapo", "beta": 0.04, "delta": 1.3},
    "dapo-seq": {"loss_type": "dapo", "level": "sequence"},
    "grpo-seq-beta": {"loss_type": "grpo", "level": "sequence", "beta": 0.1},
    # vLLM importance-sampling ratios (per token / per sequence, one masked to 0) and a tool mask
    "dapo-vllm-token-tool-mask": {"loss_type": "dapo", "vllm": True, "is_shape": (B, T), "tool_mask": True},
    "grpo-vllm-sequence": {"loss_type": "grpo", "vllm": True, "is_shape": (B, 1), "beta": 0.04},
}


@pytest.mark.parametrize("case", GRPO_CASES)
def test_matches_trl_without_distillation(pair, case):
    reference, vold, tokenizer = pair
    options = dict(GRPO_CASES[case])
    is_shape, tool_mask = options.pop("is_shape", None), options.pop("tool_mask", False)
    for trainer in (reference, vold):
        configure(trainer, **options)
    batch = make_batch(reference, tokenizer)
    if is_shape is not None:
        batch["importance_sampling_ratio"] = torch.rand(is_shape) + 0.5
        batch["importance_sampling_ratio"][0] = 0.0
    if tool_mask:
        batch["tool_mask"] = (torch.rand(B, T) > 0.3).long()
    errors = compare(reference, vold, reference._compute_loss(reference.model, batch),
                     vold._compute_loss(vold.model, batch))
    assert errors["loss"] < TOL
    metrics = vold._metrics["train"]
    assert metrics["entropy"][-1] == pytest.approx(reference._metrics["train"]["entropy"][-1], abs=1e-4)
    if options.get("beta"):
        assert metrics["kl"][-1] == pytest.approx(reference._metrics["train"]["kl"][-1], abs=1e-4)


DISTILL_CASES = {
    "dapo-full": {"loss_type": "dapo", "estimator": "full", "accumulation": 2, "steps_per_generation": 2},
    "grpo-full-teacher-prompt": {"loss_type": "grpo", "estimator": "full", "separate_prompt": True, "wrong_only": True},
    "bnpo-k3-wrong-only": {"loss_type": "bnpo", "estimator": "k3", "wrong_only": True},
    "dr_grpo-k2-seq": {"loss_type": "dr_grpo", "estimator": "k2", "level": "sequence", "beta": 0.04},
}


@pytest.mark.parametrize("case", DISTILL_CASES)
def test_matches_trl_plus_distillation(pair, case):
    reference, vold, tokenizer = pair
    options = dict(DISTILL_CASES[case])
    separate_prompt, wrong_only = options.pop("separate_prompt", False), options.pop("wrong_only", False)
    coef = 0.3
    for trainer in (reference, vold):
        configure(trainer, distill_coef=coef, **options)
    batch = make_batch(reference, tokenizer, seed=1)
    weights = batch["distill_mask"] if wrong_only else torch.ones(B)
    if not wrong_only:
        del batch["distill_mask"]
    if not separate_prompt:
        del batch["teacher_prompt_ids"], batch["teacher_prompt_mask"]
    teacher = vold.teacher_model
    distill = naive_distill(reference, teacher, batch, estimator=options["estimator"], separate_prompt=separate_prompt)
    expected = reference._compute_loss(reference.model, batch) + coef * trl_reduce(
        distill * weights[:, None], batch["completion_mask"], reference, batch)
    errors = compare(reference, vold, expected, vold._compute_loss(vold.model, batch))
    assert errors["loss"] < TOL
    m = batch["completion_mask"].float()
    name = f"vold/{distill_metric(options['estimator'])}"  # vold/distill/reverse_kl (full) or vold/distill/k2
    assert vold._metrics["train"][name][-1] == pytest.approx(
        ((distill * m).sum() / m.sum()).item(), rel=1e-4, abs=1e-6)


def test_unsupported_options_raise(pair, tmp_path):
    _, vold, tokenizer = pair
    data = datasets.Dataset.from_dict({"prompt": ["1+1="]})
    for options in ({"loss_type": "sapo"}, {"top_entropy_quantile": 0.2}, {"entropy_coef": 0.01}):
        with pytest.raises(NotImplementedError, match="does not support"):
            VoldGRPOTrainer(model=copy.deepcopy(vold.model), reward_funcs=has_digit, train_dataset=data,
                            processing_class=tokenizer, args=make_config(tmp_path, **options), distill_coef=0.0)
    with pytest.raises(ValueError, match="teacher_model"):
        VoldGRPOTrainer(model=copy.deepcopy(vold.model), reward_funcs=has_digit, train_dataset=data,
                        processing_class=tokenizer, args=make_config(tmp_path))


def test_train_steps(tmp_path):
    """Two optimizer steps of generation + VOLD loss on CPU: metrics logged, parameters updated."""
    tokenizer = make_tiny_tokenizer()
    student = make_tiny_teacher(tokenizer, hidden_size=32, seed=0)
    teacher = make_tiny_teacher(tokenizer, hidden_size=48, seed=1)
    prompts = ["1+1=", "2+3=", "4+4=", "5+1="]
    data = datasets.Dataset.from_dict({"prompt": prompts, "teacher_prompt": [f"Add: {p}" for p in prompts]})
    args = make_config(tmp_path, max_steps=2, learning_rate=1e-2, logging_steps=1, gradient_accumulation_steps=2,
                       per_device_train_batch_size=2, loss_type="dapo")
    trainer = VoldGRPOTrainer(model=student, reward_funcs=has_digit, args=args, train_dataset=data,
                              processing_class=tokenizer, teacher_model=teacher, distill_coef=0.5,
                              distill_estimator="full", distill_on_wrong_only=True)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()

    logs = [entry for entry in trainer.state.log_history if "vold/distill/reverse_kl" in entry]  # the exact KL
    assert len(logs) == 2
    assert all(math.isfinite(entry["vold/distill/reverse_kl"]) and entry["vold/distill/reverse_kl"] > 0
               for entry in logs)
    assert all("reward" in entry and "entropy" in entry for entry in logs)
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert "lm_head.weight" in changed and len(changed) > len(before) // 2

    batch = trainer._buffered_inputs[0]  # the last rollout, as the loss saw it
    assert set(batch["distill_mask"].tolist()) <= {0.0, 1.0}
    texts = tokenizer.batch_decode(batch["teacher_prompt_ids"], skip_special_tokens=True)
    assert all(text.startswith("Add: ") and text[5:] in prompts for text in texts)


@pytest.mark.parametrize("options,kind,match", [
    ({"distill_coef": math.nan, "teacher_model": "unused"}, ValueError, "^distill_coef must be finite"),
    ({"distill_coef": math.inf, "teacher_model": "unused"}, ValueError, "^distill_coef must be finite"),
    ({"distill_coef": "abc", "teacher_model": "unused"}, TypeError, "^distill_coef must be a real number"),
    ({"distill_estimator": "k4", "teacher_model": "unused"}, ValueError, "^distill_estimator"),
    ({"distill_coef": 0.1}, ValueError, "teacher_model"),
    ({"distill_on_wrong_only": "yes", "teacher_model": "unused"}, TypeError, "^distill_on_wrong_only"),
    ({"teacher_model": "/no/such/teacher"}, FileNotFoundError, "^teacher_model='/no/such/teacher': not found"),
])
def test_vold_arguments_are_checked_before_trl_builds_anything(options, kind, match, monkeypatch):
    """A NaN distill_coef passed construction and failed at the first training step, after generation (found by
    the new-user pass); vold's own arguments are now checked before GRPOTrainer.__init__ runs at all."""
    def never(*args, **kwargs):
        raise AssertionError("GRPOTrainer.__init__ ran before vold's arguments were checked")

    monkeypatch.setattr(GRPOTrainer, "__init__", never)
    with pytest.raises(kind, match=match):
        VoldGRPOTrainer(model="unused", reward_funcs=has_digit, **options)
