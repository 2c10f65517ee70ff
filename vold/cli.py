"""The ``vold`` command line (also ``python -m vold``).

    vold make-traces [--config run.yaml] [key.sub=value ...]             stage 0: teacher traces
    vold sft         [--config run.yaml] [key.sub=value ...] [--resume auto|none|PATH]  stage 1
    vold train       [--config run.yaml] [key.sub=value ...] [--resume auto|none|PATH]  stage 2
    vold sophia      [--config run.yaml] [key.sub=value ...] [--resume auto|none|PATH]  semi-off-policy RL
    vold eval        [--config run.yaml] [key.sub=value ...]             pass@1 / mean@k
    vold demo        [--quick] [--seeds N] [--output DIR] [key=value ...]  the ablation on a toy task (CPU)
    vold bench kernels [...]                                             kernel benchmarks (from a checkout)
    vold bench step [--config run.yaml] [key.sub=value ...] [--steps N]  trainer step: tokens/s, time per phase
    vold bench trainer [--quick] [--lengths ...] [--mem-cap-gb G]        one update step: vold vs TRL trainers
    vold gpu-check [--dry-run] [--output DIR]                           GPU readiness check (from a checkout)

Every stage reads one config (YAML, then the ``key.sub=value`` overrides) and writes its run folder
``{output_dir}/{traces,sft,rl,sophia,eval}`` with the resolved ``config.yaml``.
"""

from __future__ import annotations

import argparse
import os
import sys

STAGES = {
    "make-traces": "the teacher writes reasoning traces for text-only prompts (JSONL in, JSONL out)",
    "sft": "cold-start SFT of the student on the traces",
    "train": "GRPO + reverse-KL distillation from the teacher on the student's rollouts",
    "sophia": "semi-off-policy RL (SOPHIA): student captions, teacher traces, reward-weighted update",
    "eval": "pass@1 and mean@k accuracy on JSONL benchmarks",
}


def run_stage(command: str, config: str | None, overrides: list[str], resume: str | None) -> None:
    from transformers.utils import logging as hf_logging

    from vold.config import load_config

    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars on every save
    if resume is not None:
        overrides = [*overrides, f"checkpoint.resume={resume}"]
    cfg = load_config(config, overrides)
    if command in ("make-traces", "eval") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit(f"vold {command} runs in one process (it samples; it is not data-parallel): "
                         f"launch it with python -m vold / vold, not torchrun")
    if command == "make-traces":
        from vold.traces import make_traces

        make_traces(cfg)
    elif command == "sft":
        from vold.sft import train_sft

        train_sft(cfg)
    elif command == "train":
        from vold.rl import train_rl

        train_rl(cfg)
    elif command == "sophia":
        from vold.sophia import train_sophia

        train_sophia(cfg)
    elif command == "eval":
        from vold.evaluate import evaluate

        evaluate(cfg)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="vold", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    # add_help=False: `vold bench step --help` reaches the benchmark's own parser
    bench = sub.add_parser("bench", help="benchmarks (run from a checkout: they live in benchmarks/)", add_help=False)
    bench.add_argument("what", choices=["kernels", "step", "trainer"])
    for name, help_text in STAGES.items():
        stage = sub.add_parser(name, help=help_text, description=help_text)
        stage.add_argument("--config", default=None, help="YAML config file (default: the built-in defaults)")
        stage.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")  # for --help
        if name in ("sft", "train", "sophia"):
            stage.add_argument("--resume", default=None, metavar="auto|none|PATH",
                               help="auto: the latest checkpoint of the run folder (sets checkpoint.resume)")
    sub.add_parser("gpu-check", help="GPU readiness: kernel tests, kernel benchmark, train and SFT steps on the "
                                     "device (from a checkout: benchmarks/gpu_check.py)", add_help=False)
    demo = sub.add_parser("demo", help="the VOLD ablation at laptop scale on the CPU (toy task, tiny models)",
                          description="Teacher, perception-aligned student, then arms (a)-(e) through the stages "
                                      "above; writes a results table and figures (see docs/demo.md).")
    demo.add_argument("--quick", action="store_true", help="a small, fast run (about 2 minutes): a smoke test")
    demo.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: 3; 1 with --quick)")
    demo.add_argument("--output", default=None, help="run folder (default: runs/demo, runs/demo-quick)")
    demo.add_argument("--cache-dir", default=None, help="cached teacher/student models (default: OUTPUT/cache)")
    demo.add_argument("--jobs", type=int, default=None, help="stages run at once in worker processes (default 1)")
    demo.add_argument("--threads", type=int, default=None, help="torch threads per worker (default 1)")
    demo.add_argument("--report-only", action="store_true", help="rewrite the table and figures of a finished run")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="demo settings (vold/demo/config.py)")
    if argv and argv[0] == "demo":
        from vold.demo.pipeline import main as demo_main

        return demo_main(parser.parse_args(argv))
    if argv and argv[0] == "bench":
        args, rest = parser.parse_known_args(argv)
        try:
            if args.what == "step":
                from benchmarks.step import main as bench_main
            elif args.what == "trainer":
                from benchmarks.trainer import main as bench_main
            else:
                from benchmarks.kernels import main as bench_main
        except ImportError as error:
            raise SystemExit(f"vold bench needs the repository's benchmarks/ directory on the path: {error}") from error
        bench_main(rest)  # returns its result dictionary
        return 0
    if argv and argv[0] == "gpu-check":
        try:
            from benchmarks.gpu_check import main as gpu_check_main
        except ImportError as error:
            raise SystemExit(f"vold gpu-check needs the repository's benchmarks/ directory on the path: "
                             f"{error}") from error
        return 0 if gpu_check_main(argv[1:])["status"] == "ok" else 1
    args, rest = parser.parse_known_args(argv)  # overrides may come before or after the options
    unknown = [a for a in rest if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (overrides look like key.sub=value)")
    run_stage(args.command, args.config, [*args.overrides, *rest], getattr(args, "resume", None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
