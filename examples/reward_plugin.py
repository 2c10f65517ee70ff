"""An example reward plugin for ``vold train`` / ``vold sophia`` (``reward.functions``).

Use it by file path (no package or ``sys.path`` needed) or, if importable, by module name::

    vold train --config run.yaml "reward.functions=[accuracy, examples/reward_plugin.py:concise_boxed]"
    vold train --config run.yaml "reward.functions=[accuracy, examples/reward_plugin.py:concise_boxed]" \
        "reward.weights=[1.0, 0.2]"

The signature is TRL's: ``fn(prompts, completions, **columns) -> list[float | None]``, called by keyword:

- ``prompts``: list of N prompts (one per completion: a prompt's G completions repeat it G times);
- ``completions``: list of N decoded completions (the student's text, special tokens removed);
- ``**columns``: the data set's columns as lists aligned with ``completions`` (``answer`` always; ``data_source``
  and any other column of the JSONL row when present). Accept ``**_`` for the ones you do not use.

Return one value per completion: a float, or ``None`` for "does not apply" (ignored in the weighted sum
``r_i = sum_f w_f r_f``; a None from ``loss.distill_mask_reward`` gives distillation weight 1). The function
named by ``loss.distill_mask_reward`` (default ``accuracy``) must return values in [0, 1]. Its name in the logs
is the function name: ``reward/concise_boxed``.
"""

from __future__ import annotations

from typing import Any

from vold.rewards import extract_boxed


def concise_boxed(prompts: list[Any], completions: list[str], *, answer: list[str], max_chars: int = 400,
                  **_: Any) -> list[float | None]:
    """1 for a completion whose last ``\\boxed{}`` holds the row's answer (as text) within ``max_chars``
    characters, decreasing linearly to 0 at twice that length; 0 for a wrong or missing box; None when the row
    has no answer (e.g. an unlabelled prompt)."""
    rewards: list[float | None] = []
    for text, reference in zip(completions, answer, strict=True):
        if reference is None:
            rewards.append(None)
            continue
        boxed = extract_boxed(text)
        if boxed is None or boxed.strip() != str(reference).strip():
            rewards.append(0.0)
            continue
        over = max(0, len(text) - max_chars) / max_chars
        rewards.append(max(0.0, 1.0 - over))
    return rewards
