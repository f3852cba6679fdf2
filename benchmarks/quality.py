"""Held-out quality of every method on the embedded skills, on the real base model (SmolLM2-135M-Instruct), at
one trainable-parameter budget and step count, with each method's learning rate chosen on the validation split;
and the composition test (does the sum of two skill adapters keep both skills?).

Every run starts from the embedded model, trains one adapter on one skill with TRL's SFTTrainer
(:func:`sparse_peft.embedded.finetune`: same data, steps, batch and schedule for every method) and scores held-out
exact match. The budget is LoRA r=8 on every linear layer; sparse deltas and S2FT take the same parameter count,
SoRA / group-sparse LoRA start at r=8, full fine-tuning trains everything.

Protocol per method: (1) train every lr of its grid with seed 0; (2) take the lr with the best mean exact match on
the validation split over the skills; (3) train seeds 1 and 2 at that lr. Every run scores both splits; the table
reports the test split of the runs at the chosen lr (seed 0's comes from the sweep: the test split played no part
in the choice). Every run is appended to the JSON output as it finishes, and a later invocation skips the runs
already there, so the table can be filled over several invocations (``--methods``, ``--seeds``); the section
renders from whatever is complete.

    python -m benchmarks.quality                          # everything (hours on 2 CPU cores)
    python -m benchmarks.quality --methods "LoRA (PEFT)"  # one method's sweep + seeds
    python -m benchmarks.quality --quick                  # smoke run (tiny settings, CI)
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.report import mean_std, save_section

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT = REPO_ROOT / "docs" / "quality.json"
KEEP = REPO_ROOT / ".cache" / "quality-adapters"
"""Composable adapters of the test runs, kept between invocations for the composition test."""
R = 8


@dataclass(frozen=True)
class Method:
    name: str
    lrs: tuple[float, ...]  # the sweep grid
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
        Method("full FT", (3e-5, 1e-4, 3e-4), None),
        Method("LoRA (PEFT)", (3e-4, 1e-3, 3e-3), _lora, composable=True),
        Method("shira (PEFT)", (1e-3, 3e-3, 1e-2), _shira),
        Method("sparse_delta random", (1e-3, 3e-3, 1e-2), _sparse("random"), composable=True),
        Method("sparse_delta gradient", (1e-3, 3e-3, 1e-2), _sparse("gradient"), composable=True),
        Method("sparse_delta blocks", (1e-3, 3e-3, 1e-2), _sparse("gradient", block_size=16)),
        Method("sparse_delta dynamic", (1e-3, 3e-3, 1e-2), _sparse("gradient", reselect_every=20, regrow_window=5)),
        Method("SoRA", (3e-4, 1e-3, 3e-3), _sora),
        Method("group-sparse LoRA", (3e-4, 1e-3, 3e-3), _gs_lora),
        Method("S2FT", (3e-4, 1e-3, 3e-3), _s2ft, composable=True),
    )
}
FULL = {"steps": 40, "batch_size": 8, "seeds": [0, 1, 2], "train": 2000, "validation": 50, "test": 100}
QUICK = {"steps": 2, "batch_size": 4, "seeds": [0], "train": 32, "validation": 8, "test": 8, "lrs": 1}


def _model(base: Path, method: Method, seed: int) -> Any:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import sparse_peft  # noqa: F401  (registers the PEFT types)

    model = AutoModelForCausalLM.from_pretrained(base)
    return model if method.config is None else get_peft_model(model, method.config(seed))


def skill_scores(model: Any, tokenizer: Any, skills: list[str], split: str, n: int) -> dict[str, float]:
    """Held-out exact match of ``model`` on each of ``skills`` (``n`` prompts of ``split``)."""
    from sparse_peft.embedded import exact_match, skill_examples

    return {s: exact_match(model, tokenizer, skill_examples(s, split, n)) for s in skills}


def base_scores(base: Path, skills: list[str], settings: dict[str, Any]) -> dict[str, float]:
    """Held-out exact match of the base model itself: the row every adapter is compared with."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    return skill_scores(model, tokenizer, skills, "test", settings["test"])


