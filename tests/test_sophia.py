"""SOPHIA (``vold sophia``, ``vold/sophia.py``): the selection rule on hand-made rewards, the objective (ratio 1
and truncated importance sampling, token and sequence level) against a float64 full-logits reference, config
errors, and the stage end to end on tiny models with images through the CLI entry, killed-and-resumed."""

import os
import re
from pathlib import Path

import pytest
import torch
from helpers import assert_rel
from safetensors.torch import load_file

from vold.cli import main
from vold.config import load_config
from vold.kernels import fused_linear_logprobs
from vold.runs import find_checkpoint, list_checkpoints, read_jsonl
from vold.sophia import importance_weights, select_traces, sophia_objective
from vold.testing import tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_cpu.yaml")
# K = N = 2 on 2 items, short generations; a 0/1 "verifier" that random tiny models pass about half the time
TINY_SOPHIA = ["sft.enabled=false", "sophia.num_captions=2", "sophia.traces_per_caption=2", "sophia.batch_size=2",
               "sophia.caption_max_new_tokens=8", "sophia.trace_max_new_tokens=8", "sophia.trace_temperature=1.0",
               "sophia.trace_top_p=1.0", "sophia.caption_reward_threshold=0.25", "sophia.lr=1e-3",
               "reward.functions=[vold.testing:even_length_reward]"]


# ---- selection -----------------------------------------------------------------------------------------

def test_caption_reward_is_the_mean_of_its_traces_and_alpha_gates_the_captions():
    rewards = torch.tensor([[[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]])  # B=1, K=2, N=4
    lengths = torch.tensor([[[9, 7, 1, 8], [2, 5, 5, 5]]])
    finished = torch.ones_like(rewards, dtype=torch.bool)
    caption_rewards, picks = select_traces(rewards, lengths, finished, alpha=0.5)
    assert caption_rewards.tolist() == [[0.75, 0.25]]
    # caption 1 has the shortest correct trace (length 2), but its reward 0.25 is not > alpha; the wrong trace
    # of length 1 is never kept: the shortest correct trace of caption 0 wins
    assert picks == [(0, 1)]
    assert select_traces(rewards, lengths, finished, alpha=0.75)[1] == [None]  # > alpha, strictly
    assert select_traces(rewards, lengths, finished, alpha=0.2)[1] == [(1, 0)]  # now caption 1 qualifies


def test_selection_ties_unfinished_traces_thresholds_and_several_items():
    rewards = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 1.0]], [[0.6, 0.9], [1.0, 0.2]]])
    lengths = torch.tensor([[[4, 3], [3, 6]], [[1, 1], [1, 1]], [[5, 4], [3, 2]]])
    finished = torch.tensor([[[True, True], [True, True]], [[True, True], [True, True]],
                             [[True, True], [False, True]]])
    caption_rewards, picks = select_traces(rewards, lengths, finished, alpha=0.4)
    assert caption_rewards[0].tolist() == [1.0, 1.0]
    assert picks[0] == (0, 1)  # a tie at length 3: the first in sampling order (caption 0 before caption 1)
    assert picks[1] == (1, 1)  # caption 1 (reward 0.5 > 0.4) and its one correct trace
    assert picks[2] is None  # the only trace with R >= 1 was cut at max_new_tokens (unfinished)
    # a partial-credit verifier: correct when R >= correct_threshold
    assert select_traces(rewards, lengths, finished, alpha=0.4, correct_threshold=0.5)[1][2] == (0, 1)
    with pytest.raises(ValueError, match=r"\[B, K, N\]"):
        select_traces(rewards[0], lengths[0], finished[0], alpha=0.5)


# ---- the objective vs a float64 full-logits reference -----------------------------------------------------

def reference_objective(hidden, weight, targets, mask, rewards, behaviour, mode, clip):
    """Plain float64: full logits, log-softmax, the truncated IS weights written out loop by loop."""
    logits = hidden.double() @ weight.double().T
    logp = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    m = mask.double()
    w = torch.ones_like(logp)
    if mode == "token":
        w = torch.clamp(torch.exp(logp.detach() - behaviour.double()), max=clip)
    elif mode == "sequence":
        for i in range(logp.shape[0]):
            mean = ((logp[i].detach() - behaviour[i].double()) * m[i]).sum() / m[i].sum()
            w[i] = torch.clamp(torch.exp(mean), max=clip)
    return -(w * rewards.double()[:, None] * m * logp).sum() / m.sum()


