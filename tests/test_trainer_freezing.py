"""Which student parameters train: ``model.freeze_*`` / ``model.frozen`` / ``model.trainable``, LoRA adapters
(``model.lora.*``, through peft), and the per-stage schedule keys (``min_lr_ratio``, ``weight_decay``), on the
tiny models through the CLI entry (``vold.cli.main``): frozen weights come out bit-identical and have no AdamW
state; a LoRA run saves adapters, resumes exactly, and its merged weights give the trainer's log-probs.
"""

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vold.cli import main
from vold.config import load_config
from vold.data import build_prompt_batch, load_examples, repeat_inputs
from vold.models import (
    apply_freezing,
    is_adapter_folder,
    load_student,
    lora_wrapper,
    merged_copy,
    merged_state_dict,
    parameter_counts,
    parameter_part,
    student_from_config,
)
from vold.rl import score
from vold.rollout.vllm import named_weights
from vold.runs import find_checkpoint, list_checkpoints, load_checkpoint_state, read_jsonl
from vold.testing import make_tiny_student, make_tiny_text_student, make_tiny_tokenizer, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def traces(tiny, tmp_path_factory) -> Path:
    """SFT rows: the tiny training images with a short trace each."""
    rows = read_jsonl(tiny["train"])
    path = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    path.write_text("".join(json.dumps({**r, "image": str(Path(tiny["train"]).parent / r["image"]),
                                        "trace": f"Add them: {r['answer']}. \\boxed{{{r['answer']}}}"}) + "\n"
                            for r in rows))
    return path


def run(command: str, tiny: dict, out: Path, *overrides: str) -> int:
    return main([command, "--config", CONFIG, *tiny_overrides(tiny, out), *overrides])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


# ---- apply_freezing -------------------------------------------------------------------------------------

def test_parts_of_a_qwen2_5_vl_student():
    model = make_tiny_student(make_tiny_tokenizer())
    parts = {name: parameter_part(name) for name, _ in model.named_parameters()}
    assert parts["model.visual.patch_embed.proj.weight"] == "vision_tower"
    assert parts["model.visual.blocks.0.attn.qkv.weight"] == "vision_tower"
    assert parts["model.visual.merger.mlp.0.weight"] == "projector"
    assert parts["model.language_model.layers.0.self_attn.q_proj.weight"] == "language_model"
    assert parts["lm_head.weight"] == "language_model"
    assert parameter_part("visual.merger.ln_q.weight") == "projector"  # transformers 4.x names
    assert set(parts.values()) == {"vision_tower", "projector", "language_model"}


def test_apply_freezing_switches_and_patterns():
    model = make_tiny_student(make_tiny_tokenizer())
    total = sum(p.numel() for p in model.parameters())
    cfg = load_config(None, ["model.freeze_vision_tower=true", "model.freeze_projector=true"])
    trainable, frozen = apply_freezing(model, cfg.model)
    assert trainable + frozen == total and (trainable, frozen) == parameter_counts(model)
    for name, param in model.named_parameters():
        assert param.requires_grad == (parameter_part(name) == "language_model"), name
    # the language model frozen except the lm_head; a pattern that freezes the first decoder layer's MLP
    model = make_tiny_student(make_tiny_tokenizer())
    cfg = load_config(None, ["model.freeze_language_model=true", r"model.trainable=[^lm_head\.]",
                             r"model.frozen=[layers\.0\.mlp]"])
    apply_freezing(model, cfg.model)
    train = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.weight" in train and "model.visual.merger.mlp.0.weight" in train
    assert not any(".language_model." in name for name in train)
    model = make_tiny_student(make_tiny_tokenizer())
    apply_freezing(model, load_config(None, [r"model.frozen=[layers\.0\.mlp]"]).model)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {
        f"model.language_model.layers.0.mlp.{k}_proj.weight" for k in ("gate", "up", "down")}


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.frozen=[no_such_parameter]"], "model.frozen: 'no_such_parameter' matches no parameter"),
    (["model.trainable=[(]"], "model.trainable: '(' is not a regular expression"),
    (["model.freeze_vision_tower=true", "model.freeze_projector=true", "model.freeze_language_model=true"],
     "leave no trainable parameter"),
])
def test_apply_freezing_bad_input_names_the_key(overrides, message):
    model = make_tiny_student(make_tiny_tokenizer())
    with pytest.raises(ValueError, match=re.escape(message)):
        apply_freezing(model, load_config(None, overrides).model)


