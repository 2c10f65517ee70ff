"""vold.rollout: the HF engine on tiny models, and the vLLM engine's logic against a stand-in ``vllm`` module."""

import sys
import types

import pytest
import torch

from vold.config import RolloutConfig
from vold.data import Example, build_prompt_batch, repeat_inputs
from vold.kernels import fused_linear_logprobs, vold_loss
from vold.models import completion_hidden_states, lm_head_weight
from vold.rewards import RewardFunctions, group_advantages
from vold.rollout import Rollout, completion_mask, eos_token_ids, make_rollout_engine, pad_completions
from vold.rollout.hf import HFRolloutEngine
from vold.testing import (
    make_tiny_images,
    make_tiny_processor,
    make_tiny_student,
    make_tiny_teacher,
    make_tiny_text_student,
    make_tiny_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_thread")

G = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tokenizer = make_tiny_tokenizer()
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, image in enumerate(make_tiny_images(3)):
        image.save(root / f"{i}.png")
        paths.append(str(root / f"{i}.png"))
    examples = [
        Example("What is 2+2?", "4", images=[paths[0]]),
        Example("A longer text-only question, 3+4?", "7"),
        Example("Compare.", "left", images=paths[1:]),
    ]
    return {"tokenizer": tokenizer, "processor": make_tiny_processor(tokenizer), "examples": examples,
            "student": make_tiny_student(tokenizer), "llama": make_tiny_text_student(tokenizer)}


def test_completion_mask_and_padding():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9], [4, 3, 3, 0]])
    mask, finished = completion_mask(ids, [2, 3])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert finished.tolist() == [True, False, True, True]
    mask, finished = completion_mask(ids, [2, 3], lengths=torch.tensor([4, 2, 1, 1]))  # right-padded rows
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]
    assert finished.tolist() == [True, False, True, False]
    assert pad_completions([[1, 2], [3]], pad_token_id=0).tolist() == [[1, 2], [3, 0]]
    assert pad_completions([[], []], pad_token_id=9).tolist() == [[9], [9]]


def check_rollout(rollout: Rollout, tokenizer, eos: list[int], pad: int, rows: int, max_new_tokens: int):
    ids, mask = rollout.completion_ids, rollout.completion_mask
    assert len(rollout) == rows and ids.shape[0] == mask.shape[0] == rows and ids.shape[1] <= max_new_tokens
    for row in range(rows):
        length = int(mask[row].sum())
        assert mask[row, :length].all() and not mask[row, length:].any()  # a prefix
        is_eos = torch.isin(ids[row, :length], torch.tensor(eos))
        if rollout.finished[row]:
            assert is_eos[-1] and not is_eos[:-1].any()  # ends at its first EOS, which is kept
        else:
            assert not is_eos.any() and length == ids.shape[1] == max_new_tokens
        assert (ids[row, length:] == pad).all()
        assert rollout.texts[row] == tokenizer.decode(ids[row, :length], skip_special_tokens=True)


def test_hf_rollout_vlm_groups_masks_and_logprobs(tiny):
    model, processor, tokenizer = tiny["student"], tiny["processor"], tiny["tokenizer"]
    batch = build_prompt_batch(tiny["examples"], processor)
    engine = HFRolloutEngine(model, processor, vocab_size=8)  # ids >= 8 suppressed: EOS (2) comes early
    saved_config = model.generation_config
    model.train()
    rollout = engine.generate(batch, G, max_new_tokens=12, seed=0, return_logprobs=True)
    assert model.training and model.generation_config is saved_config  # restored

    assert rollout.num_generations == G and rollout.completion_ids.shape[0] == 3 * G
    eos = eos_token_ids(tokenizer, model)
    check_rollout(rollout, tokenizer, eos, tokenizer.pad_token_id, 3 * G, 12)
    assert rollout.finished.any() and not rollout.finished.all()
    sampled = rollout.completion_ids[rollout.completion_mask.bool()]
    assert (sampled < 8).all() and not torch.isin(sampled, torch.tensor([5, 6])).any()  # no image/video pads

    # the sampler's log-probs are what the trainer recomputes from hidden states (left padding, images, M-RoPE)
    prompts = repeat_inputs(batch.student_inputs, batch.num_images, G)
    with torch.no_grad():
        hidden = completion_hidden_states(model.eval(), prompts, rollout.completion_ids, rollout.completion_mask)
        logp = fused_linear_logprobs(hidden, lm_head_weight(model), rollout.completion_ids, vocab_size=8)
    torch.testing.assert_close(logp * rollout.completion_mask, rollout.logprobs, atol=1e-5, rtol=1e-5)

    again = engine.generate(batch, G, max_new_tokens=12, seed=0)
    assert torch.equal(again.completion_ids, rollout.completion_ids) and again.logprobs is None
    other = engine.generate(batch, G, max_new_tokens=12, seed=1)
    assert not torch.equal(other.completion_ids, rollout.completion_ids)


