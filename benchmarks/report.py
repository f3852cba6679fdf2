"""Render ``docs/benchmarks.md`` from a JSON results file, and judge issue 2's targets from the figures.

``python -m benchmarks.report docs/benchmarks.json [--out docs/benchmarks.md]``. Every figure in the markdown
comes from the JSON; nothing is written by hand.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIB = 2**20
OURS = (
    "sparse_delta_fused", "sparse_delta_separate", "sparse_delta_blocks", "sparse_delta_dynamic", "sparse_delta_dynamic20",
    "s2ft",
)
"""Our sparse adapters: judged against the memory and time targets."""
SECTIONS = ("adapters", "mixed_batch", "demo_load", "kernels", "quality", "composition", "sparsepo")
"""Other benchmark modules whose ``docs/<name>.json`` is rendered after the training-step tables, in this order."""
RUN_SECTIONS = ("adapters", "mixed_batch", "kernels")
"""The sections ``python -m benchmarks`` measures itself (``benchmarks.quality``, ``benchmarks.composition`` and
``benchmarks.sparsepo`` run on their own: they train or evaluate for many minutes)."""
LINKED_DOCS = (
    ("sparsepo.md", "DPO vs SparsePO on a generated preference task"),
    ("sparse_masks.md", "static vs dynamic sparse masks (accuracy at equal density)"),
    ("sora_group_sparse.md", "SoRA / group-sparse LoRA sparsity and export"),
    ("benchmarks_rounds.md", "the 100m training step in more rounds: each method's step ratio to LoRA per round"),
)
GPU_RESULTS = "benchmarks_gpu.json"
"""The same training-step run on a GPU machine, summarised in ``benchmarks.md`` when present beside it (rendered in
full into ``benchmarks_gpu.md``)."""


def mean_std(values: Sequence[float], fmt: str) -> str:
    """``mean ± std`` over seeds, each formatted with ``fmt`` (``".1%"``, ``".3f"``); the value alone for one seed."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.fmean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def save_section(data: dict[str, Any], out: Path, render: Callable[[dict[str, Any]], str]) -> int:
    """Stamp a section benchmark's results with the CPU machine and date, write them to ``out`` (the JSON the
    report renders) and print the rendered section."""
    import torch

    data["machine"] = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
    data["date"] = dt.date.today().isoformat()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    print(render(data))
    return 0


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` (CPU: no synchronisation needed)."""
    import time

    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def section_arguments(description: str, default_out: Path, argv: Sequence[str]) -> argparse.Namespace:
    """The options every section benchmark takes: ``--quick`` (a smoke configuration) and ``--out`` (its JSON)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny model, few repeats (smoke test)")
    parser.add_argument("--out", default=str(default_out), help=f"JSON file to write (default: {default_out})")
    return parser.parse_args(argv)


def plot_names(stem: str) -> tuple[str, str]:
    """The time and memory plot files of the report ``<stem>.md`` (one pair per report, side by side in docs/)."""
    return f"{stem}_time.png", f"{stem}_memory.png"


# issue 2, item 5
PEAK_VS_LORA = 1.10
PEAK_VS_SHIRA = 0.70
TIME_VS_LORA = 1.30


@dataclass(frozen=True)
class Check:
    """One target for one method: ``value <= limit``."""

    target: str
    method: str
    value: float
    limit: float
    shown: str  # the value as the reader sees it, e.g. "0.93x LoRA"

    @property
    def met(self) -> bool:
        return self.value <= self.limit


def by_method(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The run's successful records, keyed by method name."""
    return {r["method"]: r for r in run["results"] if "error" not in r}


def memory_contract(
    run: dict[str, Any],
    tolerance: float = PEAK_VS_LORA - 1,
    slack_bytes: int = 0,
    methods: Sequence[str] = OURS,
) -> list[Check]:
    """Our adapters' extra step memory vs LoRA's: ``extra <= (1 + tolerance) * lora_extra + slack_bytes``."""
    recs = by_method(run)
    lora = recs["lora"]["extra_bytes"]
    limit = (1 + tolerance) * lora + slack_bytes
    return [
        Check(
            f"step extra memory <= LoRA's x{1 + tolerance:.2f} + {slack_bytes / MIB:.0f} MiB",
            m,
            recs[m]["extra_bytes"],
            limit,
            f"{recs[m]['extra_bytes'] / MIB:.1f} MiB (limit {limit / MIB:.1f} MiB)",
        )
        for m in methods
    ]


MEMORY_READINGS = (
    ("peak_bytes", "peak memory (whole process)"),
    ("model_and_step_bytes", "peak memory above the libraries (model + step)"),
    ("extra_bytes", "step's extra memory"),
)


def target_checks(run: dict[str, Any], methods: Sequence[str] = OURS) -> list[Check]:
    """Issue 2's targets for each of ``methods`` present in ``run`` (needs LoRA and shira in it too).

    The memory targets are judged on each reading of "peak memory" in :data:`MEMORY_READINGS`.
    """
    recs = by_method(run)
    lora, shira = recs.get("lora"), recs.get("shira")
    checks: list[Check] = []
    for m in methods:
        ours = recs.get(m)
        if ours is None:
            continue
        for key, what in MEMORY_READINGS:
            if lora is not None:
                ratio = ours[key] / lora[key]
                checks.append(Check(f"{what} <= LoRA's + 10%", m, ratio, PEAK_VS_LORA, f"{ratio:.2f}x LoRA"))
            if shira is not None:
                ratio = ours[key] / shira[key]
                checks.append(
                    Check(f"{what} <= 70% of shira's", m, ratio, PEAK_VS_SHIRA, f"{ratio:.2f}x shira")
                )
        if lora is not None:
            ratio = ours["median_step_s"] / lora["median_step_s"]
            checks.append(
                Check("median step time <= 1.3x LoRA's", m, ratio, TIME_VS_LORA, f"{ratio:.2f}x LoRA")
            )
    return checks


def one_line(record: dict[str, Any]) -> str:
    """A console summary of one record."""
    if "error" in record:
        return f"FAILED: {record['error'].strip().splitlines()[-1]}"
    return (
        f"trainable {record['trainable_params']:,}  peak {record['peak_bytes'] / MIB:,.1f} MiB  "
        f"extra {record['extra_bytes'] / MIB:,.1f} MiB  median step {record['median_step_s'] * 1e3:,.1f} ms"
    )


def _ratio(value: float, ref: float | None) -> str:
    return "" if not ref else f"{value / ref:.2f}"


def _table(run: dict[str, Any]) -> list[str]:
    recs = by_method(run)
    lora = recs.get("lora") or {}
    lines = [
        "| method | trainable params | peak memory, process (MiB) | model + step (MiB) | / LoRA "
        "| step's extra (MiB) | / LoRA | median step (ms) | / LoRA | / LoRA per round: median (min-max) "
        "| timed steps min-max (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in run["results"]:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'].strip().splitlines()[-1]} ||||||||")
            continue
        times = r["step_times_s"]
        lines.append(
            f"| {r['label']} | {r['trainable_params']:,} | {r['peak_bytes'] / MIB:,.1f} "
            f"| {r['model_and_step_bytes'] / MIB:,.1f} "
            f"| {_ratio(r['model_and_step_bytes'], lora.get('model_and_step_bytes'))} "
            f"| {r['extra_bytes'] / MIB:,.1f} | {_ratio(r['extra_bytes'], lora.get('extra_bytes'))} "
            f"| {r['median_step_s'] * 1e3:,.0f} | {_ratio(r['median_step_s'], lora.get('median_step_s'))} "
            f"| {_round_ratios(r, lora)} | {min(times) * 1e3:,.0f}-{max(times) * 1e3:,.0f} |"
        )
    return lines


def ratio_spread(ratios: Sequence[float]) -> str:
    """Per-round ratios as ``median (min-max)``; '—' below two rounds (no spread to show)."""
    if len(ratios) < 2:
        return "—"
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def _round_ratios(record: dict[str, Any], lora: dict[str, Any]) -> str:
    """Step time / LoRA's, one per round: each round ran every method once, back to back (rotating order), so a
    round's ratio cancels the machine's slow drifts that the pooled medians carry."""
    mine, theirs = record.get("rounds") or [], lora.get("rounds") or []
    return ratio_spread([a["median_step_s"] / b["median_step_s"] for a, b in zip(mine, theirs, strict=False)])


def _targets(run: dict[str, Any], on_gpu: bool) -> list[str]:
    checks = target_checks(run)
    if not checks:
        return ["Targets not judged: LoRA, shira or our adapters are missing from this run."]
    rows: dict[str, dict[str, Check]] = {}
    for c in checks:
        rows.setdefault(c.target, {})[c.method] = c
    present = [m for m in OURS if any(m in row for row in rows.values())]
    labels = {r["method"]: r["label"] for r in run["results"]}
    reference = {c.target: c for c in target_checks(run, ["lora"])}
    lines = [
        "| target | " + " | ".join(labels[m] for m in present) + " | reference: PEFT LoRA itself |",
        "|---|" + "---|" * (len(present) + 1),
    ]
    for target, row in rows.items():
        note = " (stated for CPU)" if on_gpu and "time" in target else ""
        cells = [
            f"{row[m].shown}: **{'met' if row[m].met else 'MISSED'}**" if m in row else "not measured"
            for m in present
        ]
        cells.append(reference[target].shown if target in reference else "")
        lines.append(f"| {target}{note} | " + " | ".join(cells) + " |")
    missed = [c for c in checks if not c.met]
    lines.append("")
    if not missed:
        lines.append("**All targets met** by both modes, on every reading of peak memory.")
        return lines
    lines.append(
        "**Missed:** " + "; ".join(f"{labels[c.method]}: {c.target} ({c.shown})" for c in missed) + "."
    )
    beyond = sorted({c.target for c in missed if c.target in reference and not reference[c.target].met})
    if beyond:
        lines += [
            "",
            "PEFT LoRA itself misses "
            + "; ".join(f"{t} ({reference[t].shown})" for t in beyond)
            + ": at this configuration no adapter that needs at least LoRA's memory can meet "
            + ("that target." if len(beyond) == 1 else "those targets."),
        ]
    return lines


def _render_section(name: str, data: dict[str, Any]) -> str:
    module = importlib.import_module(f"benchmarks.{name}")
    return module.render(data)


def _scaling(runs: list[dict[str, Any]], plots: tuple[str, str] | None) -> list[str]:
    """Time and step-memory ratios to LoRA per method across model sizes (the plots show the same)."""
    sizes = [run["spec"]["name"] for run in runs]
    methods = [r["method"] for r in runs[0]["results"]]
    labels = {r["method"]: r["label"] for r in runs[0]["results"]}
    lines = ["## Scaling with model size (ratios to PEFT LoRA)", ""]
    if plots:
        lines += [f"![step time vs model size]({plots[0]}) ![step memory vs model size]({plots[1]})", ""]
    lines += [
        "| method | " + " | ".join(f"{s}: time / mem" for s in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for m in methods:
        cells = []
        for run in runs:
            recs = by_method(run)
            lora, rec = recs.get("lora"), recs.get(m)
            if not lora or not rec:
                cells.append("n/a")
                continue
            cells.append(
                f"{rec['median_step_s'] / lora['median_step_s']:.2f} / "
                f"{rec['model_and_step_bytes'] / lora['model_and_step_bytes']:.2f}"
            )
        lines.append(f"| {labels[m]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Memory here is *model + step* (peak minus the memory before the model was built). Full fine-tuning's "
        "ratio grows with model size (gradients and Adam state for every weight); the adapters' stay near 1.",
        "",
    ]
    return lines


def plot(data: dict[str, Any], directory: str | Path, stem: str = "benchmarks") -> list[Path]:
    """PNG plots of step time and memory ratios to LoRA against model size (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = data["runs"]
    totals = [next(iter(by_method(run).values()))["total_params"] / 1e6 for run in runs]
    written = []
    for name, key, title in (
        (plot_names(stem)[0], "median_step_s", "training step time / PEFT LoRA"),
        (plot_names(stem)[1], "model_and_step_bytes", "model + step memory / PEFT LoRA"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for r in runs[0]["results"]:
            ys = []
            for run in runs:
                recs = by_method(run)
                lora, rec = recs.get("lora"), recs.get(r["method"])
                ys.append(rec[key] / lora[key] if lora and rec else float("nan"))
            style = "-o" if r.get("ours") else "--s"
            ax.plot(totals, ys, style, label=r["label"])
        ax.set_xscale("log")
        ax.set_xlabel("model parameters (millions)")
        ax.set_ylabel("ratio to PEFT LoRA")
        ax.set_title(f"{title} ({data['meta']['date']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(directory) / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _device(meta: dict[str, Any]) -> str:
    if "gpu" in meta:
        return f"{meta['gpu']} (host CPU: {meta['cpu']}, {meta['cpu_count']} cores)"
    return f"CPU: {meta['cpu']}, {meta['cpu_count']} cores"


def _memory_line(memory_source: str, on_gpu: bool) -> str:
    if on_gpu:
        return (
            f"- Memory: {memory_source} (tensors on the GPU; the CUDA context and allocator cache are not "
            "counted), reset before the first step. *Peak memory, process* and *model + step* are both that peak "
            "(nothing is on the GPU before the model). *Step's extra* is the peak minus the memory just before "
            "the first step, with model, adapter, optimizer and batch built: gradients, optimizer state, "
            "activations and any weight copies."
        )
    return (
        f"- Memory: {memory_source}, with glibc's mmap threshold fixed at 128 KiB during the warm-up steps so "
        "RSS follows live memory (timed steps run with a 32 MiB threshold, glibc's usual steady state). "
        "*Peak memory, process* is the peak during the steps, everything in the "
        "process included (interpreter, libraries, model). *Model + step* is that peak minus the process's memory "
        "before the model was built (the CPU counterpart of `torch.cuda.max_memory_allocated`). *Step's extra* is "
        "the peak minus the memory just before the first step, with model, adapter, optimizer and batch built: "
        "gradients, optimizer state, activations and any weight copies. The memory targets are judged on all "
        "three."
    )


def _gpu_summary(gpu: dict[str, Any]) -> list[str]:
    """The GPU run's ratio table, in the CPU report (the full GPU tables live in ``benchmarks_gpu.md``)."""
    meta = gpu["meta"]
    lines = [
        "## On a GPU",
        "",
        f"The same step on {_device(meta)}, torch {meta['torch']}, {meta['date']}, code {meta.get('commit')}: "
        f"`{meta['command']}`. Full tables: [benchmarks_gpu.md](benchmarks_gpu.md).",
        "",
    ]
    table = _scaling(gpu["runs"], None)[2:]  # without its heading
    descriptions = [f"- `{run['spec']['name']}`: {run['description']}" for run in gpu["runs"]]
    return lines + table + descriptions + [""]


def render(
    data: dict[str, Any],
    sections: dict[str, dict[str, Any]] | None = None,
    linked: Sequence[str] | None = None,
    stem: str = "benchmarks",
    gpu: dict[str, Any] | None = None,
) -> str:
    """The whole markdown document: training-step tables, the ``gpu`` run's summary, then ``sections``
    (name -> JSON), then links. ``stem`` names the plots (``<stem>_time.png``)."""
    meta, settings = data["meta"], data["settings"]
    on_gpu = "gpu" in meta
    device = _device(meta)
    threads = settings.get("threads") or meta["torch_threads"]
    rounds = settings.get("rounds", 1)
    memory_source = next(
        (r["memory_source"] for run in data["runs"] for r in run["results"] if "memory_source" in r), "n/a"
    )
    load = ""
    if "loadavg_start" in meta:
        load = f"; 1-min load average {meta['loadavg_start'][0]:.1f} at the start"
        if "loadavg_end" in meta:
            load += f", {meta['loadavg_end'][0]:.1f} at the end"
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by benchmarks/report.py from the JSON results; do not edit by hand. -->",
        "",
        "One training step (forward + backward + AdamW step) of each fine-tuning method, every method in its own "
        "process, side by side in one run. Ratios are to PEFT's LoRA at the same trainable-parameter count.",
        "",
        "## Setup",
        "",
        f"- Command: `{meta['command']}` ({'quick CI configuration' if meta.get('quick') else 'full run'}, "
        f"{meta.get('wall_s', 0) / 60:.1f} min)",
        f"- Date: {meta['date']}; code: {meta.get('commit', 'unknown')}",
        f"- Device: {device}; torch threads per process: {threads}{load}",
        f"- Software: Python {meta['python']}, torch {meta['torch']}, peft {meta['peft']}, "
        f"transformers {meta['transformers']}",
        f"- Step: `zero_grad`, forward with labels (causal-LM loss), backward, AdamW step (lr {settings['lr']}). "
        + (
            f"Each method runs in {rounds} fresh processes (methods in rotating order between rounds); in each, "
            if rounds > 1
            else "Each method runs in a fresh process; in it, "
        )
        + f"{max(2, settings['warmup'])} warm-up steps measure memory, then {settings['steps']} steps are timed. "
        "The median over all timed steps is reported, with their min-max; memory is the median over the processes. "
        "With several rounds, the step ratio to LoRA is also given per round (median and range over rounds): two "
        "methods' ratios differ when their ranges do not overlap.",
        f"- Adapters: r={settings['r']} on every linear layer of every block (q, k, v, o, gate, up, down). LoRA: "
        "`LoraConfig(r, lora_alpha=r, lora_dropout=0)`; shira: `ShiraConfig(r)` (random mask, "
        "r*(in+out) entries per matrix); ours: `SparseDeltaConfig(r=r, fused=True/False)` (same entry count).",
        _memory_line(memory_source, on_gpu),
        "",
    ]
    if len(data["runs"]) > 1:
        lines += _scaling(data["runs"], plot_names(stem))
    for run in data["runs"]:
        recs = by_method(run)
        total = next((r["total_params"] for r in recs.values()), 0)
        lines += [
            f"## Model `{run['spec']['name']}`: {total / 1e6:.1f}M parameters",
            "",
            run["description"],
            "",
            *_table(run),
            "",
            "### Targets (issue 2, item 5)",
            "",
            *_targets(run, on_gpu),
            "",
        ]
    if gpu:
        lines += _gpu_summary(gpu)
    for name, section in (sections or {}).items():
        lines += [_render_section(name, section)]
    present = [(doc, what) for doc, what in LINKED_DOCS if doc in (linked or ())]
    if present:
        lines += ["## More figures", ""] + [f"- [{doc}]({doc}): {what}" for doc, what in present] + [""]
    lines += [
        "## Regenerate",
        "",
        f"`{meta['command']}` runs everything and rewrites this file; `python -m benchmarks.report <results.json> "
        "--out <this file>` re-renders it from the JSON alone. Step times on a shared machine are noisy: compare "
        "ratios from one run, not absolute times across runs.",
        "",
    ]
    return "\n".join(lines)