@pytest.mark.parametrize("mode", ["none", "token", "sequence"])
def test_objective_values_and_gradients_match_the_float64_reference(mode):
    B, T, H, V = 3, 7, 16, 50
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, T, H, generator=g) * 0.5
    weight = torch.randn(V, H, generator=g) * 0.5
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor([[7], [4], [1]])).long()
    rewards = torch.tensor([1.0, 0.5, 2.0])
    # behaviour log-probs around the student's own: ratios on both sides of the clip c = 1.2
    with torch.no_grad():
        own = fused_linear_logprobs(hidden, weight, targets)
    behaviour = (own + torch.randn(B, T, generator=g) * 0.4) * mask
    clip = 1.2

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = fused_linear_logprobs(h, w, targets)
    loss, metrics = sophia_objective(logp, mask, rewards, normalizer=float(mask.sum()),
                                     behaviour=None if mode == "none" else behaviour,
                                     level="token" if mode == "none" else mode, clip=clip)
    loss.backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    expected = reference_objective(h64, w64, targets, mask, rewards, behaviour, mode, clip)
    expected.backward()
    assert_rel(loss, expected, 1e-5, "loss")
    assert_rel(h.grad, h64.grad, 1e-5, "d hidden", floor=0.0)
    assert_rel(w.grad, w64.grad, 1e-5, "d weight", floor=0.0)
    assert metrics["nll_sum"] == pytest.approx(float(-(logp.detach() * mask).sum()), rel=1e-6)
    if mode != "none":
        weights = importance_weights(logp, behaviour, mask, level=mode, clip=clip)
        assert not weights.requires_grad and float(weights.max()) <= clip + 1e-6
        assert bool((weights[mask == 0] == 0).all()) and float(weights[mask == 1].min()) < clip  # some truncated
        assert metrics["is_weight_sum"] == pytest.approx(float(weights.sum()), rel=1e-6)


def test_ratio_one_form_is_reward_weighted_sft():
    """R = 1 for every kept trace: the ratio-1 loss is exactly ``vold sft``'s masked NLL."""
    g = torch.Generator().manual_seed(2)
    logp = -torch.rand(2, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    loss, _ = sophia_objective(logp, mask, torch.ones(2), normalizer=8.0)
    assert float(loss) == pytest.approx(float(-(logp * mask).sum() / 8.0))


# ---- config --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("override", "message"), [
    ("sophia.importance_weighting=ratio", "config key 'sophia.importance_weighting' = 'ratio' is not one of"),
    ("sophia.is_level=batch", "config key 'sophia.is_level'"),
    ("sophia.num_captions=0", "config key 'sophia.num_captions' must be > 0"),
    ("sophia.is_clip=0", "config key 'sophia.is_clip' must be > 0"),
    ("sophia.teacher_prompt_template=Solve: {question}", "'sophia.teacher_prompt_template' must contain {caption}"),
    ("sophia.caption_top_p=1.5", "config key 'sophia.caption_top_p' must be in"),
    ("sophia.num_caption=3", "unknown config key 'sophia.num_caption'; did you mean 'num_captions'"),
])
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(CONFIG, [override])


def test_paper_config_loads():
    cfg = load_config(ROOT / "configs" / "sophia_paper.yaml")
    sc = cfg.sophia
    assert (sc.num_captions, sc.traces_per_caption, sc.caption_reward_threshold) == (8, 8, 0.75)
    assert sc.importance_weighting == "none" and cfg.reward.functions == ["accuracy"]


# ---- the stage end to end ---------------------------------------------------------------------------------

