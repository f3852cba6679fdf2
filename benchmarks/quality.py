"""Held-out quality of every method on the embedded skills, at one trainable-parameter budget and step count,
and the composition test (LT-SFT: do sparse deltas of two skills interfere less than two summed LoRAs?).

Every run starts from the embedded pretrained tiny Llama, trains one adapter on one skill with TRL's SFTTrainer
(:func:`sparse_peft.embedded.finetune`: same data, steps, batch and schedule for every method) and scores
held-out exact match. The budget is LoRA r=8 on every linear layer; sparse deltas and S2FT take the same
parameter count, SoRA / group-sparse LoRA start at r=8, full fine-tuning trains everything. Learning rates are
per method (each method's usual range; see ``METHODS``), not tuned per skill.

    python -m benchmarks.quality             # 3 seeds x 3 skills x 9 methods (about 35 minutes on 2 CPU cores)
    python -m benchmarks.quality --quick     # smoke run
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.report import mean_std, save_section

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT = REPO_ROOT / "docs" / "quality.json"
R = 8


@dataclass(frozen=True)
class Method:
    name: str
    lr: float
    config: Callable[[int], Any] | None  # seed -> PEFT config; None: full fine-tuning
    composable: bool = False  # take part in the composition test


def _lora(seed: int) -> Any:
    from peft import LoraConfig

    return LoraConfig(target_modules="all-linear", r=R, lora_alpha=2 * R, lora_dropout=0.0)


def _shira(seed: int) -> Any:
    from peft import ShiraConfig

    return ShiraConfig(target_modules="all-linear", r=R, random_seed=seed)


def _sparse(selection: str, **extra: Any) -> Callable[[int], Any]:
    def config(seed: int) -> Any:
        from sparse_peft import SparseDeltaConfig

        return SparseDeltaConfig(target_modules="all-linear", r=R, selection=selection, seed=seed, **extra)

    return config


def _sora(seed: int) -> Any:
    from sparse_peft import SoraConfig

    return SoraConfig(target_modules="all-linear", r=R, lora_alpha=2 * R, sparse_lambda=0.1)


def _gs_lora(seed: int) -> Any:
    from sparse_peft import GroupSparseLoraConfig

    return GroupSparseLoraConfig(target_modules="all-linear", r=R, lora_alpha=2 * R, sparse_lambda=0.1)


def _s2ft(seed: int) -> Any:
    from sparse_peft import S2FTConfig

    return S2FTConfig(r=R, seed=seed)


METHODS = {
    m.name: m
    for m in (
        Method("full FT", 3e-4, None),
        Method("LoRA (PEFT)", 3e-3, _lora, composable=True),
        Method("shira (PEFT)", 1e-2, _shira),
        Method("sparse_delta random", 1e-2, _sparse("random"), composable=True),
        Method("sparse_delta gradient", 1e-2, _sparse("gradient"), composable=True),
        Method("sparse_delta dynamic", 1e-2, _sparse("gradient", reselect_every=50, regrow_window=5)),
        Method("SoRA", 3e-3, _sora),
        Method("group-sparse LoRA", 3e-3, _gs_lora),
        Method("S2FT", 3e-3, _s2ft, composable=True),
    )
}
FULL = {"steps": 200, "seeds": [0, 1, 2], "train": 1000, "test": 100}
QUICK = {"steps": 3, "seeds": [0], "train": 64, "test": 16}


def _model(base: Path, method: Method, seed: int) -> Any:
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    import sparse_peft  # noqa: F401  (registers the PEFT types)

    model = LlamaForCausalLM.from_pretrained(base)
    return model if method.config is None else get_peft_model(model, method.config(seed))


def skill_scores(model: Any, tokenizer: Any, skills: list[str], settings: dict[str, Any]) -> dict[str, float]:
    """Held-out exact match of ``model`` on each of ``skills``."""
    from sparse_peft.embedded import exact_match, skill_examples

    return {s: exact_match(model, tokenizer, skill_examples(s, "test", settings["test"])) for s in skills}


def base_scores(base: Path, skills: list[str], settings: dict[str, Any]) -> dict[str, float]:
    """Held-out exact match of the base model itself: the row every adapter is compared with."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    return skill_scores(LlamaForCausalLM.from_pretrained(base), tokenizer, skills, settings)


