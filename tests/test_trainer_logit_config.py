"""The trainer reads each model's logit transform from its config (``vold.models.logit_options``): Gemma-2's
``final_logit_softcapping``, Cohere's ``logit_scale`` and Granite's ``logits_scaling``. The fused passes
(``vold.scoring.score``, ``response_logprobs``, ``vold.rl.compute_loss``) then give the log-probs of the model's own
forward (``model(...).logits``, which applies the cap / the scale), checked on tiny random Gemma-2, Cohere and
Granite models."""

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from vold.config import load_config
from vold.kernels import fused_linear_logprobs
from vold.models import completion_hidden_states, lm_head_weight, logit_options, text_position_ids
from vold.rl import Experience, compute_loss
from vold.scoring import response_logprobs, score
from vold.tiny import make_tiny_student, make_tiny_text_student, make_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 16}


def gemma2(vocab: int, cap: float = 0.05) -> torch.nn.Module:
    """A Gemma-2 whose logits reach the cap (|z| ~ 0.1 at this scale, so a cap of 0.05 bends them a lot)."""
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=vocab, final_logit_softcapping=cap, attn_logit_softcapping=None,
                          sliding_window=64, query_pre_attn_scalar=16, **SIZES)
    return Gemma2ForCausalLM(config).eval()


def cohere(vocab: int, scale: float = 20.0) -> torch.nn.Module:
    torch.manual_seed(1)
    return CohereForCausalLM(CohereConfig(vocab_size=vocab, logit_scale=scale, **SIZES)).eval()


def granite(vocab: int, scaling: float = 0.05) -> torch.nn.Module:
    """A Granite, whose forward divides the logits by ``logits_scaling`` (0.05: the logits grow 20x)."""
    torch.manual_seed(3)
    return GraniteForCausalLM(GraniteConfig(vocab_size=vocab, logits_scaling=scaling, **SIZES)).eval()


BUILDS, BUILD_IDS = [gemma2, cohere, granite], ["gemma2_softcap", "cohere_logit_scale", "granite_logits_scaling"]


@pytest.fixture(scope="module")
def tokens():
    torch.manual_seed(2)
    tokenizer = make_tiny_tokenizer()
    vocab = len(tokenizer)
    prompt_ids = torch.randint(10, vocab, (3, 5))
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[1, :2] = 0  # left padding
    ids = torch.randint(10, vocab, (3, 4))
    mask = torch.ones_like(ids)
    mask[2, 3] = 0
    return {"tokenizer": tokenizer, "vocab": vocab, "prompts": {"input_ids": prompt_ids, "attention_mask": prompt_mask},
            "ids": ids, "mask": mask}


def forward_logprobs(model: torch.nn.Module, tokens: dict, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(model(...).logits / T)`` of the completion tokens ``[B, T]``: the model's own forward."""
    prompts, ids = tokens["prompts"], tokens["ids"]
    full_ids = torch.cat([prompts["input_ids"], ids], 1)
    full_mask = torch.cat([prompts["attention_mask"], tokens["mask"]], 1)
    with torch.no_grad():
        logits = model(input_ids=full_ids, attention_mask=full_mask, position_ids=text_position_ids(full_mask)).logits
    logits = logits[:, prompts["input_ids"].shape[1] - 1:-1].double() / temperature
    return logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def test_logit_options_read_from_the_config(tokens):
    vocab = tokens["vocab"]
    assert logit_options(gemma2(vocab, 30.0)) == {"final_logit_softcapping": 30.0}
    assert logit_options(cohere(vocab, 0.0625), "student_") == {"student_logit_scale": 0.0625}
    assert logit_options(make_tiny_text_student(tokens["tokenizer"]), "teacher_") == {}  # Llama: none
    assert logit_options(make_tiny_student(tokens["tokenizer"])) == {}  # Qwen2.5-VL (text_config): none
    uncapped = Gemma2Config(vocab_size=vocab, final_logit_softcapping=None, **SIZES)
    assert logit_options(Gemma2ForCausalLM(uncapped)) == {}
    # Granite divides its logits by logits_scaling (vold ignored it: log-probs of another distribution)
    assert logit_options(granite(vocab, 16.0), "student_") == {"student_logit_scale": 1 / 16}
    assert logit_options(granite(vocab, 1.0)) == {}


def test_an_unknown_head_multiplier_is_refused(tokens):
    """A language model whose config sets a MuP head multiplier vold has no rule for: a ValueError naming the key
    (multiply or divide is the model's choice), not silently the untransformed log-probs."""
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tokens["vocab"], **SIZES))
    model.config.logits_scaling = 8.0
    with pytest.raises(ValueError, match=r"config sets logits_scaling=8.*multiplies or divides"):
        logit_options(model)
    model.config.logits_scaling = 1.0  # the identity: nothing to apply
    assert logit_options(model) == {}


