"""One GRPO + on-policy distillation update in plain PyTorch with ``vold.kernels.vold_loss``.

Runs as written, on the CPU in seconds, with tiny random Llama models (no download):
``python examples/plain_pytorch.py``. Every tensor the loss takes is built here; the shapes:

- ``input_ids [N, T]``: N = B prompts x G completions, prompt then completion (then padding after EOS);
- targets ``input_ids[:, 1:]`` and the hidden states ``[:, :-1]`` that predict them: ``[N, T-1]``;
- ``completion_mask [N, T-1]``: 1 where the *target* is a completion token (EOS included), aligned with
  ``input_ids[:, 1:]``, 0 on the prompt and on the padding after EOS;
- ``advantages [N]``: group-normalised rewards; ``distill_mask [N]``: w_i = 1 - r_i (distil on wrong ones);
- ``old_logprobs [N, T-1]``: the sampling policy's log-probs, needed when one rollout batch feeds several
  updates (PPO epochs/minibatches); ``None`` means on-policy (ratio 1).

Tied embeddings: the student here ties its lm_head to its input embedding (as SmolLM2 and small Qwen models do),
so ``student.lm_head.weight`` IS ``student.model.embed_tokens.weight`` and its ``.grad`` after backward holds the
head's gradient plus the embedding's. That is the right gradient for the optimizer; it is not the head's alone
(compare head gradients only on untied models, or against a reference built with the same tying).
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vold.kernels import fused_linear_logprobs, vold_loss

torch.manual_seed(0)
VOCAB, PAD, EOS = 128, 0, 1  # one vocabulary shared by student and teacher (the distillation needs it)
B, G, PROMPT, NEW = 2, 4, 6, 10


def tiny_llama(hidden: int, tied: bool) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=tied, pad_token_id=PAD, eos_token_id=EOS))


student = tiny_llama(64, tied=True)
teacher = tiny_llama(96, tied=False).eval().requires_grad_(False)  # another hidden size is fine
optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)

# 1. rollouts: G sampled completions per prompt (the prompts have one length here, so no left padding)
prompts = torch.randint(2, VOCAB, (B, PROMPT)).repeat_interleave(G, dim=0)  # [N, P], prompt-major
with torch.no_grad():
    input_ids = student.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                 max_new_tokens=NEW, pad_token_id=PAD, eos_token_id=EOS)  # [N, T]
completion = input_ids[:, PROMPT:]  # [N, Tc]
eos = completion == EOS
in_completion = (eos.long().cumsum(1) - eos.long()) == 0  # up to and including the first EOS
attention_mask = torch.cat([torch.ones_like(prompts), in_completion.long()], dim=1)  # [N, T]
completion_mask = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1)  # [N, T-1], aligned with targets
completion_mask[:, PROMPT - 1:] = in_completion.float()  # target t+1 = completion token t+1-P
targets = input_ids[:, 1:]  # [N, T-1]

# 2. rewards -> group advantages and distillation weights (a toy verifier: "mostly even tokens")
even = ((completion % 2 == 0) & in_completion).sum(1) / in_completion.sum(1).clamp(min=1)
correct = (even > 0.5).float()  # r_i in {0, 1}
grouped = correct.view(B, G)
advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)  # [N]
distill_mask = 1.0 - correct  # the paper distils on wrong rollouts only

# 3. hidden states (never [N, V] logits): the student's with grad, the teacher's without, same token ids
hidden = student.model(input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]  # [N, T-1, 64]
with torch.no_grad():
    # the sampling policy's log-probs; with a single update per batch pass old_logprobs=None instead
    old_logprobs = fused_linear_logprobs(hidden.detach(), student.lm_head.weight.detach(), targets)  # [N, T-1]
    teacher_hidden = teacher.model(input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]

# 4. the fused loss: GRPO (dapo normalisation) + 0.1 * w_i * exact reverse KL(student || teacher) per token
loss, metrics = vold_loss(
    hidden, student.lm_head.weight, targets, advantages, old_logprobs, completion_mask,
    teacher_hidden=teacher_hidden, teacher_weight=teacher.lm_head.weight,
    distill_coef=0.1, distill_estimator="full", distill_mask=distill_mask,
)
loss.backward()
assert student.lm_head.weight is student.model.embed_tokens.weight  # tied: one tensor, one .grad (see above)
optimizer.step()
optimizer.zero_grad()
print(f"loss {loss.item():.4f}  " + "  ".join(f"{k} {float(v):.4f}" for k, v in sorted(metrics.items()) if k != "loss"))
