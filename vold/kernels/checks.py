"""Argument validation shared by every public function and both engines.

Every check raises ``ValueError`` (bad shape, value or option) or ``TypeError`` (bad dtype) with the
argument's name in the message, so a caller never gets a silent wrong number.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch

from .common import LogitTransform

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
IMPLS = ("auto", "torch", "torch_compile", "triton")


def check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


def check_float(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp32/bf16/fp16/fp64), got {tensor.dtype}")


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise if ``tensor`` holds NaN or inf (one reduction; skipped while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or inf")


def check_weights(name: str, tensor: torch.Tensor, *, finite: bool) -> None:
    """Raise if a weight tensor (``mask``, ``distill_mask``) holds a negative value; with ``finite``, NaN/inf too.

    Weights are 0/1 or fractional in ``[0, inf)``: a negative weight flips the sign of a token's loss. One
    reduction and one host sync for both conditions (as :func:`check_finite`); skipped while torch.compile traces.
    A NaN passes the sign test (``NaN < 0`` is False): it is the finite check's, when asked for.
    """
    if torch.compiler.is_compiling() or tensor.dtype == torch.bool:
        return
    finite = finite and tensor.is_floating_point()
    bad = tensor < 0
    if finite:
        bad = bad | ~torch.isfinite(tensor)
    if not bool(bad.any()):
        return
    if finite:
        check_finite(name, tensor)  # NaN/inf: that message
    raise ValueError(f"{name} must be >= 0 (token weights: 0/1 or fractional), got a negative value "
                     f"(min {float(tensor.min()):g})")


def check_linear_head(
    prefix: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    finite: bool,
) -> None:
    """``hidden [..., H]``, ``weight [V, H]``, ``bias [V]`` of one model, same float dtype and device."""
    check_float(f"{prefix}hidden", hidden)
    check_float(f"{prefix}weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{prefix}weight must be [V, H], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{prefix}hidden's last dim ({tuple(hidden.shape)}) must equal {prefix}weight's H "
            f"({tuple(weight.shape)})"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{prefix}hidden dtype {hidden.dtype} != {prefix}weight dtype {weight.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"{prefix}hidden is on {hidden.device} but {prefix}weight on {weight.device}")
    if bias is not None:
        check_float(f"{prefix}bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{prefix}bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{prefix}bias dtype {bias.dtype} != {prefix}weight dtype {weight.dtype}")
    if finite:
        check_finite(f"{prefix}hidden", hidden)


def check_targets(targets: torch.Tensor, leading: torch.Size, vocab_size: int, name: str = "targets") -> None:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must be an integer tensor of token ids, got {targets.dtype}")
    if targets.shape != leading:
        raise ValueError(f"{name} shape {tuple(targets.shape)} must match the hidden states' tokens {tuple(leading)}")
    if targets.numel() and not torch.compiler.is_compiling():
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} must lie in [0, {vocab_size}), got values in [{lo}, {hi}]")


def check_same_shape(name: str, tensor: torch.Tensor | None, shape: torch.Size, *, finite: bool = False) -> None:
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.shape != shape:
        raise ValueError(f"{name} shape {tuple(tensor.shape)} must be {tuple(shape)}")
    if finite and tensor.is_floating_point():
        check_finite(name, tensor)


def resolve_vocab(student_weight: torch.Tensor, teacher_weight: torch.Tensor | None, vocab_size: int | None) -> int:
    """The number of vocabulary rows compared. Different V without ``vocab_size=`` is an error."""
    v_student = student_weight.shape[0]
    if teacher_weight is None:
        v = v_student if vocab_size is None else vocab_size
        if not 0 < v <= v_student:
            raise ValueError(f"vocab_size={vocab_size} must be in [1, student V={v_student}]")
        return v
    v_teacher = teacher_weight.shape[0]
    if vocab_size is None:
        if v_student != v_teacher:
            raise ValueError(
                f"vocabulary mismatch: student_weight has V={v_student} rows, teacher_weight V={v_teacher}; "
                f"pass vocab_size= (e.g. {min(v_student, v_teacher)}) to compare over the common rows"
            )
        return v_student
    if not 0 < vocab_size <= min(v_student, v_teacher):
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, min(student V={v_student}, teacher V={v_teacher})]"
        )
    return vocab_size


def check_chunk_size(chunk_size: int | None) -> None:
    """``chunk_size`` is None (the default size) or a positive int: 0 or a negative count used to fall back to the
    default or to 1 row, or (negative, in ``fused_linear_divergence``) to skip the chunk loop and return zeros."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be None or a positive int (rows per chunk), got {chunk_size!r}")


