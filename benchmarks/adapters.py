"""Adapter-level figures at equal trainable parameters: file size, switch latency, load-to-first-token.

``python -m benchmarks.adapters [--quick]`` builds one Llama decoder from a config, wraps copies of it with each
method at LoRA-equivalent budget r, and measures (one process, one torch thread, medians of repeats):

- **size**: bytes of ``adapter_model.safetensors`` per method, ratio to PEFT LoRA's file;
- **switch**: changing the active adapter in *fused* form (the delta merged into the weights, so inference runs
  at base speed): PEFT LoRA ``unmerge_adapter`` + ``set_adapter`` + ``merge_adapter`` (dense ``B @ A`` per layer)
  vs ours (the same calls: an O(nnz) scatter that writes back the saved originals and adds the new values);
  PEFT's ``hotswap_adapter`` (copies new LoRA weights in, unmerged) is listed for reference;
- **first token**: ``PeftModel.from_pretrained`` on an in-memory base + ``merge_adapter`` + one forward.
"""

from __future__ import annotations

import copy
import datetime as dt
import gc
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .report import median_seconds, ratio_spread, section_arguments
from .train_step import BLOCK_LINEARS, SIZES, ModelSpec

DOC = Path("docs/adapters.json")
SWITCHED = ("lora", "sparse_delta", "sparse_delta_blocks", "s2ft")  # methods whose switch and load are timed


def _configs(r: int, model: nn.Module) -> dict[str, tuple[str, Callable[[int], Any]]]:
    """Method -> (label, config factory taking a seed)."""
    from peft import LoraConfig, ShiraConfig, SupertuningConfig

    from sparse_peft import GroupSparseLoraConfig, S2FTConfig, SoraConfig, SparseDeltaConfig

    targets = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in BLOCK_LINEARS]
    sparsity = 1.0 - sum(r * (m.in_features + m.out_features) for m in targets) / sum(
        m.weight.numel() for m in targets
    )
    return {
        "lora": (
            "PEFT LoRA",
            lambda s: LoraConfig(r=r, lora_alpha=r, target_modules=BLOCK_LINEARS, init_lora_weights=False),
        ),
        "shira": (
            "PEFT shira",
            lambda s: ShiraConfig(r=r, target_modules=BLOCK_LINEARS, random_seed=s, init_weights=False),
        ),
        "supertuning": (
            "PEFT supertuning",
            lambda s: SupertuningConfig(sparsity=sparsity, target_modules=BLOCK_LINEARS, init_weights=False),
        ),
        "sparse_delta": (
            "sparse_delta",
            lambda s: SparseDeltaConfig(r=r, target_modules=BLOCK_LINEARS, seed=s, init_weights=False),
        ),
        "sparse_delta_blocks": (
            "sparse_delta, blocks of 16",
            lambda s: SparseDeltaConfig(r=r, target_modules=BLOCK_LINEARS, seed=s, init_weights=False, block_size=16),
        ),
        "s2ft": ("S2FT", lambda s: S2FTConfig(r=r, seed=s, init_weights=False)),
        "sora": ("SoRA", lambda s: SoraConfig(r=r, target_modules=BLOCK_LINEARS, init_weights=False)),
        "group_sparse_lora": (
            "group-sparse LoRA",
            lambda s: GroupSparseLoraConfig(r=r, target_modules=BLOCK_LINEARS, init_weights=False),
        ),
    }


def first_token_rounds(base: nn.Module, ids: torch.Tensor, loads: dict[str, Path],
                       results: dict[str, dict[str, Any]], rounds: int) -> None:  # fmt: skip
    """Load + merge + first token of each method, in rounds (every method once per round, back to back), each load
    into a fresh copy of the base after a garbage collection: a round's ratio to LoRA is immune to the machine's
    slow drifts, and no load pays for the previous one's garbage."""
    from peft import PeftModel

    times: dict[str, list[float]] = {name: [] for name in loads}
    for _ in range(rounds):
        for name, path in loads.items():
            fresh = copy.deepcopy(base)
            gc.collect()
            tick = time.perf_counter()
            loaded = PeftModel.from_pretrained(fresh, path)
            loaded.merge_adapter()
            loaded(input_ids=ids).logits[:, -1].argmax(-1)
            times[name].append(time.perf_counter() - tick)
            del loaded, fresh
    for name, values in times.items():
        results[name]["first_token_s"] = statistics.median(values)
        if "lora" in times:
            results[name]["first_token_ratio_rounds"] = [a / b for a, b in zip(values, times["lora"], strict=True)]