def run_one(base: Path, method: Method, skill: str, seed: int, settings: dict[str, Any], keep: Path) -> dict:
    """Train ``method`` on ``skill``; held-out exact match on every skill. Composable adapters are saved in
    ``keep`` for the composition test."""
    import torch
    from transformers import PreTrainedTokenizerFast

    from sparse_peft.embedded import SKILLS, finetune, skill_dataset

    torch.manual_seed(seed)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    model = _model(base, method, seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train = skill_dataset(skill, "train", settings["train"], seed=seed)
    run = finetune(model, tokenizer, train, settings["steps"], method.lr, seed=seed)
    scores = skill_scores(model, tokenizer, list(SKILLS), settings)
    if method.composable:
        model.save_pretrained(keep / f"{method.name}-{skill}-{seed}")
    return {
        "method": method.name,
        "skill": skill,
        "seed": seed,
        "exact_match": scores[skill],
        "other_skills": {s: v for s, v in scores.items() if s != skill},
        "trainable_params": trainable,
        "train_seconds": run.seconds,
        "final_loss": run.final_loss,
    }


def compose_one(
    base: Path, method: Method, pair: tuple[str, str], seed: int, settings: dict, keep: Path
) -> dict:
    """Both skills' adapters in one model as the sum of their deltas: ``sparse_peft.compose`` for sparse
    adapters, PEFT's ``add_weighted_adapter(..., combination_type="cat")`` (the exact sum) for LoRA."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from sparse_peft import compose

    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    folders = [keep / f"{method.name}-{skill}-{seed}" for skill in pair]
    model = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(base), folders[0], adapter_name=pair[0]
    )
    model.load_adapter(folders[1], adapter_name=pair[1])
    if method.config is _lora:
        model.add_weighted_adapter(list(pair), [1.0, 1.0], "both", combination_type="cat")
    else:
        compose(model, list(pair), new_adapter_name="both")
    model.set_adapter("both")
    composed = skill_scores(model, tokenizer, list(pair), settings)
    return {"method": method.name, "pair": list(pair), "seed": seed, "composed": composed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smoke configuration (seconds)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--steps", type=int, help=f"optimizer steps per run (default {FULL['steps']})")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2)")
    parser.add_argument("--skills", nargs="+", help="skills (default: all; --quick: the composed pair)")
    parser.add_argument(
        "--out", type=Path, default=OUT, help=f"JSON output (default {OUT.relative_to(REPO_ROOT)})"
    )
    args = parser.parse_args(argv)
    from sparse_peft.embedded import SKILLS, tiny_model_path
    from sparse_peft.quickstart import COMPOSED

    settings = dict(QUICK if args.quick else FULL)
    settings["steps"] = args.steps or settings["steps"]
    seeds = args.seeds or settings.pop("seeds")
    settings.pop("seeds", None)
    skills = args.skills or (list(COMPOSED) if args.quick else list(SKILLS))
    unknown = set(skills) - set(SKILLS)
    if unknown:
        parser.error(f"unknown skills {sorted(unknown)}; the skills are {list(SKILLS)}")
    base = tiny_model_path()
    methods = [METHODS[name] for name in args.methods]
    runs, compositions = [], []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        keep = Path(scratch)
        for seed in seeds:
            for method in methods:
                for skill in skills:
                    runs.append(run_one(base, method, skill, seed, settings, keep))
                    print(json.dumps(runs[-1]), flush=True)
                if method.composable and set(COMPOSED) <= set(skills):
                    compositions.append(compose_one(base, method, COMPOSED, seed, settings, keep))
                    print(json.dumps(compositions[-1]), flush=True)
    data = {
        "settings": {
            **settings,
            "budget": f"LoRA r={R} on every linear layer",
            "lr": {m.name: m.lr for m in methods},
        },
        "seeds": seeds,
        "skills": skills,
        "base_model": json.loads((base / "build.json").read_text()),
        "base_scores": base_scores(base, skills, settings),
        "runs": runs,
        "compositions": compositions,
        "seconds": time.perf_counter() - start,
        "command": "python -m benchmarks.quality" + (" " + shlex.join(argv) if argv else ""),
    }
    return save_section(data, args.out, render)


def render(data: dict[str, Any]) -> str:
    """Markdown section: exact match per method and skill (mean ± std over seeds), then the composition table."""
    skills, runs = data["skills"], data["runs"]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    cell = {(r["method"], r["skill"]): [] for r in runs}
    for r in runs:
        cell[(r["method"], r["skill"])].append(r["exact_match"])
    s, build = data["settings"], data["base_model"]
    lines = [
        "## Quality on the embedded skills (held-out exact match)",
        "",
        f"Base: the embedded tiny Llama ({build['parameters']:,} parameters, pretrained {build['recipe']['steps']} "
        f"steps on Python docstrings). Each run trains one adapter on one skill for {s['steps']} steps (batch 32, "
        f"{s['train']} training prompts, TRL SFTTrainer, cosine schedule) at the budget {s['budget']}; "
        f"{len(data['seeds'])} seed(s); {s['test']} held-out prompts per skill; mean ± std over seeds.",
        "",
        "| method | lr | trainable params | " + " | ".join(skills) + " | mean |",
        "|---|---|---|" + "---|" * (len(skills) + 1),
    ]
    base = data["base_scores"]
    lines.append(
        "| base model (no training) | — | 0 | " + " | ".join(f"{base[k]:.1%}" for k in skills)
        + f" | {statistics.fmean(base[k] for k in skills):.1%} |"
    )
    for m in methods:
        rows = [r for r in runs if r["method"] == m]
        means = [statistics.fmean(cell[(m, k)]) for k in skills if (m, k) in cell]
        lines.append(
            f"| {m} | {s['lr'][m]:g} | {rows[0]['trainable_params']:,} | "
            + " | ".join(mean_std(cell[(m, k)], ".1%") if (m, k) in cell else "—" for k in skills)
            + f" | {statistics.fmean(means):.1%} |"
        )
    if data["compositions"]:
        pair = data["compositions"][0]["pair"]
        lines += [
            "",
            f"### Composition: {pair[0]} + {pair[1]} adapters summed into one",
            "",
            "Exact match of the composed adapter on each skill, next to the single-skill adapter's (retention = "
            "composed / single). LoRA: `add_weighted_adapter(combination_type='cat')`, the exact sum of the two "
            "ΔW; sparse adapters: `sparse_peft.compose`.",
            "",
            f"| method | {pair[0]} single | {pair[0]} composed | {pair[1]} single | {pair[1]} composed | "
            "mean retention |",
            "|---|---|---|---|---|---|",
        ]
        for m in dict.fromkeys(c["method"] for c in data["compositions"]):
            comps = [c for c in data["compositions"] if c["method"] == m]
            row, retention = [], []
            for skill in pair:
                single = statistics.fmean(cell[(m, skill)])
                composed = [c["composed"][skill] for c in comps]
                row += [f"{single:.1%}", mean_std(composed, ".1%")]
                retention.append(statistics.fmean(composed) / single if single else float("nan"))
            lines.append(f"| {m} | " + " | ".join(row) + f" | {statistics.fmean(retention):.2f} |")
    lines += [
        "",
        f"Command: `{data['command']}` ({data['seconds'] / 60:.0f} min) — {data['machine']}, {data['date']}."
        + (f" {data['note']}" if data.get("note") else ""),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
