"""vold.rewards: boxed extraction, math equivalence, plugins with TRL's signature, group advantages."""

import math
import sys
import textwrap

import pytest
import torch

from vold import rewards
from vold.rewards import (
    RewardFunctions,
    accuracy_reward,
    extract_boxed,
    format_reward,
    group_advantages,
    load_reward_function,
    math_equal,
    soft_overlong_penalty,
)


@pytest.mark.parametrize("text, expected", [
    ("so the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{1} first, then \\boxed{\\{2, 3\\}} last", "\\{2, 3\\}"),
    ("nested \\boxed{\\sqrt{\\frac{a}{b}} + {c}}", "\\sqrt{\\frac{a}{b}} + {c}"),
    ("\\fbox{7}", "7"),
    ("\\boxed 42$", "42"),
    ("\\boxed{1} and a later command \\boxedsomething", "1"),
    ("cut off \\boxed{\\frac{1}{", None),
    ("no box here", None),
    ("", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("prediction, reference, equal", [
    ("\\frac{1}{2}", "0.5", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("1/2", "\\frac{1}{2}", True),
    ("x^2+1", "1+x^2", True),
    ("(1, 2)", "(1,2)", True),
    ("\\text{(B)}", "(B)", True),
    ("4", "3", False),
    ("0.51", "0.5", False),
    ("blue whale", "Blue Whale", True),  # not maths: the normalised-string fallback
    ("blue whale", "orca", False),
])
def test_math_equal(prediction, reference, equal):
    assert math_equal(prediction, reference) is equal


def test_math_equal_falls_back_when_the_parser_fails(monkeypatch):
    import math_verify

    def broken(*args, **kwargs):
        raise RuntimeError("parser crashed")

    monkeypatch.setattr(math_verify, "parse", broken)
    assert math_equal("\\dfrac{1}{2}", "\\frac{1}{2}")  # exact match after normalisation
    assert not math_equal("\\frac{1}{2}", "0.5")  # equivalence needs the parser


def test_accuracy_and_format_rewards():
    completions = ["... \\boxed{\\frac{1}{2}}", "\\boxed{0.4}", "the answer is 0.5", "\\boxed{}", "\\boxed{5}"]
    answers = ["0.5", "0.5", "0.5", "0.5", None]
    assert accuracy_reward(completions, answers) == [1.0, 0.0, 0.0, 0.0, None]
    assert format_reward(completions) == [1.0, 1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        accuracy_reward(["a", "b"], ["1"])


def test_plugin_gets_trl_signature_and_is_combined_with_weights(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        CALLS = []

        def length_bonus(prompts, completions, answer, data_source, level, **kwargs):
            CALLS.append(dict(prompts=prompts, answer=answer, data_source=data_source, level=level, extra=kwargs))
            return [None if source == "skip" else len(c) / 10 for c, source in zip(completions, data_source)]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    funcs = RewardFunctions(["accuracy", "my_rewards:length_bonus"], weights=[1.0, 0.5])
    assert funcs.names == ["accuracy", "length_bonus"]
    total, per_function = funcs(
        prompts=["p0", "p0", "p1"], completions=["\\boxed{2}", "\\boxed{3}", "\\boxed{9}"],
        answer=["2", "2", "9"], data_source=["a", "a", "skip"], level=[1, 1, 3],
    )
    call = sys.modules["my_rewards"].CALLS[-1]
    assert call["prompts"] == ["p0", "p0", "p1"] and call["answer"] == ["2", "2", "9"] and call["level"] == [1, 1, 3]
    assert per_function["accuracy"].tolist() == [1.0, 0.0, 1.0]
    assert per_function["length_bonus"][:2].tolist() == pytest.approx([0.9, 0.9]) and math.isnan(
        per_function["length_bonus"][2])
    assert total.tolist() == pytest.approx([1.45, 0.45, 1.0])  # None counts as 0 in the total


def test_bad_reward_specs():
    with pytest.raises(ValueError, match="unknown reward function 'acc'"):
        load_reward_function("acc")
    with pytest.raises(ImportError, match="cannot import module 'no_such_module_xyz'"):
        load_reward_function("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="module 'vold.rewards' has no function 'nope'"):
        load_reward_function("vold.rewards:nope")
    assert load_reward_function("vold.rewards:format_reward") is rewards.format_reward
    with pytest.raises(ValueError, match="2 reward weights for 1 reward functions"):
        RewardFunctions(["accuracy"], [1.0, 2.0])
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 completions"):
        RewardFunctions(["accuracy"])(prompts=["p", "p"], completions=["a", "b"], answer=["1"])


def test_group_advantages():
    rewards_ = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.1, 2.0, 4.0, 6.0, 8.0, 10.0])
    adv = group_advantages(rewards_, 5)
    groups = rewards_.view(3, 5)
    expected = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)
    assert torch.allclose(adv.view(3, 5)[[0, 2]], expected[[0, 2]])
    assert torch.equal(adv[5:10], torch.zeros(5))  # all-equal group: exactly zero, no NaN
    assert torch.isfinite(adv).all()
    assert adv.view(3, 5).sum(1).abs().max() < 1e-5

    dr = group_advantages(rewards_, 5, scale="none")  # Dr. GRPO: no std
    assert torch.allclose(dr.view(3, 5)[2], torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0]))
    assert torch.equal(dr[5:10], torch.zeros(5))

    assert torch.equal(group_advantages(torch.tensor([3.0, 1.0]), 1), torch.zeros(2))  # G=1: nothing to compare
    assert torch.equal(group_advantages(torch.ones(4), 4), torch.zeros(4))
    with pytest.raises(ValueError, match="G=5"):
        group_advantages(torch.ones(6), 5)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.ones(5), 5, scale="batch")
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)


def test_soft_overlong_penalty_is_dapos_piecewise_formula():
    """DAPO §3.4 eq. 13 with L_max = 10, L_cache = 4: 0 up to 6 tokens, then -1/4 per token, -1 beyond 10."""
    lengths = [0, 5, 6, 7, 8, 10, 11]
    assert soft_overlong_penalty(lengths, max_length=10, cache=4) == pytest.approx(
        [0.0, 0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    funcs = RewardFunctions(["accuracy", "soft_overlong"], max_completion_length=10, overlong_cache=4)
    total, per_function = funcs(prompts=["p", "p"], completions=["\\boxed{2}", "\\boxed{2}"], answer=["2", "2"],
                                completion_ids=[[1] * 3, [1] * 8])
    assert per_function["soft_overlong"].tolist() == pytest.approx([0.0, -0.5])
    assert total.tolist() == pytest.approx([1.0, 0.5])
    for cache in (0, 11):
        with pytest.raises(ValueError, match="needs 0 < reward.overlong_cache <= rollout.max_new_tokens"):
            RewardFunctions(["soft_overlong"], max_completion_length=10, overlong_cache=cache)
    with pytest.raises(ValueError, match="needs rollout.max_new_tokens"):
        RewardFunctions(["soft_overlong"])