def run_sophia(tiny: dict, out: Path, *overrides: str) -> int:
    return main(["sophia", "--config", CONFIG, *tiny_overrides(tiny, out), *TINY_SOPHIA, *overrides])


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def test_sophia_cli_end_to_end_on_images_then_resume(tiny, tmp_path):
    """Three steps of the clipped-IS form (behaviour log-probs of both policies) on tiny models with images;
    then the run is rewound to its step-1 checkpoint (the later ones as if killed mid-save) and resumed:
    the same metrics, samples and final weights as the uninterrupted run."""
    args = ["sophia.importance_weighting=clipped", "sophia.is_clip=2.0", "sophia.max_steps=3",
            "checkpoint.every=1", "checkpoint.keep_last=10"]
    assert run_sophia(tiny, tmp_path, *args) == 0
    run = tmp_path / "sophia"
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert m["sophia/items"] == 2 and 0 <= m["sophia/kept"] <= 2
        for key in ("train/loss", "train/nll", "train/grad_norm", "train/lr", "caption/reward_mean",
                    "trace/reward_mean", "train/is_weight",
                    "time/captions", "time/traces", "time/update_actor"):
            assert key in m, key
    updated = [m for m in metrics if m["sophia/kept"] > 0]
    assert updated, "no item kept in 3 steps: the test's reward/threshold no longer exercise the update"
    for m in updated:
        assert m["train/tokens"] > 0 and m["train/grad_norm"] > 0 and m["train/nll"] > 0
        assert 0 < m["train/is_weight"] <= 2.0
    for m in metrics:
        if m["sophia/kept"] == 0:
            assert m["train/loss"] == 0 and m["train/grad_norm"] == 0  # nothing kept: no update
    samples = read_jsonl(run / "samples.jsonl")
    assert len(samples) == sum(m["sophia/kept"] for m in metrics)
    for s in samples:  # what was kept obeys the rule: a correct trace of a caption above alpha
        assert s["reward"] >= 1.0 and s["caption_reward"] > 0.25 and {"caption", "trace", "prompt"} <= s.keys()
    assert (run / "final" / "model.safetensors").is_file() and (run / "config.yaml").is_file()
    assert load_config(run / "config.yaml").sophia.importance_weighting == "clipped"
    assert [p.name for p in list_checkpoints(run)] == ["step_000001", "step_000002", "step_000003"]

    expected, expected_samples = without_timings(metrics), read_jsonl(run / "samples.jsonl")
    os.replace(run / "final", tmp_path / "reference_final")
    for path in list_checkpoints(run)[1:]:
        path.rename(path.with_name(path.name + ".tmp"))  # as if killed while saving them
    assert find_checkpoint(run, "auto").name == "step_000001"
    assert main(["sophia", "--config", CONFIG, *tiny_overrides(tiny, tmp_path), *TINY_SOPHIA, *args,
                 "--resume", "auto"]) == 0
    assert without_timings(read_jsonl(run / "metrics.jsonl")) == expected
    assert read_jsonl(run / "samples.jsonl") == expected_samples
    a, b = load_file(run / "final" / "model.safetensors"), load_file(tmp_path / "reference_final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sophia_refuses_text_rows_and_is_callable_as_a_function(tiny, tmp_path):
    from vold.sophia import train_sophia

    cfg = load_config(CONFIG, [*tiny_overrides(tiny, tmp_path), *TINY_SOPHIA, f"data.train_files=[{tiny['prompts']}]"])
    with pytest.raises(ValueError, match="vold sophia needs an image in every row"):
        train_sophia(cfg)


def test_a_run_that_keeps_nothing_says_so(tiny, tmp_path):
    """With sophia.caption_reward_threshold=1 and 0/1 rewards no caption can qualify (its mean must be > 1): the run
    trained nothing and said nothing (found by the new-user pass). It now warns, naming both thresholds, as `vold
    train` warns when every group's rewards are equal."""
    with pytest.warns(UserWarning, match=r"no item has been kept for 2 steps .*caption_reward_threshold \(1.0\)"):
        assert run_sophia(tiny, tmp_path, "sophia.caption_reward_threshold=1.0", "sophia.max_steps=2",
                          "checkpoint.every=0") == 0
    assert [m["sophia/kept"] for m in read_jsonl(tmp_path / "sophia" / "metrics.jsonl")] == [0, 0]
