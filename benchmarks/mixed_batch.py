"""Mixed-adapter batches: throughput of one batch whose rows use 1, 4 or 16 different adapters, at equal parameters.

``python -m benchmarks.mixed_batch [--quick]`` builds the ~134M Llama decoder of the adapter benchmark from a config
(one torch thread), gives it N adapters of each method (PEFT LoRA r=16 on every block linear; sparse_delta and S2FT at
the same trainable-parameter budget) and times, with ``adapter_names=[...]`` (row i gets adapter i mod N): one
forward over the whole batch (prefill tokens/s) and greedy ``generate`` with the KV cache (new tokens/s). The base
model alone on the same batch is the reference. Medians of repeats; ratios matter, not absolute times.
"""

from __future__ import annotations

import copy
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import median_seconds, save_section, section_arguments
from benchmarks.train_step import BLOCK_LINEARS, SIZES

OUT = Path(__file__).resolve().parents[1] / "docs" / "mixed_batch.json"
FULL = {"size": "100m", "r": 16, "rows": 16, "prompt": 32, "new_tokens": 8, "repeats": 3, "adapters": [1, 4, 16]}
QUICK = {"size": "quick", "r": 4, "rows": 4, "prompt": 8, "new_tokens": 2, "repeats": 1, "adapters": [1, 4]}


def _configs(r: int) -> dict[str, Callable[[int], Any]]:
    from peft import LoraConfig

    from sparse_peft import S2FTConfig, SparseDeltaConfig

    return {
        "PEFT LoRA": lambda s: LoraConfig(r=r, lora_alpha=r, target_modules=BLOCK_LINEARS, init_lora_weights=False),
        "sparse_delta": lambda s: SparseDeltaConfig(r=r, target_modules=BLOCK_LINEARS, seed=s, init_weights=False),
        "S2FT": lambda s: S2FTConfig(r=r, seed=s, init_weights=False),
    }


def measure(settings: dict[str, Any]) -> dict[str, Any]:
    from peft import get_peft_model

    import sparse_peft  # noqa: F401  (registers the PEFT types)

    torch.set_num_threads(1)
    spec = SIZES[settings["size"]]
    base = spec.build(seed=0).eval()
    rows, prompt, new = settings["rows"], settings["prompt"], settings["new_tokens"]
    ids = torch.randint(0, spec.vocab_size, (rows, prompt), generator=torch.Generator().manual_seed(1))
    generation = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "use_cache": True,
                  "pad_token_id": 0}

    def timings(model: Any, **names: Any) -> dict[str, float]:
        with torch.no_grad():
            forward = median_seconds(lambda: model(input_ids=ids, **names), settings["repeats"])
            generate = median_seconds(lambda: model.generate(input_ids=ids, **generation, **names), settings["repeats"])
        return {"prefill_tokens_per_s": rows * prompt / forward, "generate_tokens_per_s": rows * new / generate}

    runs: list[dict[str, Any]] = [{"method": "base model", "adapters": 0, **timings(base)}]
    for method, make in _configs(settings["r"]).items():
        most = max(settings["adapters"])
        model = get_peft_model(copy.deepcopy(base), make(0), adapter_name="adapter0")
        params = model.get_nb_trainable_parameters()[0]  # of one adapter
        for i in range(1, most):
            model.add_adapter(f"adapter{i}", make(i))
        model.eval()
        for n in settings["adapters"]:
            names = [f"adapter{i % n}" for i in range(rows)]
            runs.append({"method": method, "adapters": n, "params_per_adapter": params,
                         **timings(model, adapter_names=names)})
            print(runs[-1], flush=True)
        del model
    return {"runs": runs, "settings": settings, "total_params": sum(p.numel() for p in base.parameters())}


def render(data: dict[str, Any]) -> str:
    s = data["settings"]
    base = next(r for r in data["runs"] if r["method"] == "base model")
    lora = {r["adapters"]: r for r in data["runs"] if r["method"] == "PEFT LoRA"}
    lines = [
        "## Mixed-adapter batches",
        "",
        f"`{data['command']}` on {data['date']} ({data['machine']}). Model `{s['size']}` "
        f"({data['total_params'] / 1e6:.0f}M parameters); a batch of {s['rows']} rows × {s['prompt']} prompt tokens, "
        f"row i on adapter i mod N via `adapter_names=[...]` (PEFT's interface); greedy `generate` of "
        f"{s['new_tokens']} tokens with the KV cache. Medians of {s['repeats']} repeats. The base model alone: "
        f"{base['prefill_tokens_per_s']:,.0f} prefill / {base['generate_tokens_per_s']:,.1f} generated tokens/s.",
        "",
        *([data["note"], ""] if data.get("note") else []),
        "| method | adapters in the batch | params / adapter | prefill tokens/s | vs LoRA | generate tokens/s | "
        "vs LoRA |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["runs"]:
        if r["method"] == "base model":
            continue
        ref = lora.get(r["adapters"])
        prefill, generate = (f"{r[k] / ref[k]:.2f}x" if ref else "" for k in ("prefill_tokens_per_s",
                                                                               "generate_tokens_per_s"))
        lines.append(
            f"| {r['method']} | {r['adapters']} | {r['params_per_adapter']:,} | {r['prefill_tokens_per_s']:,.0f} | "
            f"{prefill} | {r['generate_tokens_per_s']:,.1f} | {generate} |"
        )
    lines += [
        "",
        "Every method computes the base product once for the whole batch and then each adapter's own output on its "
        "rows only (LoRA: `B(A x)`; sparse_delta: the sparse product; S2FT: a dense product on its channel slice), "
        "so the cost grows with the rows per adapter, not with the number of adapters. Correctness (each row equals "
        "its one-adapter run, KV cache included) is tested in `tests/test_mixed_batches.py`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = section_arguments(__doc__.splitlines()[0], OUT, argv)
    data = measure(QUICK if args.quick else FULL)
    data["command"] = shlex.join(["python", "-m", "benchmarks.mixed_batch", *argv])
    return save_section(data, Path(args.out), render)


if __name__ == "__main__":
    sys.exit(main())
