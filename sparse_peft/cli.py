"""The ``sparse-peft`` command line: dispatches to one module per sub-command in ``commands/``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .commands import SUBCOMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-peft", description="Sparse parameter-efficient fine-tuning for PEFT."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.commands.{name}":
                raise
            continue  # sub-command not part of this build yet
        module.register(sub)
    return parser


def quiet_libraries() -> None:
    """For a command-line user: no per-file "Loading weights" bars from transformers, and not the deprecation
    notice PEFT triggers in transformers on every model it wraps (``is_gradient_checkpointing``), which the user
    cannot act on. Our own progress bars and every other warning stay."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
