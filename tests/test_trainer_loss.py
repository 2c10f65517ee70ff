"""The RL stage's loss on tiny models: the trainer's ``compute_loss`` is ``vold_loss`` on the same hidden
states, and both equal a naive full-logits GRPO + distillation loss; distillation weights; zero
advantages; empty completions; micro-batching (gradient accumulation) changes nothing; PPO epochs.
"""

import pytest
import torch

from vold.config import load_config
from vold.data import Example, build_prompt_batch, repeat_inputs, select_rows
from vold.distributed import prompt_seeds
from vold.kernels import vold_loss
from vold.models import completion_hidden_states, lm_head_weight
from vold.rewards import RewardFunctions
from vold.rl import Experience, add_scores, compute_loss, distill_weights, optimize, rollout_step, score
from vold.rollout.hf import HFRolloutEngine
from vold.runs import make_scheduler
from vold.testing import (
    make_tiny_images,
    make_tiny_processor,
    make_tiny_student,
    make_tiny_teacher,
    make_tiny_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_thread")

G = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A rollout batch of 3 prompts x 3 completions (images, teacher prompts) scored by the teacher."""
    tokenizer = make_tiny_tokenizer()
    processor = make_tiny_processor(tokenizer)
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, image in enumerate(make_tiny_images(3)):
        image.save(root / f"{i}.png")
        paths.append(str(root / f"{i}.png"))
    examples = [Example("What is 2+2?", "4", images=[paths[0]], teacher_prompt="A picture of 2 and 2. 2+2?"),
                Example("3+4?", "7"), Example("Compare them.", "left", images=paths[1:])]
    student, teacher = make_tiny_student(tokenizer).train(), make_tiny_teacher(tokenizer)
    cfg = load_config(None, ["reward.functions=[accuracy, vold.testing:digit_reward]", f"rollout.num_generations={G}",
                             "rollout.max_new_tokens=10", "seed=3"])
    batch = build_prompt_batch(examples, processor, tokenizer)
    engine = HFRolloutEngine(student, processor)
    exp, _, _ = rollout_step(0, batch, engine, RewardFunctions(cfg.reward.functions), cfg, device=torch.device("cpu"))
    assert exp.advantages.abs().sum() > 0 and not exp.completion_mask.all()  # something to learn, some padding
    teacher_prompts = repeat_inputs(batch.teacher_inputs, [0] * 3, G)
    exp.teacher_logprobs = score(teacher, teacher_prompts, [0] * 9, exp.completion_ids, exp.completion_mask,
                                 micro_size=4, vocab_size=None)
    exp.teacher_hidden = score(teacher, teacher_prompts, [0] * 9, exp.completion_ids, exp.completion_mask,
                               micro_size=4, vocab_size=None, keep_hidden=True)
    return dict(cfg=cfg, student=student, teacher=teacher, exp=exp, batch=batch, teacher_prompts=teacher_prompts,
                processor=processor)


def full_logits(model, prompt_inputs, ids, mask):
    """Naive: the model's own forward (with its lm_head) over prompt + completion, completion positions only."""
    inputs = dict(prompt_inputs)
    start = inputs["input_ids"].shape[1] - 1
    inputs["input_ids"] = torch.cat([inputs["input_ids"], ids], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], mask], dim=1)
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids)], dim=1)
    if "pixel_values" not in inputs:
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return model(**inputs, use_cache=False).logits[:, start:start + ids.shape[1]].float()