def test_hf_rollout_text_student(tiny):
    model, tokenizer = tiny["llama"], tiny["tokenizer"]
    batch = build_prompt_batch([e for e in tiny["examples"] if not e.images] + [Example("1+1?", "2")], tokenizer)
    engine = make_rollout_engine(RolloutConfig(engine="hf"), model, tokenizer, vocab_size=8)
    assert isinstance(engine, HFRolloutEngine)
    rollout = engine.generate(batch, 4, max_new_tokens=10, temperature=0.7, top_p=0.9, seed=3, return_logprobs=True)
    check_rollout(rollout, tokenizer, [tokenizer.eos_token_id], tokenizer.pad_token_id, 8, 10)
    prompts = repeat_inputs(batch.student_inputs, batch.num_images, 4)
    with torch.no_grad():
        hidden = completion_hidden_states(model, prompts, rollout.completion_ids, rollout.completion_mask)
        logp = fused_linear_logprobs(hidden, lm_head_weight(model), rollout.completion_ids, temperature=0.7,
                                     vocab_size=8)
    torch.testing.assert_close(logp * rollout.completion_mask, rollout.logprobs, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        engine.generate(batch, 2, 4, temperature=0.0)


def test_vllm_engine_without_vllm_says_so(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ImportError, match="rollout.engine='vllm' needs vLLM.*use rollout.engine='hf'"):
        make_rollout_engine(RolloutConfig(engine="vllm"), tiny["student"], tiny["processor"], model_path="x")
    with pytest.raises(ValueError, match="needs model_path"):
        make_rollout_engine(RolloutConfig(engine="vllm"), tiny["student"], tiny["processor"])


# ---- the vLLM engine against a stand-in module with the offline API's shape ------------------------

class FakeModel:
    def __init__(self):
        self.loaded: dict[str, torch.Tensor] = {}

    def load_weights(self, weights):
        self.loaded.update(weights)


class FakeLLM:
    EOS = 2

    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.model = kwargs, [], FakeModel()

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags or ())))

    def apply_model(self, fn):
        return [fn(self.model)]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append(("generate",))
        self.last = (prompts, params)
        outputs = []
        for i, p in enumerate(params):
            completions = []
            for j in range(p.n):  # completion j: j+1 tokens, finished with EOS when j is even
                ids = [10 + i] * (j + 1) + ([self.EOS] if j % 2 == 0 else [])
                ids = ids[:p.max_tokens]
                logprobs = [{t: types.SimpleNamespace(logprob=-0.1 * (k + 1))} for k, t in enumerate(ids)]
                completions.append(types.SimpleNamespace(token_ids=ids, logprobs=logprobs if p.logprobs == 0 else None))
            outputs.append(types.SimpleNamespace(outputs=completions))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.SimpleNamespace(LLM=FakeLLM, SamplingParams=lambda **kw: types.SimpleNamespace(**kw))
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_vllm_engine_phases_prompts_and_outputs(tiny, fake_vllm):
    from vold.rollout.vllm import VLLMRolloutEngine

    processor, tokenizer = tiny["processor"], tiny["tokenizer"]
    cfg = RolloutConfig(engine="vllm", gpu_memory_utilization=0.4, max_images_per_prompt=2)
    engine = make_rollout_engine(cfg, tiny["student"], processor, model_path="/ckpt", vocab_size=100, seed=5)
    assert isinstance(engine, VLLMRolloutEngine)
    llm = engine.llm
    assert llm.kwargs["model"] == "/ckpt" and llm.kwargs["gpu_memory_utilization"] == 0.4
    assert llm.kwargs["enable_sleep_mode"] and llm.kwargs["generation_config"] == "vllm"
    assert llm.kwargs["limit_mm_per_prompt"] == {"image": 2, "video": 0} and llm.kwargs["seed"] == 5
    assert llm.calls == [("sleep", 1)]  # memory handed to the trainer straight away

    batch = build_prompt_batch(tiny["examples"], processor)
    rollout = engine.generate(batch, G, max_new_tokens=3, seed=7, return_logprobs=True)
    assert llm.calls[1:] == [("wake_up", ("weights", "kv_cache")), ("generate",), ("sleep", 1)]
    prompts, params = llm.last
    assert prompts[0]["prompt"] == batch.student_texts[0] and prompts[0]["multi_modal_data"]["image"] is batch.images[
        0][0]
    assert prompts[2]["multi_modal_data"]["image"] == batch.images[2]
    mask = batch.student_inputs["attention_mask"][1].bool()
    assert prompts[1] == {"prompt_token_ids": batch.student_inputs["input_ids"][1][mask].tolist()}
    assert [p.seed for p in params] == [7, 8, 9] and all(p.n == G and p.max_tokens == 3 for p in params)
    assert params[0].stop_token_ids == [tokenizer.eos_token_id] and params[0].allowed_token_ids == [
        i for i in range(100) if i not in (processor.image_token_id, processor.video_token_id)]

    pad, eos = tokenizer.pad_token_id, FakeLLM.EOS
    assert rollout.completion_ids[:3].tolist() == [[10, eos, pad], [10, 10, pad], [10, 10, 10]]
    assert rollout.completion_mask[:3].tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    assert rollout.finished[:3].tolist() == [True, False, False]
    assert rollout.completion_ids[3:6, 0].tolist() == [11, 11, 11]  # prompt-major order
    torch.testing.assert_close(rollout.logprobs[2], torch.tensor([-0.1, -0.2, -0.3]))
    assert rollout.logprobs[0, 2] == 0.0
    assert rollout.texts[0] == tokenizer.decode([10])

    # after an optimizer step: wake the weights only, load every parameter, drop stale prefixes
    model = tiny["student"]
    llm.calls.clear()
    engine.update_weights(model)
    assert llm.calls == [("wake_up", ("weights",)), ("reset_prefix_cache",)]
    assert llm.model.loaded.keys() == model.state_dict().keys()
    assert torch.equal(llm.model.loaded["lm_head.weight"], model.lm_head.weight)
    engine.generate(batch, G, max_new_tokens=2)
    assert llm.calls[2:] == [("wake_up", ("kv_cache",)), ("generate",), ("sleep", 1)]


