"""The ``sparse-peft`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-peft", description="Sparse parameter-efficient fine-tuning for PEFT."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    quick = sub.add_parser(
        "quickstart",
        help="train, evaluate, save, reload and merge a sparse adapter on a tiny built-in model",
        description="End-to-end run on a tiny model built from a config (nothing is downloaded).",
    )
    quick.add_argument(
        "--output", default="quickstart-out", help="output directory (default: ./quickstart-out)"
    )
    quick.add_argument("--steps", type=_positive_int, default=150, help="training steps (default: 150)")
    quick.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    quick.add_argument("--no-demo", action="store_true", help="do not start the demo afterwards")

    bench = sub.add_parser(
        "bench",
        help="side-by-side speed/memory benchmarks against PEFT; writes docs/benchmarks.md",
        description="Runs each method in its own process and writes the figures to a markdown file.",
    )
    bench.add_argument("--quick", action="store_true", help="tiny configuration (smoke test)")
    bench.add_argument(
        "--out",
        default=None,
        help="markdown file to write (default: docs/benchmarks.md; with --quick: docs/benchmarks-quick.md)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "quickstart":
        from .quickstart import format_result, run_quickstart

        result = run_quickstart(args.output, steps=args.steps, seed=args.seed)
        print(format_result(result, args.output))
        if not args.no_demo:
            print(
                "The Gradio demo is not part of this release yet; rerun with --no-demo to silence this note."
            )
        return 0
    if args.command == "bench":
        from benchmarks.__main__ import main as bench_main

        out = args.out or ("docs/benchmarks-quick.md" if args.quick else "docs/benchmarks.md")
        bench_args = ["--out", out] + (["--quick"] if args.quick else [])
        return int(bench_main(bench_args) or 0)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