def naive_loss(setup, estimator: str, old_logprobs=None, beta: float = 0.1):
    """GRPO (token-level clipped ratio, eps 0.2/0.3, dapo token mean) + beta * w * D from full logits."""
    exp, student, teacher = setup["exp"], setup["student"], setup["teacher"]
    ids, mask = exp.completion_ids, exp.completion_mask.float()
    log_p = full_logits(student, exp.prompt_inputs, ids, exp.completion_mask).log_softmax(-1)
    with torch.no_grad():
        log_q = full_logits(teacher, setup["teacher_prompts"], ids, exp.completion_mask).log_softmax(-1)
    logp = log_p.gather(-1, ids[..., None])[..., 0]
    old = logp.detach() if old_logprobs is None else old_logprobs
    ratio = torch.exp(logp - old)
    adv = exp.advantages[:, None]
    pg = -torch.min(ratio * adv, ratio.clamp(0.8, 1.3) * adv)
    if estimator == "k2":
        divergence = 0.5 * (logp - log_q.gather(-1, ids[..., None])[..., 0]) ** 2
    else:
        divergence = (log_p.exp() * (log_p - log_q)).sum(-1)
    per_token = pg + beta * exp.distill_mask[:, None] * divergence
    return (per_token * mask).sum() / mask.sum()


def head_grad(student, loss):
    student.zero_grad(set_to_none=True)
    loss.backward()
    grad = lm_head_weight(student).grad.clone()
    student.zero_grad(set_to_none=True)
    return grad


@pytest.mark.parametrize("estimator", ["k2", "full"])
@pytest.mark.parametrize("off_policy", [False, True])
def test_trainer_loss_is_vold_loss_is_the_naive_loss(setup, estimator, off_policy):
    cfg, exp, student, teacher = setup["cfg"], setup["exp"], setup["student"], setup["teacher"]
    cfg.loss.distill_estimator = estimator
    if off_policy:  # an older policy: ratios away from 1, some clipped
        torch.manual_seed(0)
        exp.old_logprobs = (score(student, exp.prompt_inputs, exp.num_images, exp.completion_ids,
                                  exp.completion_mask, micro_size=9, vocab_size=None)
                            + 0.3 * torch.randn(exp.completion_ids.shape)) * exp.completion_mask
    try:
        head = (lm_head_weight(teacher), None)
        loss, metrics = compute_loss(student, exp, cfg.loss, teacher_head=head, max_completion_length=10)
        trainer_grad = head_grad(student, loss)

        hidden = completion_hidden_states(student, exp.prompt_inputs, exp.completion_ids, exp.completion_mask)
        teacher_args = (dict(teacher_hidden=exp.teacher_hidden, teacher_weight=lm_head_weight(teacher))
                        if estimator == "full" else dict(teacher_logprobs=exp.teacher_logprobs))
        direct, direct_metrics = vold_loss(
            hidden, lm_head_weight(student), exp.completion_ids, exp.advantages, exp.old_logprobs,
            exp.completion_mask, distill_mask=exp.distill_mask, loss_type="dapo", epsilon_low=0.2, epsilon_high=0.3,
            distill_coef=0.1, distill_estimator=estimator, **teacher_args,
        )
        assert loss.item() == pytest.approx(direct.item(), abs=1e-7)
        for key, value in direct_metrics.items():
            assert metrics[key].item() == pytest.approx(value.item(), abs=1e-7), key
        torch.testing.assert_close(trainer_grad, head_grad(student, direct), atol=1e-7, rtol=1e-6)

        naive = naive_loss(setup, estimator, exp.old_logprobs)
        assert loss.item() == pytest.approx(naive.item(), rel=1e-4, abs=1e-6)
        torch.testing.assert_close(trainer_grad, head_grad(student, naive), atol=2e-6, rtol=1e-3)
        if off_policy:
            assert metrics["clip_low"] + metrics["clip_high"] > 0 and metrics["ratio"] != pytest.approx(1.0)
        else:
            assert metrics["ratio"].item() == pytest.approx(1.0)
    finally:
        exp.old_logprobs = None
        cfg.loss.distill_estimator = "k2"


