"""The ``vold`` command line: ``vold bench kernels [...]`` (more stages join as they land)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="vold", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks (run from a checkout: they live in benchmarks/)")
    bench.add_argument("what", choices=["kernels"])
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        try:
            from benchmarks.kernels import main as bench_main
        except ImportError as error:
            raise SystemExit(f"vold bench needs the repository's benchmarks/ directory on the path: {error}") from error
        return int(bench_main(rest) or 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
