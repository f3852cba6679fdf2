"""One module per ``sparse-peft`` sub-command.

Each module exposes ``register(subparsers) -> None`` (adds its parser and sets ``func`` via
``set_defaults``) and a ``run(args) -> int``. Heavy imports stay inside ``run`` so ``--help`` is fast.
"""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a float > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


SUBCOMMANDS = ("quickstart", "train", "demo", "bench")