def test_distill_weights():
    lc = load_config().loss
    assert lc.distill_on_wrong_only and lc.distill_mask_reward == "accuracy"
    per = {"accuracy": torch.tensor([1.0, 0.0, float("nan"), 0.25]), "format": torch.tensor([1.0, 1, 1, 1])}
    # wrong -> 1, right -> 0, no verdict (None) -> 1, partial credit 0.25 -> 0.75
    assert distill_weights(per, lc).tolist() == [0.0, 1.0, 1.0, 0.75]
    lc.distill_on_wrong_only = False
    assert distill_weights(per, lc).tolist() == [1.0] * 4
    lc.distill_on_wrong_only, lc.distill_mask_reward = True, "format2"
    with pytest.raises(ValueError, match="distill_mask_reward='format2' is not one of the reward functions"):
        distill_weights(per, lc)
    lc.distill_mask_reward = "format"
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*correctness reward in \[0, 1\]"):
        distill_weights({"format": torch.tensor([2.0, 0.0])}, lc)


def test_all_equal_rewards_give_zero_advantage_and_only_the_kl_term(setup):
    cfg, exp, student = setup["cfg"], setup["exp"], setup["student"]
    flat = Experience(**{**exp.__dict__, "advantages": torch.zeros(9)})
    loss, metrics = compute_loss(student, flat, cfg.loss)
    assert metrics["policy_loss"].item() == 0.0
    mask = exp.completion_mask.float()
    k2 = 0.5 * (score(student, exp.prompt_inputs, exp.num_images, exp.completion_ids, exp.completion_mask,
                      micro_size=9, vocab_size=None) - exp.teacher_logprobs) ** 2
    assert loss.item() == pytest.approx((0.1 * exp.distill_mask[:, None] * k2 * mask).sum().item() / mask.sum().item(),
                                        rel=1e-5)
    cfg.loss.distill_coef = 0.0  # nothing left to learn: loss and gradients exactly zero
    try:
        loss, _ = compute_loss(student, flat, cfg.loss)
        assert loss.item() == 0.0 and head_grad(student, loss).abs().max() == 0.0
    finally:
        cfg.loss.distill_coef = 0.1


