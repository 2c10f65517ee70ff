"""The command line: ``python -m benchmarks.kernels [--preset ...] [options]`` (also ``vold bench kernels``)."""

from __future__ import annotations

import argparse
import ast
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..harness import REPO_ROOT, child_main, log, machine_info, write_result
from .config import (
    DEFAULT_ESTIMATORS,
    DEFAULT_IMPLS,
    DISTILL_COEF,
    DTYPES,
    EPSILON_HIGH,
    EPSILON_LOW,
    ESTIMATORS,
    IMPLS,
    LOSS_TYPE,
    PRESETS,
    Settings,
    Shape,
    _grid,
)
from .memory import child_measure
from .report import markdown, plot
from .sweep import run_shape
from .timing import WAIT_SPENT

# --help shows the package's docstring, read from its file (importing it from here would be an import cycle:
# the package imports this module)
DESCRIPTION = ast.get_docstring(ast.parse((Path(__file__).parent / "__init__.py").read_text()))


def _csv(kind: type, choices: Sequence[str] | None = None) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        items = tuple(kind(x) for x in text.split(",") if x.strip())
        bad = [x for x in items if choices is not None and x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of {choices or kind.__name__}")
        return items

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="shape set (per device type) and defaults; flags below override it (default: default)")
    p.add_argument("--shapes", type=_csv(Shape.parse), help="explicit shapes NxHxV[xHt],... (overrides --n/--h/--v)")
    p.add_argument("--n", type=_csv(int), help="token counts, e.g. 1024,2048 (grid with the preset's H and V)")
    p.add_argument("--h", type=_csv(int), help="hidden sizes")
    p.add_argument("--v", type=_csv(int), help="vocabulary sizes")
    p.add_argument("--impls", type=_csv(str, IMPLS), help=f"subset of {','.join(IMPLS)}")
    p.add_argument("--estimators", type=_csv(str, ESTIMATORS),
                   help="full,k2 (the loss) and/or logp,logp_grad (the log-prob pass alone) (default: the preset's, "
                        "else full,k2)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--repeats", type=int, help="timed calls per row (default 3; CPU quick/default presets 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing, >= 1 (default 1)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence, B = N / seq_len (default 512)")
    p.add_argument("--mask-fraction", type=float, default=1.0,
                   help="fraction of each sequence that is unmasked (right padding; default 1.0)")
    p.add_argument("--chunk-size", type=int, help="vold's chunk rows (default: vold's own rule); also gemm_floor's")
    p.add_argument("--liger-grpo-chunk", type=int, default=1, help="sequences per Liger GRPO chunk (TRL default 1)")
    p.add_argument("--liger-jsd-chunk", type=int, default=1024, help="tokens per Liger JSD chunk (default 1024)")
    p.add_argument("--naive-cap-gb", type=float,
                   help="skip naive when its estimated [N,V] buffers exceed this (default: 60%% of RAM / GPU memory)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--no-timing", action="store_true", help="only the peak-memory measurements (CPU: children)")
    p.add_argument("--mem-warmup", type=int, default=1,
                   help="calls in the memory child before the measured one (compiled rows: at least 1)")
    p.add_argument("--mem-jobs", type=int,
                   help="memory children run at once (default 1; quick preset 2): peaks are per process, RAM adds up")
    p.add_argument("--child-timeout", type=float, default=3600.0, help="seconds per memory child (default 3600)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-foreign-cpu", type=float, default=0.3,
                   help="cores other processes may use during a timed call before it is re-timed (default 0.3; "
                        "negative: never wait or re-time)")
    p.add_argument("--quiet-timeout", type=float, default=30.0,
                   help="longest wait (s) for a quiet machine before each timed call (default 30)")
    p.add_argument("--wait-budget", type=float,
                   help="longest total wait (s) for a quiet machine in this run (default 600; quick preset 20)")
    p.add_argument("--retries", type=int, default=2,
                   help="re-timings of a disturbed call, while the wait budget lasts (default 2)")
    p.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results",
                   help="output directory (default: benchmarks/results/)")
    p.add_argument("--tag", help="file name tag (default: the preset's name, or 'custom' with --shapes)")
    p.add_argument("--cold-compile", action="store_true",
                   help="disable torch.compile's caches, so compiled rows' first calls include a full compile "
                        "(by default a warm on-disk inductor cache can make them fast)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only re-write the markdown and plots of a saved kernels_<tag>.json (into --output)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings_and_shapes(args: argparse.Namespace) -> tuple[Settings, list[Shape], str]:
    """Resolve the preset, the device and the flags into ``Settings``, the shapes and the file tag."""
    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
        if device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available")
    kind = "cuda" if device == "cuda" else "cpu"
    if kind not in PRESETS[args.preset]:
        raise SystemExit(f"--preset {args.preset} is for {' / '.join(PRESETS[args.preset])} only (device: {device})")
    preset = PRESETS[args.preset][kind]
    shapes = list(preset["shapes"])
    if args.shapes:
        shapes = list(args.shapes)
    elif args.n or args.h or args.v:
        shapes = _grid(args.n or sorted({x.n for x in shapes}), args.h or sorted({x.h for x in shapes}),
                       args.v or sorted({x.v for x in shapes}))
    if not shapes:
        raise SystemExit("no shapes to run")
    if args.naive_cap_gb is not None:
        cap = int(args.naive_cap_gb * 1e9)
    elif device == "cuda":
        cap = int(0.6 * torch.cuda.get_device_properties(0).total_memory)
    else:
        cap = int(0.6 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    impls = args.impls or preset.get("impls", DEFAULT_IMPLS)
    if device != "cuda" and not args.impls:
        impls = tuple(i for i in impls if i != "vold_triton")
    s = Settings(
        device=device, dtype=args.dtype or preset.get("dtype", "bf16" if device == "cuda" else "fp32"),
        impls=tuple(impls), estimators=args.estimators or preset.get("estimators", DEFAULT_ESTIMATORS),
        repeats=args.repeats if args.repeats is not None else preset.get("repeats", 3), warmup=max(1, args.warmup),
        seq_len=args.seq_len, mask_fraction=args.mask_fraction, chunk_size=args.chunk_size,
        liger_grpo_chunk=args.liger_grpo_chunk, liger_jsd_chunk=args.liger_jsd_chunk, naive_cap_bytes=cap,
        memory=not args.no_memory, timing=not args.no_timing, mem_warmup=args.mem_warmup,
        mem_jobs=args.mem_jobs or preset.get("mem_jobs", 1), cold_compile=args.cold_compile,
        child_timeout=args.child_timeout, seed=args.seed,
        max_foreign_cpu=None if args.max_foreign_cpu < 0 else args.max_foreign_cpu,
        quiet_timeout=args.quiet_timeout, retries=args.retries,
        wait_budget=args.wait_budget if args.wait_budget is not None else preset.get("wait_budget", 600.0),
    )
    tag = args.tag or ("custom" if (args.shapes or args.n or args.h or args.v) else args.preset)
    return s, shapes, tag


def write_outputs(result: dict[str, Any], out_dir: Path, tag: str, plots: bool) -> list[Path]:
    """kernels_<tag>.json and .md (after every shape, so a stopped sweep keeps its rows), and the plots."""
    paths = write_result(result, markdown(result), out_dir, f"kernels_{tag}")
    return paths + (plot(result, out_dir, tag) if plots else [])


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run the benchmark; write JSON, markdown and plots; return the result dictionary."""
    args = parse_args(argv)
    if args.child:
        child_main(child_measure, args.child)
        return None
    if args.render:
        result = json.loads(args.render.read_text())
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / f"kernels_{result['tag']}.md").write_text(markdown(result))
        plot(result, args.output, result["tag"])
        print(markdown(result))
        return result
    s, shapes, tag = settings_and_shapes(args)
    device = torch.device(s.device)
    if s.cold_compile:
        import torch._inductor.config as inductor_config

        inductor_config.force_disable_caches = True
    started = time.perf_counter()
    WAIT_SPENT[0] = 0.0
    log(f"vold kernel benchmark [{tag}]: {len(shapes)} shape(s) on {device} ({s.dtype}), "
         f"impls {','.join(s.impls)}, estimators {','.join(s.estimators)}")
    out_dir: Path = args.output
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    for i, shape in enumerate(shapes):
        log(f"{shape}:")
        rows += run_shape(shape, s)
        result = {
            "tag": tag, "machine": machine_info(device), "settings": asdict(s),
            "objective": {"loss_type": LOSS_TYPE, "epsilon_low": EPSILON_LOW, "epsilon_high": EPSILON_HIGH,
                          "distill_coef": DISTILL_COEF, "divergence": "reverse_kl"},
            "shapes": [asdict(x) for x in shapes], "complete": i == len(shapes) - 1, "rows": rows,
            "elapsed_s": time.perf_counter() - started, "waited_for_quiet_s": WAIT_SPENT[0],
        }
        written = write_outputs(result, out_dir, tag, plots=not args.no_plots and i == len(shapes) - 1)
    print(markdown(result))
    log("wrote " + ", ".join(str(p) for p in written))
    return result


if __name__ == "__main__":
    main()
