"""Rewards and group-normalised advantages.

Reward functions follow TRL's signature: ``fn(prompts, completions, **columns) -> list[float | None]``
with one entry per completion and the dataset columns (``answer``, ``data_source``, ...) as
keyword lists aligned with ``completions``; ``None`` means "does not apply" (ignored when combining).
Built-ins: ``accuracy`` (math equivalence of the last ``\\boxed{}`` with ``answer``, via math-verify),
``format`` (a non-empty ``\\boxed{}`` is present) and ``soft_overlong`` (DAPO's length penalty, from the
``completion_ids`` that ``vold train`` passes as TRL does). Plugins are named ``"module:function"``.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

RewardFunction = Callable[..., list[float | None]]

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, nested braces included.

    ``\\boxed 5`` (no braces) gives ``"5"``; an unclosed box or no box gives None.
    """
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    while start >= 0:
        cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
        i = start + len(cmd)
        if i < len(text) and text[i] == " ":  # "\boxed 5"
            match = re.match(r" +([^\s$]+)", text[i:])
            if match:
                return match.group(1)
        elif i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j]
            return None  # unclosed
        # "\boxedfoo" is another command: look further back
        start = max(text.rfind(c, 0, start) for c in _BOX_COMMANDS)
    return None


def normalize_answer(text: str) -> str:
    """Loose string form for the exact-match fallback: no spaces, ``$``, ``\\text{}``/``\\mathrm{}``, final dot."""
    text = re.sub(r"\\(?:text|mathrm|textbf|mbox)\{([^{}]*)\}", r"\1", text)
    text = text.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    text = text.replace("dfrac", "frac").replace("tfrac", "frac").replace("$", "")
    text = re.sub(r"\s+", "", text).rstrip(".")
    return text.lower()


def _timeout() -> int | None:
    # math-verify's timeouts use signal.alarm, which only works in the main thread
    return 5 if threading.current_thread() is threading.main_thread() else None


def math_equal(prediction: str, reference: str) -> bool:
    """True when ``prediction`` and ``reference`` are the same mathematical answer.

    Both are parsed by math-verify (each wrapped as ``\\boxed{...}`` unless already boxed) and
    compared with ``verify``; when either side does not parse, the normalised strings are compared.
    """
    from math_verify import parse, verify

    def parsed(text: str) -> list:
        boxed = text if "\\boxed" in text else "\\boxed{" + text + "}"
        try:
            return parse(boxed, parsing_timeout=_timeout())
        except Exception:  # noqa: BLE001 - a parser crash means "could not parse"
            return []

    gold, pred = parsed(reference), parsed(prediction)
    if gold and pred:
        try:
            if verify(gold, pred, timeout_seconds=_timeout()):
                return True
        except Exception:  # noqa: BLE001
            pass
    return normalize_answer(prediction) == normalize_answer(extract_boxed(reference) or reference)


def accuracy_reward(completions: Sequence[str], answer: Sequence[str], **_: Any) -> list[float | None]:
    """1.0 when the completion's last ``\\boxed{}`` equals ``answer`` mathematically, else 0.0."""
    if len(answer) != len(completions):
        raise ValueError(f"accuracy_reward: {len(completions)} completions but {len(answer)} answers")
    rewards: list[float | None] = []
    for completion, reference in zip(completions, answer, strict=True):
        if reference is None:
            rewards.append(None)
            continue
        boxed = extract_boxed(completion)
        rewards.append(1.0 if boxed is not None and boxed.strip() and math_equal(boxed, str(reference)) else 0.0)
    return rewards


def format_reward(completions: Sequence[str], **_: Any) -> list[float | None]:
    """1.0 when the completion has a non-empty ``\\boxed{}`` answer, else 0.0."""
    return [1.0 if (extract_boxed(c) or "").strip() else 0.0 for c in completions]