def test_empty_completions_give_zero_loss_not_nan(setup):
    cfg, exp, student = setup["cfg"], setup["exp"], setup["student"]
    empty = Experience(**{**exp.__dict__, "completion_mask": torch.zeros_like(exp.completion_mask)})
    for estimator in ("k2", "full"):
        cfg.loss.distill_estimator = estimator
        loss, metrics = compute_loss(student, empty, cfg.loss, teacher_head=(lm_head_weight(setup["teacher"]), None))
        assert loss.item() == 0.0 and all(torch.isfinite(v) for v in metrics.values())
        grad = head_grad(student, loss)
        assert torch.isfinite(grad).all() and grad.abs().max() == 0.0
    cfg.loss.distill_estimator = "k2"
    # an optimizer step on a batch whose completions are all empty is defined too (no update)
    model = make_tiny_student(make_tiny_tokenizer()).train()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    out = optimize(model, empty, cfg, optimizer, make_scheduler(optimizer, kind="constant", warmup=0, total=1),
                   generator=torch.Generator(), teacher_head=None, vocab_size=None)
    assert out["loss"] == 0.0 and out["grad_norm"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def run_optimize(setup, **optim):
    """One training step's updates on a fresh copy of the student with SGD (lr 1): returns the new weights."""
    cfg = setup["cfg"]
    for key, value in optim.items():
        setattr(cfg.optim, key, value)
    model = make_tiny_student(make_tiny_tokenizer()).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = make_scheduler(optimizer, kind="constant", warmup=0, total=10)
    try:
        metrics = optimize(model, setup["exp"], cfg, optimizer, scheduler, generator=torch.Generator().manual_seed(0),
                           teacher_head=None, vocab_size=None)
    finally:
        cfg.optim.grad_accum, cfg.optim.minibatches, cfg.optim.ppo_epochs = 1, 1, 1
    return dict(model.named_parameters()), metrics


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo", "dr_grpo"])
def test_gradient_accumulation_changes_nothing(setup, loss_type):
    setup["cfg"].loss.loss_type = loss_type
    try:
        one, m1 = run_optimize(setup, grad_accum=1)
        three, m3 = run_optimize(setup, grad_accum=3)  # 3 micro-batches of 3 rows, same minibatch
    finally:
        setup["cfg"].loss.loss_type = "dapo"
    assert m1["loss"] == pytest.approx(m3["loss"], rel=1e-5, abs=1e-8)
    for name, param in one.items():
        torch.testing.assert_close(param, three[name], atol=1e-6, rtol=1e-5, msg=name)


def test_ppo_epochs_and_minibatches_use_old_logprobs(setup):
    exp = setup["exp"]
    exp.old_logprobs = score(setup["student"], exp.prompt_inputs, exp.num_images, exp.completion_ids,
                             exp.completion_mask, micro_size=9, vocab_size=None)
    try:
        _, metrics = run_optimize(setup, ppo_epochs=2, minibatches=3, grad_accum=1)
    finally:
        exp.old_logprobs = None
    assert metrics["ratio"] != pytest.approx(1.0, abs=1e-6)  # later updates see a moved policy
    assert metrics["lr"] == 1.0 and all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    with pytest.raises(ValueError, match="cannot fill optim.minibatches"):
        run_optimize(setup, minibatches=5, grad_accum=2)


def test_add_scores_old_and_teacher_logprobs_at_the_sampling_temperature(setup):
    """With several updates per rollout batch, pi_old is the policy that sampled (its log-probs are the
    sampler's, so the first update has ratio 1); the teacher's k2 log-probs are of the same token ids after
    its own prompt, at the same temperature T (log softmax(z / T))."""
    student, teacher, batch = setup["student"], setup["teacher"], setup["batch"]
    cfg = load_config(None, ["reward.functions=[accuracy, vold.testing:digit_reward]", f"rollout.num_generations={G}",
                             "rollout.max_new_tokens=10", "rollout.temperature=0.7", "optim.ppo_epochs=2", "seed=5"])
    engine = HFRolloutEngine(student, setup["processor"])
    exp, _, _ = rollout_step(0, batch, engine, RewardFunctions(cfg.reward.functions), cfg, device=torch.device("cpu"))
    sampled = engine.generate(batch, G, 10, temperature=0.7, seed=prompt_seeds(cfg.seed, 0, range(len(batch))),
                              return_logprobs=True)
    assert torch.equal(sampled.completion_ids, exp.completion_ids)  # same seed: the same rollouts
    add_scores(exp, batch, cfg, student=student, teacher=teacher, reference=None, vocab_size=None,
               device=torch.device("cpu"))
    torch.testing.assert_close(exp.old_logprobs, sampled.logprobs, atol=1e-5, rtol=1e-5)
    ids, mask = exp.completion_ids, exp.completion_mask
    with torch.no_grad():
        log_q = (full_logits(teacher, setup["teacher_prompts"], ids, mask) / 0.7).log_softmax(-1)
    torch.testing.assert_close(exp.teacher_logprobs, log_q.gather(-1, ids[..., None])[..., 0] * mask,
                               atol=1e-5, rtol=1e-5)
    assert exp.ref_logprobs is None and exp.teacher_hidden is None


def test_select_rows_follows_images(setup):
    batch = setup["batch"]
    repeated = repeat_inputs(batch.student_inputs, batch.num_images, 2)
    selected = select_rows(batch.student_inputs, batch.num_images, [0, 0, 1, 1, 2, 2])
    assert repeated.keys() == selected.keys()
    for key in repeated:
        assert torch.equal(repeated[key], selected[key]), key
    rows = [2, 0]  # any order: row 2 has two images, row 0 one
    picked = select_rows(batch.student_inputs, batch.num_images, rows)
    alone = build_prompt_batch([batch.examples[i] for i in rows], setup["processor"]).student_inputs
    assert torch.equal(picked["pixel_values"], alone["pixel_values"])
    assert torch.equal(picked["image_grid_thw"], alone["image_grid_thw"])


def test_autocast_bf16_forward_with_fp32_master_weights(setup):
    """model.autocast=bfloat16: bf16 forward and loss GEMMs, fp32 weights and gradients, about the same loss."""
    cfg, exp, student = setup["cfg"], setup["exp"], setup["student"]
    loss32, _ = compute_loss(student, exp, cfg.loss)
    loss16, metrics = compute_loss(student, exp, cfg.loss, autocast_dtype="bfloat16")
    assert loss16.item() == pytest.approx(loss32.item(), rel=0.05, abs=1e-3)
    grad = head_grad(student, loss16)
    assert lm_head_weight(student).dtype == grad.dtype == torch.float32 and grad.abs().sum() > 0
    assert torch.isfinite(grad).all()


def test_optimize_refuses_several_updates_without_old_logprobs():
    """Several updates per rollout batch with no sampling-policy log-probs would silently be on-policy."""
    exp = Experience(prompt_inputs={}, num_images=[0] * 4, completion_ids=torch.zeros(4, 3, dtype=torch.long),
                     completion_mask=torch.ones(4, 3), advantages=torch.zeros(4), distill_mask=torch.zeros(4))
    cfg = load_config(overrides=["optim.ppo_epochs=2"])
    with pytest.raises(ValueError, match="old_logprobs"):
        optimize(torch.nn.Linear(1, 1), exp, cfg, None, None, generator=torch.Generator(), teacher_head=None,
                 vocab_size=None)


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo", "dr_grpo"])
def test_masked_truncated_rows_contribute_no_gradient_and_leave_the_counts(setup, loss_type):
    """loss.mask_truncated_completions: rows with loss_rows = 0 change the update exactly as if they were not in
    the batch at all (no gradient, not in the token or sequence counts), for every loss type and micro-batch split."""
    exp, cfg = setup["exp"], setup["cfg"]
    cut = [1, 5, 6]  # three "truncated" rows
    kept = [i for i in range(len(exp)) if i not in cut]
    masked = Experience(**{**exp.__dict__, "loss_rows": torch.tensor([0.0 if i in cut else 1.0
                                                                      for i in range(len(exp))])})
    cfg.loss.loss_type = loss_type
    try:
        setup["exp"] = masked
        with_masked, _ = run_optimize(setup, grad_accum=3)
        setup["exp"] = exp.select(kept)
        without, _ = run_optimize(setup, grad_accum=2)
        setup["exp"] = exp
        everything, _ = run_optimize(setup, grad_accum=1)
    finally:
        setup["exp"], cfg.loss.loss_type = exp, "dapo"
    for name, param in with_masked.items():
        torch.testing.assert_close(param, without[name], atol=1e-6, rtol=1e-5, msg=name)
    assert any(not torch.allclose(p, everything[n], atol=1e-6) for n, p in with_masked.items())


def test_rollout_step_masks_truncated_completions_only_when_asked(setup):
    cfg, batch = setup["cfg"], setup["batch"]
    engine = HFRolloutEngine(setup["student"], setup["processor"])
    rewards = RewardFunctions(cfg.reward.functions)
    cfg.rollout.max_new_tokens = 3  # short: most completions hit the limit
    try:
        plain, _, _ = rollout_step(0, batch, engine, rewards, cfg, device=torch.device("cpu"))
        cfg.loss.mask_truncated_completions = True
        exp, metrics, _ = rollout_step(0, batch, engine, rewards, cfg, device=torch.device("cpu"))
    finally:
        cfg.rollout.max_new_tokens, cfg.loss.mask_truncated_completions = 10, False
    assert plain.loss_rows is None and exp.loss_rows is not None
    assert set(exp.loss_rows.tolist()) <= {0.0, 1.0} and float(exp.loss_rows.sum()) < len(exp)
    lengths = exp.completion_mask.sum(1)
    assert bool((lengths[exp.loss_rows == 0] == 3).all())  # left out: completions that used all 3 tokens
    torch.testing.assert_close(exp.loss_mask(), exp.completion_mask * exp.loss_rows[:, None].long())
    # still logged: the truncated fraction and the lengths count every completion
    assert metrics["completion/truncated_frac"] == pytest.approx(1.0 - float(exp.loss_rows.mean()))
    torch.testing.assert_close(exp.completion_mask, plain.completion_mask)  # the same rollouts, same seeds
