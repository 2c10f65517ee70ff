"""Data-parallel training on the CPU: 2 gloo processes (spawned, loopback only) against one process.

One spawn runs every 2-rank job (process start-up is most of the cost); the 1-process references run here:

- ``vold sft`` with DDP: 2 ranks with global batch B reach the weights of 1 process with batch B (rows with
  and without images, so the vision tower is used on some ranks only), logs written by rank 0 alone;
  a 2-rank run killed after its first checkpoint and resumed (``--resume auto``) logs and ends exactly as
  the uninterrupted 2-rank run;
- ``vold train`` (GRPO + k2 distillation, packed policy update): the same prompts, the same rollouts
  (seeded per prompt, not per rank), the same weights after 2 steps;
- ``optimize`` on a fixed rollout batch split over the ranks, for dapo/grpo/dr_grpo, padded and packed,
  2 micro-batches x 2 PPO epochs: the global normalisers make the 2-rank update the 1-process update;
- DeepSpeed (when installed): ``vold sft`` with ZeRO-2 and ZeRO-3 and ``vold train`` with ZeRO-2 against the
  same references, and a ZeRO-2 run resumed from its first checkpoint equal to the uninterrupted one.

Weights are compared by ``max|w_2 - w_1| / max|w_1|`` over the model (< 1e-5) and, per tensor, by the error
relative to the update ``w_1 - w_0`` (w_0: the starting weights): < 2e-4 for the SGD updates of ``optimize``
(the gradients agree to float rounding), < 2e-3 for the AdamW runs (AdamW divides every entry by its own
gradient RMS, which magnifies the rounding of near-zero gradient entries; the batches are padded to
different widths in the two runs, so their float sums differ in the last bits).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import run_on_gloo_ranks
from safetensors.torch import load_file

from vold.cli import main
from vold.config import DistributedConfig, load_config
from vold.distributed import Runtime
from vold.rl import Experience, optimize
from vold.runs import list_checkpoints, make_scheduler, read_jsonl
from vold.testing import make_tiny_text_student, make_tiny_tokenizer, prepare_tiny_run, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_cpu.yaml")
WORLD = 2
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo")
# optimize() on a fixed batch: every loss type padded and packed, and packed with rows left out of the loss
# (loss.mask_truncated_completions: the token/sequence counts are global over the ranks' kept rows)
OPTIMIZE_CASES = {f"{t}/{p}{'/masked' if m else ''}": (t, p, m) for t in LOSS_TYPES
                  for p, m in ((False, False), (True, False), (True, True))}


# ---- the jobs ------------------------------------------------------------------------------------

def write_sft_rows(folder: Path, images: dict) -> Path:
    """8 SFT rows (prompt, answer, trace), every other one with an image of the tiny run."""
    path = folder / "sft_rows.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(8):
            row = {"prompt": f"{i}+{i + 1}=? Answer in \\boxed{{}}.", "answer": str(2 * i + 1),
                   "trace": f"{i} plus {i + 1} is {2 * i + 1}, so \\boxed{{{2 * i + 1}}}." + " ok" * (i % 3)}
            if i % 2:
                row["image"] = images[i % len(images)]
            f.write(json.dumps(row) + "\n")
    return path


def sft_args(tiny: dict, out: Path, rows: Path, *extra: str) -> list[str]:
    return ["sft", "--config", CONFIG, *tiny_overrides(tiny, out), f"sft.train_files=[{rows}]",
            "sft.batch_size=4", "sft.grad_accum=2", "sft.max_steps=3", "sft.lr=1e-3", "sft.lr_scheduler=cosine",
            "sft.warmup_steps=1", "checkpoint.every=1", "checkpoint.keep_last=5", *extra]


def rl_args(tiny: dict, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", CONFIG, *tiny_overrides(tiny, out), "sft.enabled=false", "data.batch_size=2",
            "rollout.num_generations=3", "rollout.max_new_tokens=12", "optim.max_steps=2", "optim.lr=1e-3",
            "optim.packing=true", "reward.functions=[accuracy, vold.testing:digit_reward]", "checkpoint.every=0",
            *extra]


def fixed_experience(masked: bool = False) -> Experience:
    """4 prompts x 3 completions of a tiny text model (random ids, ragged masks, old log-probs): the
    rollout batch of one step, prompt-major. ``masked``: rows 1, 6 (rank 0's) and 10 (rank 1's) left out of the
    loss as loss.mask_truncated_completions leaves truncated rows (so the ranks keep 4 and 5 rows)."""
    g = torch.Generator().manual_seed(11)
    n, tp, tc = 12, 6, 9
    prompt_mask = (torch.arange(tp)[None] >= torch.randint(0, 4, (n // 3,), generator=g)[:, None]).long()
    prompt_mask = prompt_mask.repeat_interleave(3, dim=0)
    lengths = torch.randint(1, tc + 1, (n,), generator=g)
    mask = (torch.arange(tc)[None] < lengths[:, None]).long()
    return Experience(
        prompt_inputs={"input_ids": torch.randint(10, 90, (n // 3, tp), generator=g).repeat_interleave(3, dim=0)
                       * prompt_mask, "attention_mask": prompt_mask},
        num_images=[0] * n, completion_ids=torch.randint(10, 90, (n, tc), generator=g) * mask,
        completion_mask=mask, advantages=torch.randn(n, generator=g), distill_mask=torch.rand(n, generator=g),
        old_logprobs=-(torch.rand(n, tc, generator=g) * 3 + 3) * mask,
        loss_rows=torch.tensor([0.0 if i in (1, 6, 10) else 1.0 for i in range(n)]) if masked else None,
    )


def optimize_weights(loss_type: str, packing: bool, runtime: Runtime | None,
                     masked: bool = False) -> dict[str, torch.Tensor]:
    """One step's updates (2 PPO epochs x 2 micro-batches, SGD lr 1) on this rank's prompts of the fixed batch
    (``masked``: with rows left out of the loss, :func:`fixed_experience`)."""
    cfg = load_config(None, [f"loss.loss_type={loss_type}", "loss.distill_coef=0", "optim.ppo_epochs=2",
                             "optim.grad_accum=2", f"optim.packing={packing}", "rollout.max_new_tokens=9"])
    exp = fixed_experience(masked)
    if runtime is not None:  # this rank's prompts (rank-strided), with their G rows each
        prompts = runtime.shard(range(len(exp) // 3))
        exp = exp.select([3 * p + k for p in prompts for k in range(3)])
    model = make_tiny_text_student(make_tiny_tokenizer()).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = make_scheduler(optimizer, kind="constant", warmup=0, total=10)
    if runtime is not None:
        runtime.wrap(model, optimizer, grad_accum=2, max_grad_norm=cfg.optim.max_grad_norm)
    metrics = optimize(model, exp, cfg, optimizer, scheduler, generator=torch.Generator().manual_seed(0),
                       teacher_head=None, vocab_size=None, runtime=runtime)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    weights["__metrics__"] = torch.tensor([metrics["loss"], metrics["policy_loss"], metrics["entropy"]])
    return weights


def _run_jobs(rank: int, jobs: list) -> None:
    """This rank's share of every 2-rank job (``run_on_gloo_ranks`` joins the gloo group, then destroys it)."""
    for job in jobs:
        started = time.perf_counter()
        if job[0] == "optimize":
            out = {}
            for key in OPTIMIZE_CASES:
                loss_type, packing, masked = OPTIMIZE_CASES[key]
                runtime = Runtime(DistributedConfig(), "cpu")
                out[key] = optimize_weights(loss_type, packing, runtime, masked)
            if rank == 0:
                torch.save(out, job[1])
        else:
            assert main(job) == 0
        dist.barrier()
        if rank == 0:
            print(f"job {job[0]} {' '.join(a for a in job if 'backend' in a or 'packing' in a)}: "
                  f"{time.perf_counter() - started:.1f} s", flush=True)