def write(data: dict[str, Any], out: str | Path) -> Path:
    """Render ``data`` into ``out``, with every section JSON and linked doc found beside it, the GPU run's summary
    (``benchmarks_gpu.json``) and the plots. ``benchmarks<suffix>.md`` takes the sections ``<name><suffix>.json``."""
    import json

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.stem.removeprefix("benchmarks")  # benchmarks_gpu.md takes kernels_gpu.json, ...
    sections = {
        name: json.loads((out.parent / f"{name}{suffix}.json").read_text())
        for name in SECTIONS
        if (out.parent / f"{name}{suffix}.json").exists()
    }
    linked = [doc for doc, _ in LINKED_DOCS if (out.parent / doc).exists()] if not suffix else []
    gpu_results = out.parent / GPU_RESULTS
    gpu = (
        json.loads(gpu_results.read_text()) if gpu_results.exists() and out.stem != gpu_results.stem else None
    )
    if len(data["runs"]) > 1:
        plot(data, out.parent, out.stem)
    out.write_text(render(data, sections, linked, out.stem, gpu))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import json

    parser = argparse.ArgumentParser(description="Render the benchmark markdown from a JSON results file.")
    parser.add_argument("results", help="JSON written by python -m benchmarks")
    parser.add_argument("--out", default="docs/benchmarks.md", help="markdown file to write")
    args = parser.parse_args(argv)
    write(json.loads(Path(args.results).read_text()), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
