"""The ``vold`` command line (also ``python -m vold``).

    vold make-traces [--config run.yaml] [key.sub=value ...] [--overwrite]  stage 0: teacher traces
    vold sft         [--config run.yaml] [key.sub=value ...] [--resume auto|none|PATH]  stage 1
    vold train       [--config run.yaml] [key.sub=value ...] [--resume auto|none|PATH]  stage 2
    vold sophia      [--config run.yaml] [key.sub=value ...] [--resume auto|none|PATH]  semi-off-policy RL
    vold eval        [--config run.yaml] [key.sub=value ...]             pass@1 / mean@k
    vold convert-gguf FOLDER FILE.gguf OUT [--dtype float32] [--overwrite]  a GGUF checkpoint -> a model folder
    vold demo        [--quick] [--seeds N] [--output DIR] [key=value ...]  the ablation on a toy task (CPU)
    vold bench kernels [...]                                             kernel benchmarks (from a checkout)
    vold bench step [--config run.yaml] [key.sub=value ...] [--steps N]  trainer step: tokens/s, time per phase
    vold bench trainer [--quick] [--lengths ...] [--mem-cap-gb G]        one update step: vold vs TRL trainers
    vold gpu-check [--dry-run] [--output DIR]                           GPU readiness check (from a checkout)

Every stage reads one config (YAML, then the ``key.sub=value`` overrides) and writes its run folder
``{output_dir}/{traces,sft,rl,sophia,eval}`` with the resolved ``config.yaml``.

A stage never continues an earlier run unless asked (``--resume auto``): a run folder that already holds
checkpoints or a final model is refused (``overwrite_output_dir=true`` starts over); so is an existing output of
``make-traces`` (``traces.output_file``) or ``convert-gguf`` (a non-empty ``OUT``) unless ``--overwrite`` is given
(for make-traces: ``overwrite_output_dir=true``). A user error (bad config,
missing file or model, unfit data) prints one line ``vold <command>: error: ...`` and exits with status 2,
before any run folder is written; ``--debug`` (anywhere on the line) or ``VOLD_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

STAGES = {
    "make-traces": "the teacher writes reasoning traces for text-only prompts (JSONL in, JSONL out)",
    "sft": "cold-start SFT of the student on the traces",
    "train": "GRPO + reverse-KL distillation from the teacher on the student's rollouts",
    "sophia": "semi-off-policy RL (SOPHIA): student captions, teacher traces, reward-weighted update",
    "eval": "pass@1 and mean@k accuracy on JSONL benchmarks",
}

#: ``vold bench VERB``: one line each (``vold bench --help`` lists them; ``vold bench VERB --help``: its options)
BENCH_VERBS = {
    "step": "trainer step: tokens/s of a full `vold train` step and its time per phase (rollout, scoring, update)",
    "kernels": "kernel benchmarks: time and peak memory of one loss, vold's engines vs plain PyTorch, TRL, Liger",
    "trainer": "one update step of GRPO + distillation: vold vs TRL trainers, same models and rollouts",
}


# what each command imports beyond torch/numpy: {module: pip name}, and the extra of setup.py that installs it
TRAIN_DEPS = {"transformers": "transformers", "math_verify": "math-verify", "yaml": "pyyaml", "PIL": "pillow"}
DEPENDENCIES = {
    **{stage: ("train", TRAIN_DEPS) for stage in STAGES},
    "demo": ("demo", {**TRAIN_DEPS, "matplotlib": "matplotlib"}),
    "bench": ("train", TRAIN_DEPS),
    "gpu-check": ("train", TRAIN_DEPS),
    "convert-gguf": ("train", {"transformers": "transformers", "gguf": "gguf"}),
}
USER_ERRORS = (ValueError, OSError, ImportError)  # FileNotFoundError is an OSError; transformers raises OSError too


class UserError(ValueError):
    """An error in what the user asked for (config, files, environment): ``vold`` prints its message in one line
    and exits with status 2 (as for every ValueError/OSError/ImportError; ``--debug`` shows the traceback)."""


def check_dependencies(command: str) -> None:
    """Raise :class:`UserError` naming the missing packages and the extra that installs them, before any work."""
    extra, needs = DEPENDENCIES.get(command, ("train", {}))
    missing = [pip for module, pip in needs.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"vold {command} needs {', '.join(missing)}: pip install 'vold[{extra}]' "
                        f"(in a checkout: pip install -e '.[{extra}]')")


def quiet_third_party() -> None:
    """Route third-party chatter through ``logging`` at WARNING, so tqdm bars are not broken by it: DeepSpeed's
    accelerator lines ("Setting ds_accelerator to cpu"), transformers' progress bars and info messages."""
    import logging

    for name in ("DeepSpeed", "deepspeed", "torch.distributed.elastic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if importlib.util.find_spec("deepspeed") is not None:  # its import logs the accelerator it picks: say it
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if _cuda_visible() else "cpu")  # (no auto-detect warning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars on every save
    hf_logging.set_verbosity_warning()


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def check_output_paths(cfg: Any) -> None:
    """Raise UserError naming the key when an output folder is, or lies under, an existing file (``output_dir`` set
    to a file gave "[Errno 20] Not a directory: '<file>/rl'", naming no key)."""
    output_file = cfg.traces.output_file
    for key, value, folder in (("output_dir", cfg.output_dir, cfg.output_dir),
                               ("eval.output_dir", cfg.eval.output_dir, cfg.eval.output_dir),
                               ("traces.output_file", output_file, output_file and os.path.dirname(output_file))):
        if not folder:
            continue
        for path in (Path(folder), *Path(folder).parents):
            if path.exists():
                if not path.is_dir():
                    raise UserError(f"config key '{key}' = {value!r}: {path} is a file, not a folder")
                break


