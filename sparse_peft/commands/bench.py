"""``sparse-peft bench``: side-by-side benchmarks against PEFT; writes docs/benchmarks.md.

Application layer. The benchmarks are a folder of the source repository, not part of the installed library: this
command runs them (``python -m benchmarks``) in a child process from the checkout the package was installed from
(``pip install -e .``), and says how to get one otherwise.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
"""The source checkout of an editable install (sparse_peft/commands/bench.py is two folders below it)."""


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
    if not (CHECKOUT / "benchmarks" / "__main__.py").is_file():
        print(
            "sparse-peft bench: the benchmarks are part of the source repository, not of the installed package; "
            "clone the repository, `pip install -e .` it and run this again (or `python -m benchmarks` there).",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out or ("docs/benchmarks-quick.md" if args.quick else "docs/benchmarks.md")).resolve()
    command = [sys.executable, "-m", "benchmarks", "--out", str(out)] + (["--quick"] if args.quick else [])
    return subprocess.run(command, cwd=CHECKOUT).returncode