def test_vllm_sleep_level_2_needs_a_weight_sync(tiny, fake_vllm):
    from vold.rollout.vllm import VLLMRolloutEngine

    engine = VLLMRolloutEngine("/ckpt", tiny["tokenizer"], sleep_level=2)
    batch = build_prompt_batch([Example("q", "1")], tiny["tokenizer"])
    with pytest.raises(RuntimeError, match="dropped by sleep level 2: call update_weights"):
        engine.generate(batch, 2, 4)
    engine.update_weights(tiny["llama"])
    rollout = engine.generate(batch, 2, 4)
    assert rollout.completion_ids.shape[0] == 2 and "limit_mm_per_prompt" not in engine.llm.kwargs


def test_vllm_sleep_level_2_train_and_eval_sync_the_weights_first(fake_vllm, tmp_path):
    """Regression: with sleep level 2 the engine drops its weights as soon as it is built, and ``vold train``
    synced them only when resuming (``vold eval`` never): the first rollout raised. Both sync them first now."""
    from pathlib import Path

    from vold.cli import main
    from vold.evaluate import model_folder_name
    from vold.runs import read_jsonl
    from vold.testing import prepare_tiny_run, tiny_overrides

    run = prepare_tiny_run(tmp_path / "tiny")
    config = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml")
    common = ["--config", config, *tiny_overrides(run, tmp_path / "out"), "sft.enabled=false",
              "rollout.engine=vllm", "rollout.sleep_level=2"]
    assert main(["train", *common, "optim.max_steps=1", "checkpoint.every=0"]) == 0
    assert [m["step"] for m in read_jsonl(tmp_path / "out" / "rl" / "metrics.jsonl")] == [1]
    assert main(["eval", *common, f"eval.model={run['student']}"]) == 0
    assert len(read_jsonl(tmp_path / "out" / "eval" / model_folder_name(str(run["student"])) / "samples.jsonl")) == 4