def test_vision_switch_on_a_text_student_is_an_error():
    model = make_tiny_text_student(make_tiny_tokenizer())
    with pytest.raises(ValueError, match="model.freeze_vision_tower=true but the student has no vision tower"):
        apply_freezing(model, load_config(None, ["model.freeze_vision_tower=true"]).model)
    assert apply_freezing(model, load_config(None, []).model)[1] == 0  # nothing frozen by default


@pytest.mark.parametrize(("override", "message"), [
    ("sft.min_lr_ratio=1.5", "config key 'sft.min_lr_ratio' must be in [0, 1]"),
    ("sophia.min_lr_ratio=-0.1", "config key 'sophia.min_lr_ratio' must be in [0, 1]"),
    ("optim.min_lr_ratio=2", "config key 'optim.min_lr_ratio' must be in [0, 1]"),
    ("sophia.weight_decay=-1", "config key 'sophia.weight_decay' must be >= 0"),
    ("model.lora.r=0", "model.lora needs r >= 1"),
])
def test_schedule_and_lora_keys_are_checked(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, [override, "model.lora.enabled=true"] if "lora" in override else [override])


def test_frozen_parameters_get_no_gradient_buffer(tiny, traces):
    """A backward pass through the fused SFT loss on an image row leaves ``.grad`` None on the frozen tower
    (no buffer, nothing for DDP or ZeRO to reduce) and fills it on everything else that the row reaches."""
    from vold.sft import sft_batch, sft_loss

    cfg = load_config(CONFIG, [*tiny_overrides(tiny, "unused"), "model.freeze_vision_tower=true"])
    model, processor = student_from_config(cfg.model, torch.device("cpu"))
    example = load_examples([str(traces)], required=("trace",))[:2]
    batch = sft_batch(example, processor, [e.extra["trace"] for e in example], max_length=256)
    sft_loss(model, batch, normalizer=float(batch["mask"].sum())).backward()
    for name, param in model.named_parameters():
        if parameter_part(name) == "vision_tower":
            assert param.grad is None, name
        elif name.startswith("model.visual.merger.") or name == "lm_head.weight":
            assert param.grad is not None and param.grad.abs().sum() > 0, name


# ---- the stages with frozen parts -------------------------------------------------------------------------

def frozen_unchanged(start: dict, end: dict, parts: set[str]) -> None:
    """Parameters of ``parts`` bit-identical, every other matrix changed."""
    assert start.keys() == end.keys()
    for name in start:
        if parameter_part(name) in parts:
            assert torch.equal(start[name], end[name]), name
    changed = [n for n in start if parameter_part(n) not in parts and not torch.equal(start[n], end[n])]
    assert changed, "nothing trained"


def test_sft_and_train_with_a_frozen_vision_tower(tiny, traces, tmp_path, capsys):
    start = weights(tiny["student"])
    out = tmp_path / "run"
    assert run("sft", tiny, out, f"sft.train_files=[{traces}]", "sft.max_steps=2", "model.freeze_vision_tower=true",
               "sft.weight_decay=0.1", "sft.lr_scheduler=cosine", "sft.min_lr_ratio=0.25") == 0
    printed = capsys.readouterr().out
    frozen = sum(v.numel() for k, v in start.items() if parameter_part(k) == "vision_tower")
    trainable = sum(v.numel() for v in start.values()) - frozen
    assert f"sft: {trainable:,} trainable parameters" in printed and f"{frozen:,} frozen" in printed
    frozen_unchanged(start, weights(out / "sft" / "final"), {"vision_tower"})
    # the checkpoint's AdamW state covers the trainable tensors only (none for the tower's)
    state = load_checkpoint_state(find_checkpoint(out / "sft", "auto"))["optimizer"]
    n_trainable = sum(1 for k in start if parameter_part(k) != "vision_tower")
    assert len(state["state"]) == n_trainable
    assert sum(s["exp_avg"].numel() for s in state["state"].values()) == trainable
    assert [g["weight_decay"] for g in state["param_groups"]] == [0.1, 0.0]  # sft.weight_decay, none on 1-D
    lrs = [m["lr"] for m in read_jsonl(out / "sft" / "metrics.jsonl")]
    assert lrs == pytest.approx([1e-3, 1e-3 * (0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi / 2)))])

    # vold train from the SFT model, tower and projector frozen, cosine to 1/4 of the peak
    sft_final = weights(out / "sft" / "final")
    assert run("train", tiny, out, "optim.max_steps=2", "model.freeze_vision_tower=true", "model.freeze_projector=true",
               "optim.lr_scheduler=cosine", "optim.min_lr_ratio=0.25",
               "reward.functions=[accuracy, vold.testing:digit_reward]") == 0
    frozen_unchanged(sft_final, weights(out / "rl" / "final"), {"vision_tower", "projector"})
    lrs = [m["lr"] for m in read_jsonl(out / "rl" / "metrics.jsonl")]
    assert lrs == pytest.approx([1e-4, 1e-4 * 0.625])