def forward_latency(base: nn.Module, ids: torch.Tensor, loads: dict[str, Path],
                    results: dict[str, dict[str, Any]], repeats: int) -> None:  # fmt: skip
    """First-token latency once an adapter is loaded: one forward unmerged (LoRA: its extra matmuls; ours: the fused
    path) and merged (every method: the base's matmuls on the merged weights)."""
    from peft import PeftModel

    for name, path in loads.items():
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), path)
        forward = lambda m=loaded: m(input_ids=ids).logits[:, -1].argmax(-1)  # noqa: E731
        forward()
        results[name]["forward_unmerged_s"] = median_seconds(forward, repeats)
        loaded.merge_adapter()
        forward()
        results[name]["forward_merged_s"] = median_seconds(forward, repeats)
        del loaded


def measure(spec: ModelSpec, r: int, repeats: int, load_rounds: int) -> dict[str, Any]:
    from peft import PeftModel, get_peft_model
    from peft.utils.hotswap import hotswap_adapter

    from sparse_peft.hotswap import BASE, AdapterSwitcher

    torch.set_num_threads(1)
    base = spec.build(seed=0).eval()
    ids = torch.randint(0, spec.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    configs = _configs(r, base)
    results: dict[str, dict[str, Any]] = {}
    loads: dict[str, Path] = {}  # method -> a saved adapter to time load + merge + first token with
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for name, (label, make) in configs.items():
            record: dict[str, Any] = {"label": label}
            results[name] = record
            try:
                model = get_peft_model(copy.deepcopy(base), make(1), adapter_name="a")
                record["trainable_params"] = model.get_nb_trainable_parameters()[0]
                model.save_pretrained(Path(tmp) / name)  # a non-default adapter goes to <dir>/<adapter name>
                record["file_bytes"] = (Path(tmp) / name / "a" / "adapter_model.safetensors").stat().st_size
                if name in SWITCHED:  # the fused switch between two adapters
                    model.add_adapter("b", make(2))
                    model.save_pretrained(Path(tmp) / name, selected_adapters=["b"])
                    model.set_adapter("a")
                    model.merge_adapter()
                    state = {"active": "a"}

                    def switch(model=model, state=state) -> None:
                        nxt = "b" if state["active"] == "a" else "a"
                        model.unmerge_adapter()
                        model.set_adapter(nxt)
                        model.merge_adapter()
                        state["active"] = nxt

                    record["switch_s"] = median_seconds(switch, repeats)
                    model.unmerge_adapter()
                    if name != "lora":  # AdapterSwitcher's switch plan: two index copies per weight
                        switcher = AdapterSwitcher(model)
                        for warm in ("a", "b"):  # plans are made at the first activation
                            switcher.activate(warm)
                        record["plan_switch_s"] = median_seconds(
                            lambda s=switcher: s.activate("a" if s.active == "b" else "b"), repeats
                        )
                        entries = [e for plan in switcher._plans.values() for e in plan or ()]
                        # per switch: each index copy of both adapters reads its int64 indices (one per entry, or per
                        # run of 16 entries) and its values, and writes the values
                        record["plan_switch_bytes"] = sum(
                            w.index.numel() * 8 + 2 * w.merged.numel() * w.merged.element_size()
                            for e in entries for w in e.writes
                        )
                        # ... but memory moves whole 64-byte lines: every line holding an entry is read and written
                        lines = sum(
                            torch.unique(e.indices // (64 // e.flat_weight.element_size())).numel() for e in entries
                        )
                        record["plan_switch_line_bytes"] = lines * 64 * 2
                        record["plan_weight_fraction"] = lines * 64 / sum(
                            e.flat_weight.numel() * e.flat_weight.element_size() for e in entries
                        )
                        switcher.activate(BASE)
                    loads[name] = Path(tmp) / name / "a"
                    if name == "lora":  # PEFT hot-swaps unmerged LoRA weights only
                        loaded = PeftModel.from_pretrained(copy.deepcopy(base), Path(tmp) / name / "a")
                        target = str(Path(tmp) / name / "b")
                        record["hotswap_s"] = median_seconds(
                            lambda m=loaded, t=target: hotswap_adapter(m, t, "default"), repeats
                        )
                        del loaded
                del model
            except Exception as exc:  # noqa: BLE001 - one failing method must not hide the others
                record["error"] = f"{type(exc).__name__}: {exc}"
        first_token_rounds(base, ids, loads, results, load_rounds)
        forward_latency(base, ids, loads, results, repeats)
    with torch.no_grad():
        tick = time.perf_counter()
        base(input_ids=ids).logits[:, -1].argmax(-1)
        base_forward = time.perf_counter() - tick
    big, into = torch.ones(2**24), torch.zeros(2**24)  # 64 MiB each: the copy bandwidth the switch is compared with
    copy_s = median_seconds(lambda: into.copy_(big), max(repeats, 3))
    return {
        "results": results,
        "copy_bytes_per_s": 2 * big.numel() * 4 / copy_s,  # read + write
        "base_forward_s": base_forward,
        "total_params": sum(p.numel() for p in base.parameters()),
    }


def _faster(ratio: float, than: str) -> str:
    return f"{ratio:.1f}x faster than {than}" if ratio >= 1 else f"{1 / ratio:.1f}x slower than {than}"


def render(data: dict[str, Any]) -> str:
    res, meta = data["results"], data["meta"]
    lora = res.get("lora", {})
    lines = [
        "## Adapter files, switching and first token",
        "",
        f"`{meta['command']}` on {meta['date']}; {meta['device']}; model `{data['size']}` "
        f"({data['total_params'] / 1e6:.0f}M parameters), r={data['r']} on every block linear "
        "(S2FT: its own targets at the same budget). One torch thread; medians of "
        f"{data['repeats']} repeats. Load + merge + first token: `PeftModel.from_pretrained` into a fresh copy of "
        "the base, `merge_adapter()`, one 16-token forward; the methods take turns in "
        f"{data.get('load_rounds', data['repeats'])} rounds, each load after a garbage collection, and the ratio to "
        "LoRA is taken within each round.",
        "",
        *([data["note"], ""] if data.get("note") else []),
        "| method | trainable params | adapter file (KiB) | / LoRA | fused switch (ms) | LoRA / this | "
        "planned switch (ms) | LoRA / planned | load + merge + first token (ms) | / LoRA per round: median "
        "(min-max) | first token unmerged (ms) | first token merged (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res.values():
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} |||||||||||")
            continue
        size_ratio = r["file_bytes"] / lora["file_bytes"] if lora.get("file_bytes") else float("nan")
        switch = f"{r['switch_s'] * 1e3:,.1f}" if "switch_s" in r else ""
        speedup = f"{lora['switch_s'] / r['switch_s']:.1f}x" if "switch_s" in r and "switch_s" in lora else ""
        first = f"{r['first_token_s'] * 1e3:,.0f}" if "first_token_s" in r else ""
        first_ratio = ratio_spread(r["first_token_ratio_rounds"]) if "first_token_ratio_rounds" in r else ""
        planned = f"{r['plan_switch_s'] * 1e3:,.2f}" if "plan_switch_s" in r else ""
        plan_speedup = (
            f"{lora['switch_s'] / r['plan_switch_s']:.0f}x" if "plan_switch_s" in r and "switch_s" in lora else ""
        )
        unmerged, merged = (f"{r[k] * 1e3:,.0f}" if k in r else "" for k in ("forward_unmerged_s", "forward_merged_s"))
        lines.append(
            f"| {r['label']} | {r['trainable_params']:,} | {r['file_bytes'] / 1024:,.0f} | {size_ratio:.2f} "
            f"| {switch} | {speedup} | {planned} | {plan_speedup} | {first} | {first_ratio} | {unmerged} | {merged} |"
        )
    if "hotswap_s" in lora:
        lines += [
            "",
            f"PEFT `hotswap_adapter` (LoRA, unmerged: the swapped adapter then runs as extra matmuls on every "
            f"forward) takes {lora['hotswap_s'] * 1e3:,.1f} ms here, file read included. One base forward of 16 "
            f"tokens takes {data['base_forward_s'] * 1e3:,.0f} ms.",
        ]
        lines += [""] + [
            f"- {r['label']}: planned switch {r['plan_switch_s'] * 1e3:,.1f} ms = "
            f"{lora['switch_s'] / r['plan_switch_s']:.0f}x faster than LoRA's merge switch, "
            + _faster(lora["hotswap_s"] / r["plan_switch_s"], "PEFT's `hotswap_adapter`")
            + (f"; load + merge + first token {ratio_spread(r['first_token_ratio_rounds'])} of LoRA's"
               if "first_token_ratio_rounds" in r else "")
            for r in res.values()
            if "plan_switch_s" in r and "switch_s" in lora
        ]
    planned = [r for r in res.values() if "plan_switch_s" in r]
    if planned and "copy_bytes_per_s" in data:
        lines += [
            "",
            "Planned switch (`sparse_peft.hotswap.AdapterSwitcher.activate`): per weight, the saved base entries of "
            "the leaving adapter and the precomputed merged entries of the next one are written with index copies "
            "(entries filling aligned runs of 16 as rows of a `(-1, 16)` view, one index per run; the rest one index "
            "per entry), without PEFT's per-module merge bookkeeping (bit-identical to `set_adapter` + "
            "`merge_adapter`, tested). "
            + f"This machine copies at {data['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write, a 64 MiB `copy_`). "
            + "; ".join(
                f"{r['label']}: {r['plan_switch_bytes'] / r['plan_switch_s'] / 1e9:.1f} GB/s of index + value bytes, "
                f"but the entries sit in {r['plan_weight_fraction']:.0%} of the weights' 64-byte cache lines (for "
                "both adapters), all of which are read and written: "
                f"{r['plan_switch_line_bytes'] / r['plan_switch_s'] / 1e9:.1f} GB/s of line traffic = "
                f"{r['plan_switch_line_bytes'] / r['plan_switch_s'] / data['copy_bytes_per_s']:.0%} of copy bandwidth"
                for r in planned
                if "plan_switch_line_bytes" in r
            )
            + ". With single entries at a few percent density most cache lines of a weight hold an entry, so a "
            "switch costs about a pass over the touched lines: that, not bookkeeping, bounds it on a CPU. Blocks of "
            "16 (`SparseDeltaConfig(block_size=16)`) fill whole lines, so a switch touches only the lines it changes.",
        ]
    lines += [
        "",
        "Our adapter files store indices as LEB128-coded gaps (`sparse_peft/index_codec.py`; block-structured "
        "supports their block ids), S2FT files store channel ids only. The fused switch is `unmerge_adapter(); set_adapter(next); merge_adapter()` for every "
        "method: PEFT LoRA recomputes and adds `B @ A` per layer, ours scatters the saved originals back and adds "
        "the new values (O(nnz), bit-exact restore).",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from .__main__ import machine_info

    argv = list(sys.argv[1:] if argv is None else argv)
    args = section_arguments(__doc__.splitlines()[0], DOC, argv)
    size, r, repeats, load_rounds = ("quick", 8, 2, 2) if args.quick else ("100m", 16, 5, 7)
    data = measure(SIZES[size], r, repeats, load_rounds)
    info = machine_info("cpu")
    data.update(
        size=size,
        r=r,
        repeats=repeats,
        load_rounds=load_rounds,
        meta={
            "command": shlex.join(["python", "-m", "benchmarks.adapters", *argv]),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "device": f"CPU: {info['cpu']}, {info['cpu_count']} cores, torch {info['torch']}, peft {info['peft']}",
        },
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(render(data))
    return 1 if any("error" in r for r in data["results"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