def test_foundations_feed_vold_loss(tiny):
    """Batch -> rollout -> rewards/advantages -> student and teacher hidden states -> vold_loss -> gradients."""
    student, processor, tokenizer = tiny["student"], tiny["processor"], tiny["tokenizer"]
    teacher = make_tiny_teacher(tokenizer)
    batch = build_prompt_batch(tiny["examples"], processor, tokenizer)
    rollout = HFRolloutEngine(student, processor, vocab_size=8).generate(batch, G, 8, seed=0, return_logprobs=True)
    total, per_function = RewardFunctions(["accuracy", "format"])(
        prompts=[p for p in batch.prompts for _ in range(G)], completions=rollout.texts, **batch.reward_columns(G))
    advantages = group_advantages(total, G)
    distill_mask = 1.0 - per_function["accuracy"]  # distil on wrong answers only

    ids, mask = rollout.completion_ids, rollout.completion_mask
    student.train()
    student_prompts = repeat_inputs(batch.student_inputs, batch.num_images, G)
    teacher_prompts = repeat_inputs(batch.teacher_inputs, [0] * len(batch), G)
    s_hidden = completion_hidden_states(student, student_prompts, ids, mask)
    with torch.no_grad():
        t_hidden = completion_hidden_states(teacher, teacher_prompts, ids, mask)
    loss, metrics = vold_loss(
        s_hidden, lm_head_weight(student), ids, advantages, rollout.logprobs, mask,
        teacher_hidden=t_hidden, teacher_weight=lm_head_weight(teacher), distill_coef=0.1, distill_estimator="k2",
        distill_mask=distill_mask, vocab_size=8,
    )
    student.zero_grad()
    loss.backward()
    assert torch.isfinite(loss) and metrics["distill_kl"] > 0
    assert metrics["ratio"].item() == pytest.approx(1.0, abs=1e-4)  # on-policy: rollout logprobs == recomputed
    assert student.lm_head.weight.grad is not None and student.lm_head.weight.grad.abs().sum() > 0
    assert student.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0  # through the images
    student.zero_grad()
    student.eval()


def test_diverged_weights_are_named_not_a_multinomial_traceback(tiny):
    """`vold train optim.lr=1e30` ended at step 2 in torch's raw "RuntimeError: probability tensor contains either
    inf, nan or element < 0" from generate (found by the new-user pass). The engine now says what it means."""
    import copy

    from vold.distributed import Runtime

    model, tokenizer = copy.deepcopy(tiny["llama"]), tiny["tokenizer"]
    batch = build_prompt_batch([Example("1+1?", "2")], tokenizer)
    with torch.no_grad():
        lm_head_weight(model).fill_(float("inf"))
    engine = make_rollout_engine(RolloutConfig(engine="hf"), model, tokenizer, vocab_size=8)
    with pytest.raises(ValueError, match="NaN/inf token probabilities.*lower the learning rate"):
        engine.generate(batch, 2, max_new_tokens=3, seed=0)

    # the update that would have written NaN weights is refused, and leaves the weights as they were
    model = copy.deepcopy(tiny["llama"])
    rt = Runtime.single(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(ValueError, match="gradient norm is nan .*nothing was applied"):
        rt.step(optimizer, scheduler, 1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