def _bound_text(gt: float | None, ge: float | None, lt: float | None, le: float | None) -> str:
    low = f"({gt:g}" if gt is not None else f"[{ge:g}" if ge is not None else None
    high = f"{lt:g})" if lt is not None else f"{le:g}]" if le is not None else None
    if low and high:
        return f"in {low}, {high}"
    if low:
        return f"{'>' if gt is not None else '>='} {low[1:]}"
    return f"{'<' if lt is not None else '<='} {high[:-1]}"


def check_number(name: str, value: object, *, gt: float | None = None, ge: float | None = None,
                 lt: float | None = None, le: float | None = None, note: str = "") -> Any:
    """A scalar option: a finite real number (a Python/NumPy number or a one-element real tensor) within the bounds.

    ``TypeError`` naming ``name`` for anything else (a string, a bool, a list, a multi-element tensor: the bare
    comparison used to fail with "'>' not supported between 'str' and 'int'", naming nothing); ``ValueError``
    ``"{name} must be {range}{note}, got {value}"`` outside the bounds (NaN included: it fails every comparison),
    then ``"{name} must be finite"`` for +-inf (``temperature=inf`` gave a uniform distribution, an inf
    ``token_normalizer`` a zero loss, silently). A tensor is read once (one host sync); skipped while
    torch.compile traces.

    Returns the value as a Python float, which callers use in its place: a ``[1]``-shaped tensor option made
    ``clamp`` fail and an fp64 tensor one made the loss fp64. While torch.compile traces, the value itself.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a tensor of shape {tuple(value.shape)} "
                            f"and dtype {value.dtype}")
        if torch.compiler.is_compiling():
            return value
        number = float(value.detach())
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    else:
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    inside = ((gt is None or number > gt) and (ge is None or number >= ge)
              and (lt is None or number < lt) and (le is None or number <= le))
    if not inside:
        raise ValueError(f"{name} must be {_bound_text(gt, ge, lt, le)}{note}, got {value}")
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value}")
    return number


def logit_transform(prefix: str, logit_scale: float, final_logit_softcapping: float | None) -> LogitTransform:
    """Validated ``LogitTransform``: ``{prefix}logit_scale`` finite and > 0, ``{prefix}final_logit_softcapping``
    None or finite and > 0, each a real number or one-element tensor (``checks.check_number``: ``ValueError``
    naming the argument otherwise, ``TypeError`` for a non-number)."""
    check_number(f"{prefix}logit_scale", logit_scale, gt=0)
    cap = final_logit_softcapping
    if cap is not None:
        check_number(f"{prefix}final_logit_softcapping", cap, gt=0, note=" or None")
    return LogitTransform(float(logit_scale), None if cap is None else float(cap))


def check_finite_scalar(name: str, value: float) -> Any:
    """A loss coefficient must be a finite number: a NaN or inf one makes the loss NaN/inf silently. Returns it
    as ``check_number`` does."""
    return check_number(name, value)


def check_positive(name: str, value: float) -> Any:
    """``value`` finite and > 0 (``temperature``, ``token_normalizer``); returned as ``check_number`` does."""
    return check_number(name, value, gt=0)