@pytest.mark.parametrize("build", BUILDS, ids=BUILD_IDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_score_gives_the_models_own_logprobs(tokens, build, temperature):
    model = build(tokens["vocab"])
    expected = forward_logprobs(model, tokens, temperature) * tokens["mask"]
    got = score(model, tokens["prompts"], [0] * 3, tokens["ids"], tokens["mask"], micro_size=2,
                vocab_size=None, temperature=temperature)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-5)
    # the untransformed head's log-probs are far from them: the test sees the cap / the scale
    with torch.no_grad():
        hidden = completion_hidden_states(model, tokens["prompts"], tokens["ids"], tokens["mask"])
        plain = fused_linear_logprobs(hidden, lm_head_weight(model), tokens["ids"], temperature=temperature)
    assert ((plain.double() - expected) * tokens["mask"]).abs().max() > 1e-2


@pytest.mark.parametrize("build", BUILDS, ids=BUILD_IDS)
def test_response_logprobs_and_its_gradient_follow_the_transform(tokens, build):
    model = build(tokens["vocab"])
    batch = {"prompt_inputs": tokens["prompts"], "ids": tokens["ids"], "mask": tokens["mask"]}
    logp, mask = response_logprobs(model, batch)
    expected = forward_logprobs(model, tokens)
    torch.testing.assert_close((logp * mask).double(), expected * mask, atol=2e-5, rtol=1e-5)
    # the gradient of the NLL reaches the head through the transform: equal to autograd through model(...).logits
    (-(logp * mask).sum()).backward()
    head = model.get_output_embeddings().weight
    fused_grad = head.grad.clone()
    model.zero_grad()
    prompts, ids = tokens["prompts"], tokens["ids"]
    full_ids = torch.cat([prompts["input_ids"], ids], 1)
    full_mask = torch.cat([prompts["attention_mask"], mask], 1)
    logits = model(input_ids=full_ids, attention_mask=full_mask, position_ids=text_position_ids(full_mask)).logits
    ref = logits[:, prompts["input_ids"].shape[1] - 1:-1].log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    (-(ref * mask).sum()).backward()
    torch.testing.assert_close(fused_grad, head.grad, atol=1e-5, rtol=1e-4)


def test_compute_loss_full_kl_uses_both_models_transforms(tokens):
    """Exact reverse KL(student || teacher) of a Cohere student and a soft-capped Gemma-2 teacher, from
    ``compute_loss`` (the trainer's micro-batch loss): equal to the KL of the two models' own log-softmaxes."""
    student, teacher = cohere(tokens["vocab"]), gemma2(tokens["vocab"])
    n = tokens["ids"].shape[0]
    cfg = load_config(None, ["loss.distill_coef=1.0", "loss.distill_estimator=full", "loss.loss_type=dapo"])
    teacher_hidden = score(teacher, tokens["prompts"], [0] * n, tokens["ids"], tokens["mask"], micro_size=n,
                           vocab_size=None, keep_hidden=True)
    exp = Experience(prompt_inputs=tokens["prompts"], num_images=[0] * n, completion_ids=tokens["ids"],
                     completion_mask=tokens["mask"], advantages=torch.zeros(n), distill_mask=torch.ones(n),
                     teacher_hidden=teacher_hidden)
    head = teacher.get_output_embeddings().weight
    _, metrics = compute_loss(student, exp, cfg.loss, teacher_head=(head, None),
                              teacher_logits=logit_options(teacher, "teacher_"))

    def all_logprobs(model):
        prompts, ids, mask = tokens["prompts"], tokens["ids"], tokens["mask"]
        full_ids = torch.cat([prompts["input_ids"], ids], 1)
        full_mask = torch.cat([prompts["attention_mask"], mask], 1)
        with torch.no_grad():
            logits = model(input_ids=full_ids, attention_mask=full_mask,
                           position_ids=text_position_ids(full_mask)).logits
        return logits[:, prompts["input_ids"].shape[1] - 1:-1].double().log_softmax(-1)

    p, q = all_logprobs(student), all_logprobs(teacher)
    kl = (p.exp() * (p - q)).sum(-1)  # [N, T]
    mask = tokens["mask"].double()
    expected = (kl * mask).sum() / mask.sum()
    torch.testing.assert_close(torch.as_tensor(float(metrics["distill_kl"]), dtype=torch.float64), expected,
                               atol=2e-5, rtol=1e-4)
    # and not the KL of the untransformed logits: the transforms matter at these scales
    _, plain = compute_loss(student, exp, cfg.loss, teacher_head=(head, None))
    assert abs(float(plain["distill_kl"]) - float(expected)) > 1e-3