def run_one(
    base: Path, method: Method, skill: str, seed: int, lr: float, settings: dict[str, Any], skills: list[str],
    keep: Path,
) -> dict:
    """Train ``method`` on ``skill`` at ``lr``; exact match on the validation and the test split of every skill.
    Composable adapters are saved in ``keep`` for the composition test."""
    import torch
    from transformers import AutoTokenizer

    from sparse_peft.embedded import finetune, skill_dataset

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = _model(base, method, seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train = skill_dataset(skill, "train", settings["train"], seed=seed)
    run = finetune(model, tokenizer, train, settings["steps"], lr, batch_size=settings["batch_size"], seed=seed)
    validation = skill_scores(model, tokenizer, skills, "validation", settings["validation"])
    test = skill_scores(model, tokenizer, skills, "test", settings["test"])
    if method.composable:
        model.save_pretrained(keep / _adapter_folder(method, skill, seed, lr))
    return {
        "method": method.name,
        "skill": skill,
        "seed": seed,
        "lr": lr,
        "validation": validation[skill],
        "exact_match": test[skill],
        "other_skills": {s: v for s, v in test.items() if s != skill},
        "trainable_params": trainable,
        "train_seconds": run.seconds,
        "final_loss": run.final_loss,
    }


def _adapter_folder(method: Method, skill: str, seed: int, lr: float) -> str:
    return f"{method.name}-{skill}-{seed}-{lr:g}".replace(" ", "_").replace("(", "").replace(")", "")


def compose_one(
    base: Path, method: Method, pair: tuple[str, str], seed: int, lr: float, settings: dict, keep: Path
) -> dict:
    """Both skills' adapters in one model as the sum of their deltas: ``sparse_peft.compose`` for sparse
    adapters, PEFT's ``add_weighted_adapter(..., combination_type="cat")`` (the exact sum) for LoRA."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparse_peft import compose

    tokenizer = AutoTokenizer.from_pretrained(base)
    folders = [keep / _adapter_folder(method, skill, seed, lr) for skill in pair]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folders[0], adapter_name=pair[0])
    model.load_adapter(folders[1], adapter_name=pair[1])
    if method.config is _lora:
        model.add_weighted_adapter(list(pair), [1.0, 1.0], "both", combination_type="cat")
    else:
        compose(model, list(pair), new_adapter_name="both")
    model.set_adapter("both")
    composed = skill_scores(model, tokenizer, list(pair), "test", settings["test"])
    return {"method": method.name, "pair": list(pair), "seed": seed, "composed": composed, "lr": lr}


def sweep_scores(runs: list[dict], method: str) -> dict[float, list[float]]:
    """Validation exact match of ``method``'s seed-0 runs, per lr (one entry per skill)."""
    by_lr: dict[float, list[float]] = {}
    for r in runs:
        if r["method"] == method and r["seed"] == 0:
            by_lr.setdefault(r["lr"], []).append(r["validation"])
    return by_lr


def best_lr(runs: list[dict], method: str) -> float | None:
    """The grid lr with the best mean validation exact match over skills (ties: the smaller lr)."""
    by_lr = sweep_scores(runs, method)
    if not by_lr:
        return None
    return max(sorted(by_lr), key=lambda lr: statistics.fmean(by_lr[lr]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smoke configuration (a few minutes)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--steps", type=int, help=f"optimizer steps per run (default {FULL['steps']})")
    parser.add_argument("--seeds", type=int, nargs="+", help="test seeds (default 0 1 2)")
    parser.add_argument("--skills", nargs="+", help="skills (default: all; --quick: the composed pair)")
    parser.add_argument(
        "--out", type=Path, default=OUT, help=f"JSON output (default {OUT.relative_to(REPO_ROOT)}); runs already "
        "in it are kept and not run again",
    )
    parser.add_argument("--fresh", action="store_true", help="ignore the runs already in --out")
    args = parser.parse_args(argv)
    from sparse_peft.embedded import SKILLS, base_model_path
    from sparse_peft.quickstart import COMPOSED

    settings = dict(QUICK if args.quick else FULL)
    settings["steps"] = args.steps or settings["steps"]
    seeds = args.seeds or settings.pop("seeds")
    settings.pop("seeds", None)
    grid_size = settings.pop("lrs", None)
    skills = args.skills or (list(COMPOSED) if args.quick else list(SKILLS))
    unknown = set(skills) - set(SKILLS)
    if unknown:
        parser.error(f"unknown skills {sorted(unknown)}; the skills are {list(SKILLS)}")
    base = base_model_path()
    data: dict[str, Any] = {"runs": [], "compositions": [], "seconds": 0.0, "commands": []}
    if args.out.is_file() and not args.fresh:
        previous = json.loads(args.out.read_text())
        if previous.get("settings", {}).get("steps") == settings["steps"] and "chosen_lr" in previous:
            data = previous
    data.update(settings={**settings, "budget": f"LoRA r={R} on every linear layer"}, skills=skills)
    command = " ".join(["python -m benchmarks.quality", shlex.join(argv if argv is not None else sys.argv[1:])])
    data["commands"] = list(dict.fromkeys([*data.get("commands", []), command.strip()]))
    data["base_model"] = json.loads((base / "build.json").read_text())
    data.setdefault("base_scores", base_scores(base, skills, settings))
    data.setdefault("chosen_lr", {})
    keep = KEEP if not args.quick else args.out.parent / "quality-adapters"

    def done(kind: str, **key: Any) -> bool:
        return any(all(r.get(k) == v for k, v in key.items()) for r in data[kind])

    def record(kind: str, run: Callable[[], dict]) -> None:
        started = time.perf_counter()
        entry = run()
        data[kind].append(entry)
        data["seconds"] += time.perf_counter() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=2))  # after every run: an interrupted invocation resumes
        print(json.dumps(entry), flush=True)

    def ensure(method: Method, skill: str, seed: int, lr: float, adapter_needed: bool) -> None:
        """Run unless recorded; a composable run at the chosen lr is redone if its adapter (kept for the
        composition test, in a folder that does not travel with the repo) is gone."""
        folder = keep / _adapter_folder(method, skill, seed, lr)
        if done("runs", method=method.name, skill=skill, seed=seed, lr=lr) and (
            not (adapter_needed and method.composable) or folder.is_dir()
        ):
            return
        data["runs"] = [r for r in data["runs"] if (r["method"], r["skill"], r["seed"], r["lr"]) !=
                        (method.name, skill, seed, lr)]
        record("runs", partial(run_one, base, method, skill, seed, lr, settings, skills, keep))

    for method in (METHODS[name] for name in args.methods):
        grid = method.lrs[:grid_size]
        for lr in grid:
            for skill in skills:
                ensure(method, skill, min(seeds), lr, adapter_needed=False)
        lr = best_lr(data["runs"], method.name) if len(grid) > 1 else grid[0]
        data["chosen_lr"][method.name] = lr
        for seed in seeds:
            composed = done("compositions", method=method.name, seed=seed, lr=lr)
            for skill in skills:
                ensure(method, skill, seed, lr, adapter_needed=not composed)
            if method.composable and set(COMPOSED) <= set(skills) and not done(
                "compositions", method=method.name, seed=seed, lr=lr
            ):
                data["compositions"] = [c for c in data["compositions"]
                                        if (c["method"], c["seed"]) != (method.name, seed)]
                record("compositions", partial(compose_one, base, method, COMPOSED, seed, lr, settings, keep))
    return save_section(data, args.out, render)


def render(data: dict[str, Any]) -> str:
    """Markdown section: the lr sweep, exact match per method and skill (mean ± std over seeds), then the
    composition table."""
    skills, chosen = data["skills"], data["chosen_lr"]
    runs = [r for r in data["runs"] if chosen.get(r["method"]) == r["lr"]]  # the table: runs at the chosen lr
    methods = list(dict.fromkeys(r["method"] for r in runs))
    cell: dict[tuple[str, str], list[float]] = {}
    for r in runs:
        cell.setdefault((r["method"], r["skill"]), []).append(r["exact_match"])
    s, build = data["settings"], data["base_model"]
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        "## Quality on the embedded skills (held-out exact match)",
        "",
        f"Base: {build['source']['name']} ({build['stages']['model']['parameters']:,} parameters, "
        f"{build['source']['license']}, from the `{build['source']['package']}` package). Each run trains one "
        f"adapter on one skill for {s['steps']} steps (batch {s['batch_size']}, TRL SFTTrainer, cosine schedule, "
        f"plain prompt format) at the budget {s['budget']}. Learning rate: per method, the grid value with the "
        f"best mean validation exact match over the skills ({s['validation']} validation prompts per skill, seed 0; "
        f"sweep below); the table is the test split ({s['test']} prompts per skill) of seeds "
        f"{', '.join(map(str, seeds))} at that lr, mean ± std over seeds.",
        "",
        "| method | lr | trainable params | seeds | " + " | ".join(skills) + " | mean |",
        "|---|---|---|---|" + "---|" * (len(skills) + 1),
    ]
    base = data["base_scores"]
    lines.append(
        "| base model (no training) | — | 0 | — | " + " | ".join(f"{base[k]:.1%}" for k in skills)
        + f" | {statistics.fmean(base[k] for k in skills):.1%} |"
    )
    for m in methods:
        rows = [r for r in runs if r["method"] == m]
        means = [statistics.fmean(cell[(m, k)]) for k in skills if (m, k) in cell]
        lines.append(
            f"| {m} | {chosen[m]:g} | {rows[0]['trainable_params']:,} | {len({r['seed'] for r in rows})} | "
            + " | ".join(mean_std(cell[(m, k)], ".1%") if (m, k) in cell else "—" for k in skills)
            + f" | {statistics.fmean(means):.1%} |"
        )
    swept = [m for m in dict.fromkeys(r["method"] for r in data["runs"]) if len(sweep_scores(data["runs"], m)) > 1]
    if swept:
        lines += ["", "Learning-rate sweep (seed 0; validation exact match, mean over the skills; * = chosen):", "",
                  "| method | lr grid → validation |", "|---|---|"]
        for m in swept:
            cells = [f"{lr:g}: {statistics.fmean(v):.1%}{'*' if lr == chosen.get(m) else ''}"
                     for lr, v in sorted(sweep_scores(data["runs"], m).items())]
            lines.append(f"| {m} | " + ", ".join(cells) + " |")
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
        "Commands: " + "; ".join(f"`{c}`" for c in data["commands"])
        + f" ({data['seconds'] / 60:.0f} min of runs in all) — {data['machine']}, {data['date']}."
        + (f" {data['note']}" if data.get("note") else ""),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
