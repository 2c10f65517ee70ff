"""The inputs of one shape: the same tensors in every process for the same seed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vold.kernels.reference import ref_logprobs

from .config import Settings, Shape


@torch.no_grad()
def chunked_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """log softmax(hidden @ weight^T)[target] per row, fp32 ``[N]``, ``chunk`` rows at a time (input making:
    ``vold.kernels.reference.ref_logprobs`` in the working precision, on row slices)."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        out[rows] = ref_logprobs(hidden[rows], weight, targets[rows], dtype=None)[0]
    return out


@dataclass
class Inputs:
    """One shape's tensors, padded layout ``[B, T]`` with ``B * T = N``; student tensors are leaves."""

    s_hidden: torch.Tensor  # [B, T, H], requires grad
    s_weight: torch.Tensor  # [V, H], requires grad
    t_hidden: torch.Tensor  # [B, T, Ht]
    t_weight: torch.Tensor  # [V, Ht]
    targets: torch.Tensor  # [B, T] int64
    mask: torch.Tensor  # [B, T] float 0/1
    advantages: torch.Tensor  # [B]
    old_logprobs: torch.Tensor  # [B, T] fp32
    teacher_logprobs: torch.Tensor | None  # [B, T] fp32, for "k2"
    n_active: int

    def zero_grads(self) -> None:
        self.s_hidden.grad = None
        self.s_weight.grad = None

    def grad_bytes(self) -> int:
        """Size of the gradients every implementation must produce (dX and dW)."""
        return (self.s_hidden.numel() + self.s_weight.numel()) * self.s_hidden.element_size()


def layout(n: int, seq_len: int) -> tuple[int, int]:
    """``(B, T)`` with ``B * T = n``: sequences of ``seq_len`` tokens when it divides ``n``, else one."""
    t = min(seq_len, n)
    return (n // t, t) if n % t == 0 else (1, n)


def active_tokens(n: int, s: Settings) -> int:
    """Unmasked tokens of the ``layout``: the first ``mask_fraction`` of each sequence."""
    b, t = layout(n, s.seq_len)
    return b * max(1, round(t * s.mask_fraction))


def make_inputs(shape: Shape, s: Settings, *, teacher_logprobs: bool) -> Inputs:
    """Deterministic inputs (same ``seed`` -> same tensors in every process); logits have std ~2."""
    device, dtype = torch.device(s.device), s.torch_dtype
    g = torch.Generator(device=device).manual_seed(s.seed)
    b, t = layout(shape.n, s.seq_len)
    h, ht, v = shape.h, shape.teacher_h, shape.v

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*size, generator=g, device=device, dtype=dtype).mul_(scale)

    s_hidden = randn(b, t, h)
    s_weight = randn(v, h, scale=2.0 / math.sqrt(h))
    t_hidden = randn(b, t, ht)
    t_weight = randn(v, ht, scale=2.0 / math.sqrt(ht))
    targets = torch.randint(0, v, (b, t), generator=g, device=device)
    advantages = torch.randn(b, generator=g, device=device)
    noise = 0.2 * torch.randn(b, t, generator=g, device=device)
    active_len = active_tokens(shape.n, s) // b
    mask = (torch.arange(t, device=device) < active_len).float().expand(b, t).contiguous()
    chunk = max(1, (1 << 23) // v)
    logp = chunked_logprobs(s_hidden.view(-1, h), s_weight, targets.view(-1), chunk).view(b, t)
    t_logp = None
    if teacher_logprobs:
        t_logp = chunked_logprobs(t_hidden.view(-1, ht), t_weight, targets.view(-1), chunk).view(b, t)
    return Inputs(
        s_hidden=s_hidden.requires_grad_(True), s_weight=s_weight.requires_grad_(True), t_hidden=t_hidden,
        t_weight=t_weight, targets=targets, mask=mask, advantages=advantages, old_logprobs=logp + noise,
        teacher_logprobs=t_logp, n_active=active_tokens(shape.n, s),
    )
