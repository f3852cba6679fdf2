"""``sparse-peft bench``: side-by-side benchmarks against PEFT; writes docs/benchmarks.md."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
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
    bench.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from benchmarks.__main__ import main as bench_main

    out = args.out or ("docs/benchmarks-quick.md" if args.quick else "docs/benchmarks.md")
    bench_args = ["--out", out] + (["--quick"] if args.quick else [])
    return int(bench_main(bench_args) or 0)
