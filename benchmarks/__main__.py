"""``python -m benchmarks [--quick] [--out docs/benchmarks.md]``: run every method side by side, write the report.

Each (model size, method) pair runs in its own process; the figures go to a JSON file next to the markdown
(``docs/benchmarks.json`` by default) and :mod:`benchmarks.report` renders the markdown from it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import report
from .train_step import (
    METHODS,
    REPO_ROOT,
    SIZES,
    StepSettings,
    combine_rounds,
    resolve_device,
    run_isolated,
)

QUICK = {"sizes": ["quick"], "r": 8, "warmup": 2, "steps": 2, "rounds": 1}
FULL = {"sizes": ["20m", "100m", "400m"], "r": 16, "warmup": 2, "steps": 3, "rounds": 2}


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="One training step of each method (own process each) on Llama decoders built from configs.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny configuration for CI (smoke test)")
    parser.add_argument("--out", default="docs/benchmarks.md", help="markdown file to write")
    parser.add_argument("--results", default=None, help="JSON results file (default: --out with .json)")
    parser.add_argument(
        "--sizes", nargs="+", choices=sorted(SIZES), help="model sizes (default: 20m 100m 400m; quick)"
    )
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="methods (default: all)")
    parser.add_argument(
        "--r", type=_count, help="LoRA rank / equivalent sparse budget (default: 16; quick 8)"
    )
    parser.add_argument(
        "--warmup", type=_count, help="untimed steps that measure memory (default and minimum: 2)"
    )
    parser.add_argument("--steps", type=_count, help="timed steps per process (default: 3; quick 2)")
    parser.add_argument(
        "--rounds",
        type=_count,
        help="fresh processes per method, in rotating order; steps pooled (default: 2; quick 1)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per process; 0: torch's default (default: 1)"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per method")
    parser.add_argument("--report-only", action="store_true", help="re-render --out from existing --results")
    parser.add_argument(
        "--no-sections", action="store_true", help="skip the adapter-file/switch and kernel sections"
    )
    return parser


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        return "no commit (working tree)"
    return out.stdout.strip() + (" + local changes" if dirty.stdout.strip() else "")


def machine_info(device: str) -> dict[str, Any]:
    """The device, software versions and load, as they stand now."""
    import peft
    import torch
    import transformers

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }
    if resolve_device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = list(os.getloadavg())
    return info


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    results_path = Path(args.results) if args.results else out.with_suffix(".json")
    if args.report_only:
        report.write(json.loads(results_path.read_text()), out)
        print(f"wrote {out} from {results_path}")
        return 0

    defaults = QUICK if args.quick else FULL
    sizes = args.sizes or defaults["sizes"]
    methods = args.methods or list(METHODS)
    settings = StepSettings(
        r=args.r or defaults["r"],
        warmup=defaults["warmup"] if args.warmup is None else args.warmup,
        steps=args.steps or defaults["steps"],
        device=args.device,
        threads=args.threads or None,
    )
    started = dt.datetime.now(dt.UTC)
    data: dict[str, Any] = {
        "meta": {
            "command": shlex.join(["python", "-m", "benchmarks", *argv]),
            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "commit": _git_commit(),
            "quick": args.quick,
            **machine_info(args.device),
        },
        "settings": asdict(settings),
        "runs": [],
    }
    rounds = args.rounds or defaults["rounds"]
    data["settings"]["rounds"] = rounds
    for size in sizes:
        spec = SIZES[size]
        records: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for i in range(rounds):
            for method in methods[i % len(methods) :] + methods[: i % len(methods)]:
                print(f"[{size}] round {i + 1}/{rounds}: {method} ...", flush=True)
                records[method].append(run_isolated(method, spec, settings, timeout_s=args.timeout))
                print("    " + report.one_line(records[method][-1]), flush=True)
        results = [combine_rounds(records[m]) for m in methods]
        data["runs"].append({"spec": asdict(spec), "description": spec.describe(), "results": results})
    if not args.no_sections:
        for (
            name
        ) in report.RUN_SECTIONS:  # adapter files / switching / first token, kernels: JSON beside the report
            print(f"[{name}] ...", flush=True)
            module = importlib.import_module(f"benchmarks.{name}")
            section_argv = ["--out", str(out.parent / f"{name}.json")] + (["--quick"] if args.quick else [])
            if module.main(section_argv) != 0:
                print(f"section {name} reported failures", file=sys.stderr)
    if hasattr(os, "getloadavg"):
        data["meta"]["loadavg_end"] = list(os.getloadavg())
    data["meta"]["wall_s"] = (dt.datetime.now(dt.UTC) - started).total_seconds()
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(data, indent=1) + "\n")
    report.write(data, out)
    print(f"wrote {results_path} and {out}")
    failed = [r["method"] for run in data["runs"] for r in run["results"] if "error" in r]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