def test_sophia_with_a_frozen_vision_tower(tiny, tmp_path, capsys):
    from test_sophia import TINY_SOPHIA

    start = weights(tiny["student"])
    assert run("sophia", tiny, tmp_path, *TINY_SOPHIA, "sophia.max_steps=2", "model.freeze_vision_tower=true",
               "sophia.lr_scheduler=cosine", "sophia.min_lr_ratio=0.25", "sophia.weight_decay=0.05") == 0
    assert "sophia: " in capsys.readouterr().out
    groups = load_checkpoint_state(find_checkpoint(tmp_path / "sophia", "auto"))["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]  # sophia.weight_decay on the matrices
    metrics = read_jsonl(tmp_path / "sophia" / "metrics.jsonl")
    assert any(m["sophia/kept"] > 0 for m in metrics), "nothing kept: the update was not exercised"
    frozen_unchanged(start, weights(tmp_path / "sophia" / "final"), {"vision_tower"})
    assert [m["lr"] for m in metrics] == pytest.approx([1e-3, 1e-3 * 0.625])


# ---- LoRA ------------------------------------------------------------------------------------------------

LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.0",
        "model.freeze_vision_tower=true"]


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def test_lora_sft_resume_train_and_merged_logprobs(tiny, traces, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "run"
    sft_args = [f"sft.train_files=[{traces}]", "sft.max_steps=3", "checkpoint.every=1", "checkpoint.keep_last=5",
                "model.lora.save_merged=true", *LORA]
    assert run("sft", tiny, out, *sft_args) == 0
    final = out / "sft" / "final"
    assert is_adapter_folder(final) and (final / "merged" / "model.safetensors").is_file()
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == str(tiny["student"])
    trained = adapter(final)
    assert trained and all("lora_" in k for k in trained)
    assert not any(".visual." in k for k in trained)  # frozen tower: no adapters there
    # the merged copy differs from the base model only in the adapted matrices
    base, merged = weights(tiny["student"]), weights(final / "merged")
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(re.search(r"(q|k|v|o|gate|up|down)_proj\.weight$", k) for k in changed)

    # resume: rewind to the step-1 checkpoint and run again; the same adapter, the same logs
    expected = [{k: v for k, v in m.items() if not k.startswith("time/")}
                for m in read_jsonl(out / "sft" / "metrics.jsonl")]
    os.replace(final, tmp_path / "reference_final")
    for path in list_checkpoints(out / "sft")[1:]:
        path.rename(path.with_name(path.name + ".tmp"))
    assert is_adapter_folder(find_checkpoint(out / "sft", "auto") / "model")
    assert run("sft", tiny, out, *sft_args, "--resume", "auto") == 0
    again = [{k: v for k, v in m.items() if not k.startswith("time/")}
             for m in read_jsonl(out / "sft" / "metrics.jsonl")]
    assert again == expected
    resumed = adapter(final)
    assert resumed.keys() == trained.keys() and all(torch.equal(resumed[k], trained[k]) for k in trained)

    # vold train continues the SFT adapter (sft.enabled), with the lm_head frozen and read by the fused loss
    assert run("train", tiny, out, "optim.max_steps=2", "reward.functions=[accuracy, vold.testing:digit_reward]",
               *LORA) == 0
    metrics = read_jsonl(out / "rl" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
    rl_adapter = adapter(out / "rl" / "final")
    assert rl_adapter.keys() == trained.keys() and any(not torch.equal(rl_adapter[k], trained[k]) for k in trained)

    # the trainer's log-probs (LoRA modules active) = the merged model's = the merge peft's loader makes
    cfg = load_config(CONFIG, [*tiny_overrides(tiny, tmp_path), *LORA])
    student, processor = student_from_config(cfg.model, torch.device("cpu"), path=str(out / "rl" / "final"))
    assert lora_wrapper(student) is not None and not student.lm_head.weight.requires_grad
    merged = merged_copy(student)
    loaded = load_student(str(out / "rl" / "final"), dtype="float32", device="cpu", attn_implementation="sdpa")
    assert lora_wrapper(loaded) is None
    reference = merged.state_dict()
    synced = dict(named_weights(student))  # what the vLLM weight sync sends (merged_state_dict)
    assert synced.keys() == reference.keys() and all(torch.equal(synced[k], reference[k]) for k in reference)
    assert merged_state_dict(student).keys() == reference.keys()
    examples = load_examples([str(tiny["train"])])[:2]
    batch = build_prompt_batch(examples, processor)
    prompts = repeat_inputs(batch.student_inputs, batch.num_images, 2)
    num_images = [n for n in batch.num_images for _ in range(2)]
    ids = torch.randint(0, 100, (4, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    student.eval()
    logps = [score(m, prompts, num_images, ids, mask, micro_size=4, vocab_size=None) for m in (student, merged, loaded)]
    torch.testing.assert_close(logps[0], logps[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logps[0], logps[2], atol=1e-5, rtol=1e-5)
    assert logps[0].abs().sum() > 0


# ---- data parallel: frozen parameters and LoRA under DDP and ZeRO-2 ----------------------------------------

@pytest.mark.slow
def test_frozen_tower_and_lora_under_two_gloo_ranks(tmp_path):
    """2 gloo ranks (DDP; DeepSpeed ZeRO-2 when installed) with the vision tower frozen, and with LoRA: the frozen
    weights come out bit-identical and the trained ones match one process (the tests/test_distributed.py bounds)."""
    import torch.distributed as dist
    from test_distributed import HAS_DEEPSPEED, run_two_ranks, sft_args, weight_errors, write_sft_rows

    from vold.testing import prepare_tiny_run

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    tiny = prepare_tiny_run(tmp_path / "tiny")
    images = sorted(str(p) for p in (tmp_path / "tiny" / "data").glob("train_image_*.png"))
    rows = write_sft_rows(tmp_path, images)
    start = weights(tiny["student"])
    frozen, lora = ["model.freeze_vision_tower=true"], [*LORA, "model.lora.save_merged=true"]
    assert main(sft_args(tiny, tmp_path / "one", rows, *frozen)) == 0
    assert main(sft_args(tiny, tmp_path / "one_lora", rows, *lora)) == 0
    jobs = [sft_args(tiny, tmp_path / "two", rows, *frozen), sft_args(tiny, tmp_path / "two_lora", rows, *lora)]
    if HAS_DEEPSPEED:
        zero2 = ["distributed.backend=deepspeed",
                 f"distributed.deepspeed_config={ROOT / 'configs' / 'deepspeed' / 'zero2_cpu.json'}"]
        jobs.append(sft_args(tiny, tmp_path / "zero2", rows, *frozen, *zero2))
    run_two_ranks(jobs)
    reference = weights(tmp_path / "one" / "sft" / "final")
    for run in ["two", "zero2"] if HAS_DEEPSPEED else ["two"]:
        got = weights(tmp_path / run / "sft" / "final")
        frozen_unchanged(start, got, {"vision_tower"})
        errors = weight_errors(got, reference, start)
        assert errors["rel"] < 1e-5 and errors["norm_vs_update"] < 2e-3, (run, errors)
    got, want = (weights(tmp_path / run / "sft" / "final" / "merged") for run in ("two_lora", "one_lora"))
    frozen_unchanged(start, got, {"vision_tower", "projector"})
    errors = weight_errors(got, want, start)
    assert errors["rel"] < 1e-5 and errors["norm_vs_update"] < 2e-3, errors