def run_stage(command: str, config: str | None, overrides: list[str], resume: str | None,
              overwrite: bool = False) -> None:
    from vold.config import load_config

    quiet_third_party()
    if resume is not None:
        overrides = [*overrides, f"checkpoint.resume={resume}"]
    if overwrite:  # make-traces' --overwrite: the config key every stage reads
        overrides = [*overrides, "overwrite_output_dir=true"]
    cfg = load_config(config, overrides)
    check_output_paths(cfg)
    if command in ("make-traces", "eval") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"vold {command} runs in one process (it samples; it is not data-parallel): "
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vold", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also VOLD_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    # add_help=False: `vold bench step --help` reaches the benchmark's own parser
    bench = sub.add_parser("bench", help="benchmarks (run from a checkout: they live in benchmarks/)", add_help=False)
    bench.add_argument("what", choices=list(BENCH_VERBS))
    for name, help_text in STAGES.items():
        stage = sub.add_parser(name, help=help_text, description=help_text)
        stage.add_argument("--config", default=None, help="YAML config file (default: the built-in defaults)")
        stage.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")  # for --help
        if name in ("sft", "train", "sophia"):
            stage.add_argument("--resume", default=None, metavar="auto|none|PATH",
                               help="auto: continue from the latest checkpoint of the run folder; none (default): "
                                    "a fresh start, refused in a folder holding a run; PATH: that checkpoint "
                                    "(sets checkpoint.resume)")
        if name == "make-traces":
            stage.add_argument("--overwrite", action="store_true",
                               help="replace an existing traces.output_file (and the run folder's stats.json, "
                                    "dropped.jsonl); refused without it (sets overwrite_output_dir=true)")
    sub.add_parser("gpu-check", help="GPU readiness: kernel tests, kernel benchmark, train and SFT steps on the "
                                     "device (from a checkout: benchmarks/gpu_check.py)", add_help=False)
    gguf = sub.add_parser("convert-gguf", help="dequantise a GGUF checkpoint into a save_pretrained model folder",
                          description="Dequantise FOLDER/FILE (a GGUF checkpoint, e.g. SmolLM2's) into OUT: model "
                                      "+ tokenizer, loadable as model.student / model.teacher (needs gguf).")
    gguf.add_argument("folder", help="folder holding the .gguf file (and, if any, its tokenizer/config files)")
    gguf.add_argument("file", help="the .gguf file name inside FOLDER")
    gguf.add_argument("out", help="output folder (save_pretrained)")
    gguf.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gguf.add_argument("--overwrite", action="store_true",
                      help="replace OUT although it already holds files (refused without it)")
    demo = sub.add_parser("demo", help="the VOLD ablation at laptop scale on the CPU (toy task, tiny models)",
                          description="Teacher, perception-aligned student, then arms (a)-(g) through the stages "
                                      "above; writes a results table and figures (see docs/demo.md).")
    demo.add_argument("--quick", action="store_true", help="a small, fast run (about 2 minutes): a smoke test")
    demo.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: 3; 1 with --quick)")
    demo.add_argument("--output", default=None, help="run folder (default: runs/demo, runs/demo-quick)")
    demo.add_argument("--cache-dir", default=None, help="cached teacher/student models (default: OUTPUT/cache)")
    demo.add_argument("--jobs", type=int, default=None,
                      help="stages run at once in worker processes (default: one per CPU core, at most 4)")
    demo.add_argument("--threads", type=int, default=None, help="torch threads per worker (default 1)")
    demo.add_argument("--report-only", action="store_true", help="rewrite the table and figures of a finished run")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="demo settings (vold/demo/config.py)")
    return parser