def soft_overlong_penalty(lengths: Sequence[int], *, max_length: int, cache: int) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, §3.4, eq. 13) of completion lengths
    ``|y|`` in tokens, with ``L_max = max_length`` and ``L_cache = cache``::

        R(y) = 0                                       |y| <= L_max - L_cache
             = ((L_max - L_cache) - |y|) / L_cache     L_max - L_cache < |y| <= L_max
             = -1                                      |y| > L_max

    added to the correctness reward. Raises ``ValueError`` unless ``0 < cache <= max_length``."""
    if not 0 < cache <= max_length:
        raise ValueError(f"soft overlong penalty: need 0 < cache <= max_length, got cache={cache}, "
                         f"max_length={max_length}")
    start = max_length - cache
    return [0.0 if n <= start else (-1.0 if n > max_length else (start - n) / cache) for n in lengths]


def soft_overlong_reward(completions: Sequence[str], *, completion_ids: Sequence[Sequence[int]], max_length: int,
                         cache: int, **_: Any) -> list[float | None]:
    """:func:`soft_overlong_penalty` of each completion's token count (``completion_ids``: its tokens, EOS
    included, no padding; what ``vold train`` passes, as TRL does). Built-in ``soft_overlong``: ``L_max`` is
    ``rollout.max_new_tokens`` and ``L_cache`` is ``reward.overlong_cache``."""
    if len(completion_ids) != len(completions):
        raise ValueError(f"soft_overlong: {len(completions)} completions but {len(completion_ids)} completion_ids")
    return list(soft_overlong_penalty([len(ids) for ids in completion_ids], max_length=max_length, cache=cache))


BUILTIN_REWARDS: dict[str, RewardFunction] = {"accuracy": accuracy_reward, "format": format_reward,
                                              "soft_overlong": soft_overlong_reward}


def load_reward_function(spec: str) -> RewardFunction:
    """A built-in name (``accuracy``, ``format``) or a ``"package.module:function"`` plugin."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" not in spec:
        raise ValueError(f"unknown reward function {spec!r}: use one of {sorted(BUILTIN_REWARDS)} "
                         f"or 'module:function'")
    module_name, func_name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"reward plugin {spec!r}: cannot import module {module_name!r} ({e})") from e
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ValueError(f"reward plugin {spec!r}: module {module_name!r} has no function {func_name!r}")
    return func


def reward_name(spec: str) -> str:
    """Short name for logs: ``accuracy`` or the plugin's function name."""
    return spec.rsplit(":", 1)[-1]


class RewardFunctions:
    """Several reward functions with weights: ``total = sum_f w_f r_f`` (``None`` entries count as 0)."""

    def __init__(self, specs: Sequence[str], weights: Sequence[float] | None = None, *,
                 max_completion_length: int | None = None, overlong_cache: int = 0):
        if not specs:
            raise ValueError("at least one reward function is needed")
        if weights is not None and len(weights) != len(specs):
            raise ValueError(f"{len(weights)} reward weights for {len(specs)} reward functions")
        self.names = [reward_name(s) for s in specs]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"reward function names must be unique, got {self.names}")
        self.functions = [load_reward_function(s) for s in specs]
        if "soft_overlong" in specs:  # L_max and L_cache from the run config
            if max_completion_length is None:
                raise ValueError("reward 'soft_overlong' is for vold train (it needs rollout.max_new_tokens)")
            if not 0 < overlong_cache <= max_completion_length:
                raise ValueError(f"reward 'soft_overlong' needs 0 < reward.overlong_cache <= rollout.max_new_tokens "
                                 f"({max_completion_length}), got {overlong_cache}")
            index = list(specs).index("soft_overlong")
            self.functions[index] = functools.partial(soft_overlong_reward, max_length=max_completion_length,
                                                      cache=overlong_cache)
        self.weights = [1.0] * len(specs) if weights is None else [float(w) for w in weights]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str],
                 **columns: Sequence[Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns ``(total [N], {name: [N]})``; per-function values are NaN where a function gave None."""
        n = len(completions)
        for key, values in columns.items():
            if len(values) != n:
                raise ValueError(f"reward column {key!r} has {len(values)} values for {n} completions")
        per_function: dict[str, torch.Tensor] = {}
        for name, func in zip(self.names, self.functions, strict=True):
            values = func(prompts=list(prompts), completions=list(completions), **columns)
            if len(values) != n:
                raise ValueError(f"reward function {name!r} returned {len(values)} values for {n} completions")
            per_function[name] = torch.tensor([math.nan if v is None else float(v) for v in values],
                                              dtype=torch.float32)
        stacked = torch.stack(list(per_function.values()), dim=1)  # [N, F]
        weights = torch.tensor(self.weights, dtype=torch.float32)
        total = torch.nansum(stacked * weights, dim=1)
        return total, per_function


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages of ``rewards [B*G]`` (rows ``i*G ... i*G+G-1`` are prompt i's completions).

    ``scale="group"``: ``(r - mean_group) / (std_group + eps)``; ``scale="none"`` (Dr. GRPO):
    ``r - mean_group``. A group whose rewards are all equal gets zero advantages (never NaN);
    a group of one completion too.
    """
    if scale not in ("group", "none"):
        raise ValueError(f"scale={scale!r} is not one of ('group', 'none')")
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [B*G] with G={group_size} dividing it, got {tuple(rewards.shape)}")
    grouped = rewards.float().view(-1, group_size)
    if not torch.isfinite(grouped).all():
        raise ValueError("rewards must be finite (combine None rewards before computing advantages)")
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group" and group_size > 1:
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)  # unbiased std, as TRL
    # exactly zero (not rounding noise around the mean) when a group has nothing to compare
    constant = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    return centered.masked_fill(constant, 0.0).view(-1)