def run_two_ranks(jobs: list) -> None:
    """Run ``jobs`` (``vold`` CLI argument lists, or ``["optimize", path]``) one after the other on 2 gloo ranks,
    in one spawn (also used by tests/test_trainer_freezing.py); any rank's error fails the caller."""
    run_on_gloo_ranks(_run_jobs, WORLD, jobs, timeout_s=900)  # ~15 s here; generous for a loaded CI machine


# ---- comparisons ---------------------------------------------------------------------------------

def weight_errors(got: dict, want: dict, start: dict) -> dict[str, float]:
    """How far the 2-rank weights ``got`` are from the 1-process weights ``want`` (``start``: before training):

    - ``rel``: ``max|got - want| / max|want|`` over the whole model (the "1e-5 relative" criterion);
    - ``vs_update``: the largest per-tensor ``max|got - want| / max|want - start|`` (error relative to the update);
    - ``norm_vs_update``: the largest per-tensor ``||got - want|| / ||want - start||``.
    """
    err = scale = vs_update = norm_vs_update = 0.0
    for key, value in want.items():
        diff = got[key].double() - value.double()
        update = value.double() - start[key].double()
        err, scale = max(err, float(diff.abs().max())), max(scale, float(value.abs().max()))
        if float(update.abs().max()) > 0:
            vs_update = max(vs_update, float(diff.abs().max() / update.abs().max()))
            norm_vs_update = max(norm_vs_update, float(diff.norm() / update.norm()))
        else:
            assert float(diff.abs().max()) == 0.0, key
    return {"rel": err / scale, "vs_update": vs_update, "norm_vs_update": norm_vs_update, "max_abs": err}


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_gloo_ranks_train_like_one_process(tmp_path, capsys):
    tiny = prepare_tiny_run(tmp_path / "tiny")
    images = sorted(str(p) for p in (tmp_path / "tiny" / "data").glob("train_image_*.png"))
    rows = write_sft_rows(tmp_path, images)
    start = load_file(Path(tiny["student"]) / "model.safetensors")

    # 1-process references (in this process)
    t0 = time.perf_counter()
    assert main(sft_args(tiny, tmp_path / "one", rows)) == 0
    assert main(rl_args(tiny, tmp_path / "one")) == 0
    reference = {key: optimize_weights(t, p, None, m) for key, (t, p, m) in OPTIMIZE_CASES.items()}
    t1 = time.perf_counter()

    # the 2-rank jobs, in one spawn
    jobs = [sft_args(tiny, tmp_path / "two", rows), rl_args(tiny, tmp_path / "two"),
            ["optimize", str(tmp_path / "optimize.pt")],
            # the same SFT run, stopped after its first checkpoint (as if killed), then resumed
            sft_args(tiny, tmp_path / "resumed", rows, "sft.max_steps=1"),
            sft_args(tiny, tmp_path / "resumed", rows, "checkpoint.resume=auto")]
    if HAS_DEEPSPEED:
        zero = {stage: ["distributed.backend=deepspeed",
                        f"distributed.deepspeed_config={ROOT / 'configs' / 'deepspeed' / f'zero{stage}_cpu.json'}"]
                for stage in (2, 3)}
        jobs += [sft_args(tiny, tmp_path / "zero2", rows, *zero[2]),
                 sft_args(tiny, tmp_path / "zero2_resumed", rows, *zero[2], "sft.max_steps=1"),
                 sft_args(tiny, tmp_path / "zero2_resumed", rows, *zero[2], "checkpoint.resume=auto"),
                 sft_args(tiny, tmp_path / "zero3", rows, *zero[3]),
                 rl_args(tiny, tmp_path / "zero2", *zero[2])]
    run_two_ranks(jobs)
    t2 = time.perf_counter()

    report = {}
    # SFT (DDP): same weights, the logs of one run (rank 0 only), the global token counts
    one, two = tmp_path / "one" / "sft", tmp_path / "two" / "sft"
    report["sft_ddp"] = weight_errors(final_weights(two), final_weights(one), start)
    m1, m2 = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [m["step"] for m in m2] == [1, 2, 3]
    for a, b in zip(m1, m2, strict=True):
        assert a["train/tokens"] == b["train/tokens"] and a["train/lr"] == b["train/lr"]
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)

    # resume: a 2-rank run cut after step 1, resumed from its checkpoint, equals the uninterrupted 2-rank run
    resumed = tmp_path / "resumed" / "sft"
    assert [p.name for p in list_checkpoints(resumed)] == ["step_000001", "step_000002", "step_000003"]
    assert without_timings(read_jsonl(resumed / "metrics.jsonl")) == without_timings(m2)
    got, want = final_weights(resumed), final_weights(two)
    assert all(torch.equal(got[k], want[k]) for k in want)

    # RL: the same rollouts (per-prompt seeds), rewards and weights
    one, two = tmp_path / "one" / "rl", tmp_path / "two" / "rl"
    report["rl_ddp_packed"] = weight_errors(final_weights(two), final_weights(one), start)
    r1, r2 = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [m["step"] for m in r2] == [1, 2]
    for a, b in zip(r1, r2, strict=True):
        for key in ("reward/mean", "reward/std", "completion/tokens", "completion/mean_length", "prompt/tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), key
        for key in ("train/loss", "train/policy_loss", "distill/k2", "train/entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
    assert not (two / "samples.jsonl").exists() or len(read_jsonl(two / "samples.jsonl")) == 2 * 2

    # optimize on a fixed batch split over the ranks, every loss type, padded and packed
    split = torch.load(tmp_path / "optimize.pt")
    start_text = {k: v.clone() for k, v in make_tiny_text_student(make_tiny_tokenizer()).state_dict().items()}
    for key, want in reference.items():
        got = split[key]
        torch.testing.assert_close(got.pop("__metrics__"), want.pop("__metrics__"), rtol=1e-5, atol=1e-7)
        report[f"optimize/{key}"] = weight_errors(got, want, start_text)

    if HAS_DEEPSPEED:  # ZeRO-2/3 SFT and ZeRO-2 RL against the same references; a ZeRO-2 resume
        for stage in ("sft", "rl"):
            report[f"{stage}_zero2"] = weight_errors(final_weights(tmp_path / "zero2" / stage),
                                                     final_weights(tmp_path / "one" / stage), start)
        report["sft_zero3"] = weight_errors(final_weights(tmp_path / "zero3" / "sft"),
                                            final_weights(tmp_path / "one" / "sft"), start)
        assert (list_checkpoints(tmp_path / "zero2" / "sft")[-1] / "deepspeed").is_dir()
        resumed, uninterrupted = tmp_path / "zero2_resumed" / "sft", tmp_path / "zero2" / "sft"
        assert without_timings(read_jsonl(resumed / "metrics.jsonl")) == without_timings(
            read_jsonl(uninterrupted / "metrics.jsonl"))
        got, want = final_weights(resumed), final_weights(uninterrupted)
        assert all(torch.equal(got[k], want[k]) for k in want)

    with capsys.disabled():
        print(f"\n1-process references {t1 - t0:.1f} s, 2-rank jobs {t2 - t1:.1f} s")
        for key, e in report.items():
            print(f"  {key:22s} max|w2-w1| = {e['max_abs']:.1e}  rel (/max|w1|) = {e['rel']:.1e}  "
                  f"per tensor: max|w2-w1|/max|w1-w0| = {e['vs_update']:.1e}, "
                  f"||w2-w1||/||w1-w0|| = {e['norm_vs_update']:.1e}")
    for key, e in report.items():
        assert e["rel"] < 1e-5, (key, e)
        # SGD (optimize): the gradients themselves agree to float rounding. AdamW (sft, train) divides each
        # update by the gradient's running RMS, which magnifies the rounding of near-zero gradient entries
        limit = 2e-4 if key.startswith("optimize/") else 2e-3
        assert e["vs_update"] < limit and e["norm_vs_update"] < limit, (key, e)
    shutil.rmtree(tmp_path / "tiny", ignore_errors=True)


# ---- in-process checks ---------------------------------------------------------------------------

def test_rollouts_are_seeded_per_prompt_not_per_batch(tmp_path):
    """A prompt's completions are the same whether it is sampled alone (one rank's shard) or in a batch."""
    from vold.data import Example, build_prompt_batch
    from vold.distributed import prompt_seeds
    from vold.rollout.hf import HFRolloutEngine
    from vold.testing import make_tiny_images, make_tiny_processor, make_tiny_student

    tokenizer = make_tiny_tokenizer()
    processor = make_tiny_processor(tokenizer)
    image = tmp_path / "0.png"
    make_tiny_images(1)[0].save(image)
    examples = [Example("1+2=?", "3"), Example("What is shown?", "x", images=[str(image)]),
                Example("a longer prompt, 33+4=?", "37")]
    engine = HFRolloutEngine(make_tiny_student(tokenizer), processor)
    seeds = prompt_seeds(0, 3, range(3))
    together = engine.generate(build_prompt_batch(examples, processor), 2, 10, seed=seeds, return_logprobs=True)
    for j, example in enumerate(examples):
        alone = engine.generate(build_prompt_batch([example], processor), 2, 10, seed=[seeds[j]],
                                return_logprobs=True)
        width = alone.completion_ids.shape[1]
        assert torch.equal(together.completion_ids[2 * j:2 * j + 2, :width], alone.completion_ids)
        assert torch.equal(together.completion_mask[2 * j:2 * j + 2, :width], alone.completion_mask)
        assert not together.completion_mask[2 * j:2 * j + 2, width:].any()
        assert together.texts[2 * j:2 * j + 2] == alone.texts
        torch.testing.assert_close(together.logprobs[2 * j:2 * j + 2, :width], alone.logprobs)
    assert len(set(prompt_seeds(0, 0, range(4)) + prompt_seeds(0, 1, range(4)) + prompt_seeds(1, 0, range(4)))) == 12


@pytest.mark.parametrize("name,world", [("paper_1x8_gpu.yaml", 8), ("paper_2x8_gpu.yaml", 16)])
def test_example_gpu_configs_divide_over_their_ranks(name, world):
    cfg = load_config(ROOT / "configs" / name)
    rollouts = cfg.data.batch_size * cfg.rollout.num_generations
    micro_batches = cfg.optim.minibatches * cfg.optim.grad_accum
    assert cfg.data.batch_size % world == 0 and (rollouts // world) % micro_batches == 0
    assert rollouts // world // cfg.optim.grad_accum == 10  # micro-batches of 10 rollouts
    step = cfg.sft.batch_size * cfg.sft.grad_accum
    assert step == 256 and step % world == 0 and step // world >= cfg.sft.grad_accum
    assert cfg.rollout.tensor_parallel_size == 1 and cfg.optim.packing and cfg.sft.packing
    assert cfg.distributed.backend == "deepspeed" and Path(ROOT / cfg.distributed.deepspeed_config).is_file()
    assert (ROOT / "scripts" / f"launch_{world // 8}x8.sh").is_file()


def test_deepspeed_configs(tmp_path):
    from vold.distributed import deepspeed_config, zero_stage

    for stage in (2, 3):
        for suffix in ("", "_cpu"):
            cfg = deepspeed_config(str(ROOT / "configs" / "deepspeed" / f"zero{stage}{suffix}.json"), grad_accum=4,
                                   max_grad_norm=0.5, bf16=True)
            assert zero_stage(cfg) == stage and cfg["gradient_accumulation_steps"] == 4
            assert cfg["gradient_clipping"] == 0.5 and cfg["train_micro_batch_size_per_gpu"] == 1
            assert "train_batch_size" not in cfg and cfg["zero_allow_untested_optimizer"]
            assert ("bf16" in cfg) is (suffix == "") and cfg.get("bf16", {"enabled": True})["enabled"] is True
    assert zero_stage(deepspeed_config(None, grad_accum=1, max_grad_norm=1.0)) == 2  # the default: ZeRO-2
    bad = Path(ROOT / "configs" / "deepspeed" / "zero2.json").read_text().replace('"bf16"', '"optimizer": {}, "bf16"')
    path = tmp_path / "bad.json"
    path.write_text(bad)
    with pytest.raises(ValueError, match="remove the 'optimizer' section"):
        deepspeed_config(str(path), grad_accum=1, max_grad_norm=1.0)