def benchmark(name: str, command: str) -> ModuleType:
    """The module ``benchmarks.<name>`` of the checkout vold runs from (an editable install: the folder above
    ``vold/``), else of the current directory. A console script's ``sys.path`` holds neither, so without this
    ``vold bench`` failed from the repository root too. Raises UserError when no checkout is found (a wheel
    install has no benchmarks/); an ImportError inside a benchmark is raised as it is."""
    here = Path(__file__).resolve().parent.parent
    for root in (here, Path.cwd()):
        if (root / "benchmarks" / "__init__.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            break
    try:
        return importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as error:
        if error.name not in ("benchmarks", f"benchmarks.{name}"):
            raise
        raise UserError(f"{command} runs from a checkout of the repository (it needs its benchmarks/ folder; "
                        f"none beside {here / 'vold'} or in {Path.cwd()}): {error}") from error


def bench_help() -> str:
    """What ``vold bench --help`` prints: the sub-verbs, one line each."""
    width = max(map(len, BENCH_VERBS))
    lines = [f"usage: vold bench {{{','.join(BENCH_VERBS)}}} [options]", "", "benchmarks (run from a checkout: they "
             "live in benchmarks/); `vold bench VERB --help` shows that benchmark's options:", ""]
    return "\n".join([*lines, *(f"  {verb:<{width}}  {text}" for verb, text in BENCH_VERBS.items())])


def dispatch(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    command = argv[0] if argv else None
    if command in DEPENDENCIES and not {"-h", "--help"} & set(argv):
        check_dependencies(command)
    if command in ("demo", "bench"):
        quiet_third_party()
    if command == "demo":
        from vold.demo.pipeline import main as demo_main

        return demo_main(parser.parse_args(argv))
    if command == "bench":
        if len(argv) == 1 or argv[1] in ("-h", "--help"):  # the bench parser has no help of its own (see above)
            if len(argv) == 1:
                raise UserError(f"name a benchmark: vold bench {' | '.join(BENCH_VERBS)} (vold bench --help)")
            print(bench_help())
            return 0
        args, rest = parser.parse_known_args(argv)
        benchmark(args.what, "vold bench").main(rest)  # returns its result dictionary
        return 0
    if argv and argv[0] == "gpu-check":
        return 0 if benchmark("gpu_check", "vold gpu-check").main(argv[1:])["status"] == "ok" else 1
    if command == "convert-gguf":
        args = parser.parse_args(argv)
        from vold.models import convert_gguf

        quiet_third_party()
        if not (os.path.isfile(os.path.join(args.folder, args.file))):
            raise UserError(f"convert-gguf: {os.path.join(args.folder, args.file)} not found")
        if os.path.isfile(args.out):
            raise UserError(f"OUT={args.out} is a file; OUT is the output folder (save_pretrained)")
        if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
            raise UserError(f"OUT={args.out} already exists and is not empty: pass --overwrite to write "
                             f"the model over it, or choose another OUT")
        out = convert_gguf(args.folder, args.file, args.out, dtype=args.dtype)
        print(f"convert-gguf: {os.path.join(args.folder, args.file)} -> {out} (use it as model.student or "
              f"model.teacher)")
        return 0
    args, rest = parser.parse_known_args(argv)  # overrides may come before or after the options
    unknown = [a for a in rest if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (overrides look like key.sub=value)")
    run_stage(args.command, args.config, [*args.overrides, *rest], getattr(args, "resume", None),
              getattr(args, "overwrite", False))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``vold`` entry point; returns the exit status (2 for a user error, printed as one line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("VOLD_DEBUG", "").lower() not in ("", "0", "false", "no")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    try:
        return dispatch(parser, argv)
    except USER_ERRORS as error:
        if debug:
            raise
        command = argv[0] if argv and not argv[0].startswith("-") else ""
        message = " ".join(str(error).split()) or type(error).__name__  # one line
        print(f"vold {command}: error: {message} (--debug or VOLD_DEBUG=1: traceback)".replace("vold : ", "vold: "),
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
