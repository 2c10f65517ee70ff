"""Sequence packing (``vold.packing``): one row of real tokens per micro-batch gives the padded run's hidden
states, losses and gradients (sdpa's block-diagonal mask on the CPU; flash-attn varlen is the GPU path).

Students: a tiny Llama (text), a tiny Qwen3 (the teacher's architecture) and a tiny Qwen2.5-VL (M-RoPE) with
text-only rows and with image rows (one and two images per prompt, and none, in one micro-batch).
"""

from __future__ import annotations

import pytest
import torch

from vold.config import load_config
from vold.data import Example, build_prompt_batch, select_rows
from vold.models import completion_hidden_states, lm_head_weight
from vold.packing import pack, packed_completion_hidden_states, unpack
from vold.rl import Experience, compute_loss, score
from vold.sft import sft_loss
from vold.testing import (
    make_tiny_images,
    make_tiny_processor,
    make_tiny_student,
    make_tiny_teacher,
    make_tiny_text_student,
    make_tiny_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_thread")

G = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tokenizer = make_tiny_tokenizer()
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, image in enumerate(make_tiny_images(3)):
        image.save(root / f"{i}.png")
        paths.append(str(root / f"{i}.png"))
    text = [Example("1+2=?", "3"), Example("a much longer prompt: 33+4=?", "37"), Example("x", "1")]
    images = [Example("What is 2+2?", "4", images=[paths[0]]), Example("no image here 5+5", "10"),
              Example("Compare them.", "left", images=paths[1:])]
    return {"tokenizer": tokenizer, "processor": make_tiny_processor(tokenizer), "text": text, "images": images}


def rollout_rows(model, processor, examples, seed=0):
    """Prompt inputs (G rows per prompt) and ragged right-padded completions (one of length 1)."""
    batch = build_prompt_batch(examples, processor)
    rows = [i for i in range(len(batch)) for _ in range(G)]
    inputs = select_rows(batch.student_inputs, batch.num_images, rows)
    g = torch.Generator().manual_seed(seed)
    n, t = len(rows), 8
    ids = torch.randint(10, 90, (n, t), generator=g)
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    lengths[1] = 1
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    return inputs, [batch.num_images[i] for i in rows], ids * mask, mask


def cases(tiny):
    tok = tiny["tokenizer"]
    return [("llama", make_tiny_text_student(tok), tok, tiny["text"]),
            ("qwen3", make_tiny_teacher(tok), tok, tiny["text"]),
            ("qwen2.5-vl text", make_tiny_student(tok), tiny["processor"], tiny["text"]),
            ("qwen2.5-vl images", make_tiny_student(tok), tiny["processor"], tiny["images"])]


def test_packed_hidden_states_are_the_padded_ones(tiny):
    for name, model, processor, examples in cases(tiny):
        inputs, _, ids, mask = rollout_rows(model, processor, examples)
        with torch.no_grad():
            padded = completion_hidden_states(model, inputs, ids, mask)
            packed, cu_seqlens, select = packed_completion_hidden_states(model, inputs, ids, mask)
        assert cu_seqlens.tolist() == [0, *mask.sum(1).cumsum(0).tolist()]
        assert packed.shape == (int(mask.sum()), padded.shape[-1])
        torch.testing.assert_close(packed, padded[select], rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(unpack(packed, select), padded * mask[..., None], rtol=1e-5, atol=1e-5, msg=name)


def test_packing_refuses_holes_in_the_completion_mask(tiny):
    model = make_tiny_text_student(tiny["tokenizer"])
    inputs, _, ids, mask = rollout_rows(model, tiny["tokenizer"], tiny["text"])
    mask[0, 0] = 0  # a completion that starts after a masked token: no real token predicts its first one
    with pytest.raises(ValueError, match="prefix"):
        packed_completion_hidden_states(model, inputs, ids, mask)


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got, want, name):
    assert got.keys() == want.keys(), name
    scale = max(float(g.abs().max()) for g in want.values())
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst <= 2e-5 * scale, f"{name}: max|g_packed - g_padded| = {worst:.2e} vs max|g| = {scale:.2e}"
    return worst / scale


@pytest.mark.parametrize("loss_type,estimator", [("dapo", "k2"), ("grpo", "full"), ("dr_grpo", "k3"),
                                                 ("bnpo", "k2")])
def test_packed_policy_loss_and_gradients_equal_padded(tiny, loss_type, estimator):
    tok = tiny["tokenizer"]
    teacher = make_tiny_teacher(tok, seed=1)
    lc = load_config(None, [f"loss.loss_type={loss_type}", f"loss.distill_estimator={estimator}",
                            "loss.ref_kl_coef=0.05", "loss.entropy_coef=0.01"]).loss
    worst = 0.0
    for name, model, processor, examples in cases(tiny)[::2] + cases(tiny)[3:]:
        model.train()
        inputs, num_images, ids, mask = rollout_rows(model, processor, examples, seed=3)
        n = ids.shape[0]
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            t_hidden = completion_hidden_states(teacher, inputs, ids, mask)  # any frozen states will do
        exp = Experience(prompt_inputs=inputs, num_images=num_images, completion_ids=ids, completion_mask=mask,
                         advantages=torch.randn(n, generator=g), distill_mask=torch.rand(n, generator=g),
                         old_logprobs=-(torch.rand(ids.shape, generator=g) + 4) * mask,
                         ref_logprobs=-(torch.rand(ids.shape, generator=g) + 4) * mask,
                         teacher_logprobs=-(torch.rand(ids.shape, generator=g) + 4) * mask, teacher_hidden=t_hidden)
        kwargs = dict(teacher_head=(lm_head_weight(teacher), None), temperature=0.9, max_completion_length=12,
                      token_normalizer=30.0 if loss_type == "dapo" else None)
        results = {}
        for packing in (False, True):
            loss, metrics = compute_loss(model, exp, lc, packing=packing, **kwargs)
            results[packing] = (loss.detach(), {k: v.clone() for k, v in metrics.items()}, grads(model, loss))
        (l0, m0, g0), (l1, m1, g1) = results[False], results[True]
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-7, msg=name)
        for key in m0:
            torch.testing.assert_close(m1[key], m0[key], rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
        worst = max(worst, assert_same_grads(g1, g0, f"{name} {loss_type} {estimator}"))
    print(f"{loss_type}/{estimator}: max|g_packed - g_padded| / max|g| = {worst:.1e}")


def test_packed_sft_loss_and_scores_equal_padded(tiny):
    for name, model, processor, examples in cases(tiny)[::3]:
        model.train()
        inputs, num_images, ids, mask = rollout_rows(model, processor, examples, seed=7)
        batch = {"prompt_inputs": inputs, "ids": ids, "mask": mask}
        results = {}
        for packing in (False, True):
            loss = sft_loss(model, batch, normalizer=float(mask.sum()), packing=packing)
            results[packing] = (loss.detach(), grads(model, loss))
        torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-7, msg=name)
        assert_same_grads(results[True][1], results[False][1], f"sft {name}")
        model.eval()
        for keep_hidden in (False, True):
            padded, packed = (score(model, inputs, num_images, ids, mask, micro_size=3, vocab_size=None,
                                    temperature=0.8, keep_hidden=keep_hidden, packing=p) for p in (False, True))
            if keep_hidden:
                padded = padded * mask[..., None]
            torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5, msg=f"score {name} {keep_hidden}")
    assert pack(None, mask) is None
