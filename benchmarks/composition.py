"""Composition on the real base model (SmolLM2-135M-Instruct): which way of combining skill adapters keeps every
skill, for two skills (reverse + date) and for three (+ sort), next to PEFT LoRA's ``add_weighted_adapter``.

Inputs are the single-skill adapters of the quality benchmark (``benchmarks.quality``: same data, steps, budget,
each family at its chosen learning rate, seeds 0-2); missing ones are trained here the same way. For each family
(LoRA, sparse delta with gradient selection, S2FT), skill set and method:

1. seed 0: every density of the grid, scored on the validation and test splits of each composed skill;
2. the density with the best mean validation exact match over the composed skills is kept;
3. seeds 1 and 2 at that density (each seed composes that seed's adapters).

The table reports the test split, mean ± std over the seeds, and the retention: composed / single-skill exact match
of the same adapters, averaged over seeds. "all active" is not a composition: every skill adapter active at once
(``set_adapter([...])``); for sparse deltas it is the same function as ``sum`` (the JSON records the largest logit
difference between the two on a probe batch).

    python -m benchmarks.composition            # ~1 h on 2 CPU cores (adapters already trained)
    python -m benchmarks.composition --quick    # smoke run (CI)
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.quality import FULL as QUALITY_FULL
from benchmarks.quality import KEEP, METHODS, REPO_ROOT, _adapter_folder, run_one
from benchmarks.quality import OUT as QUALITY_OUT
from benchmarks.quality import QUICK as QUALITY_QUICK
from benchmarks.report import mean_std, save_section

OUT = REPO_ROOT / "docs" / "composition.json"
POST_HOC = ("LoRA (PEFT)", "sparse_delta gradient", "S2FT")
"""Families whose single-skill adapters are the quality benchmark's."""
TRAINED_FOR_COMPOSITION = ("sparse_delta disjoint", "sparse_delta LT-SFT")
"""Families trained here so that they compose: each skill's gradient mask avoids the earlier skills' supports
(``select_masks(..., exclude=...)``; the first skill is the quality benchmark's adapter), or LT-SFT's recipe."""
FAMILIES = POST_HOC + TRAINED_FOR_COMPOSITION
LT_SFT = {"full_ft_steps": 20, "full_ft_lr": 1e-4, "l1_lambda": 0.1}
"""LT-SFT: masks from the largest changes of a short full fine-tuning (full FT's chosen lr), then the sparse delta
trained from the base with an L1 pull (soft-threshold lr·λ per step) at the sparse delta's chosen lr."""
SKILL_SETS = (("reverse", "date"), ("reverse", "date", "sort"))
DENSITIES = (0.1, 0.2, 0.3)
SPARSE_METHODS = ("sum", "ties", "dare_ties", "magnitude_prune", "regmean")
LORA_METHODS = ("cat", "ties", "dare_ties", "magnitude_prune")
"""``cat`` is LoRA's exact sum of the ΔW; the others are PEFT's, on the A and B factors."""
FULL = {"seeds": [0, 1, 2], "validation": 50, "test": 100}
QUICK = {"seeds": [0], "validation": 8, "test": 8}


def folder_of(keep: Path, family: str, skill: str, seed: int, lr: float) -> Path:
    if family == "sparse_delta disjoint" and skill == SKILL_SETS[-1][0]:  # the first skill: nothing to avoid
        family = "sparse_delta gradient"
    if family in TRAINED_FOR_COMPOSITION:
        return keep / f"{family}-{skill}-{seed}-{lr:g}".replace(" ", "_")
    return keep / _adapter_folder(METHODS[family], skill, seed, lr)


def train_for_composition(base: Path, family: str, skill: str, seed: int, lr: float, settings: dict,
                          keep: Path) -> None:
    """One skill adapter of a family trained to compose (see :data:`TRAINED_FOR_COMPOSITION`), saved in ``keep``."""
    import torch
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparse_peft import SparseDeltaConfig, SparseMask
    from sparse_peft.embedded import finetune, skill_dataset
    from sparse_peft.selection import select_from_changes

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    train = skill_dataset(skill, "train", settings["train"], seed=seed)
    run = {"steps": settings["steps"], "batch_size": settings["batch_size"], "seed": seed}
    exclude = None
    if family == "sparse_delta disjoint":
        earlier = list(SKILL_SETS[-1][: SKILL_SETS[-1].index(skill)])
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                          folder_of(keep, family, earlier[0], seed, lr), adapter_name=earlier[0])
        for other in earlier[1:]:
            model.load_adapter(folder_of(keep, family, other, seed, lr), adapter_name=other)
        masks = [SparseMask.from_model(model, name) for name in earlier]
        exclude = masks[0]
        for mask in masks[1:]:
            exclude = exclude | mask
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), SparseDeltaConfig(
            target_modules="all-linear", r=8, selection="gradient", seed=seed))
    else:
        full = AutoModelForCausalLM.from_pretrained(base)
        finetune(full, tokenizer, train, min(LT_SFT["full_ft_steps"], settings["steps"]), LT_SFT["full_ft_lr"],
                 batch_size=settings["batch_size"], seed=seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), SparseDeltaConfig(
            target_modules="all-linear", r=8, selection="gradient", seed=seed, l1_lambda=LT_SFT["l1_lambda"]))
        select_from_changes(model, full)
        del full
    finetune(model, tokenizer, train, run["steps"], lr, batch_size=run["batch_size"], seed=seed, exclude=exclude)
    model.save_pretrained(folder_of(keep, family, skill, seed, lr))


def methods_of(family: str) -> tuple[str, ...]:
    return LORA_METHODS if family == "LoRA (PEFT)" else SPARSE_METHODS


def densities_of(method: str, quick: bool) -> tuple[float | None, ...]:
    if method in ("sum", "cat", "regmean"):
        return (None,)
    return DENSITIES[:1] if quick else DENSITIES


def _scores(model: Any, tokenizer: Any, skills: tuple[str, ...], settings: dict) -> dict[str, dict[str, float]]:
    from sparse_peft.embedded import exact_match, skill_examples

    return {
        split: {s: exact_match(model, tokenizer, skill_examples(s, split, settings[split])) for s in skills}
        for split in ("validation", "test")
    }


def evaluate_seed(
    base: Path, family: str, skills: tuple[str, ...], seed: int, lr: float, wanted: list[tuple[str, float | None]],
    settings: dict, keep: Path,
) -> list[dict[str, Any]]:
    """Load ``skills``' adapters of one seed into one model, score each single adapter, "all active" and every
    (method, density) in ``wanted``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparse_peft import compose
    from sparse_peft.embedded.skills import skill_inputs

    tokenizer = AutoTokenizer.from_pretrained(base)
    folders = [folder_of(keep, family, skill, seed, lr) for skill in skills]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folders[0], adapter_name=skills[0])
    for skill, folder in zip(skills[1:], folders[1:], strict=True):
        model.load_adapter(folder, adapter_name=skill)
    model.eval()
    key = {"family": family, "skills": list(skills), "seed": seed, "lr": lr}
    results = []
    for skill in skills:
        model.set_adapter(skill)
        results.append({**key, "method": f"single {skill}", "density": None, **_scores(model, tokenizer, skills,
                                                                                          settings)})
    lora = family == "LoRA (PEFT)"
    probe = tokenizer([f"{s}: 12 34 56 ->" for s in skills], return_tensors="pt")
    sum_logits = None
    for method, density in wanted:
        name = f"{method}-{density}".replace(".", "_")
        started = time.perf_counter()
        if lora:
            extra = {} if density is None else {"density": density}
            model.add_weighted_adapter(list(skills), [1.0] * len(skills), name, combination_type=method, **extra)
        elif method == "regmean":
            inputs = {skill: skill_inputs(tokenizer, skill) for skill in skills}  # 128 training examples each
            compose(model, list(skills), new_adapter_name=name, method=method, inputs=inputs)
        else:
            compose(model, list(skills), new_adapter_name=name, method=method, density=density, seed=seed)
        model.set_adapter(name)
        seconds = time.perf_counter() - started
        results.append({**key, "method": method, "density": density, "compose_seconds": seconds,
                        **_scores(model, tokenizer, skills, settings)})
        if method == "sum":
            with torch.no_grad():
                sum_logits = model(**probe).logits
        model.set_adapter(skills[0])
        model.delete_adapter(name)
    model.base_model.set_adapter(list(skills))  # every skill adapter active at once: no composition
    entry = {**key, "method": "all active", "density": None, **_scores(model, tokenizer, skills, settings)}
    if sum_logits is not None:
        with torch.no_grad():
            entry["max_logit_difference_to_sum"] = float((model(**probe).logits - sum_logits).abs().max())
    results.append(entry)
    return results


def analyse(base: Path, family: str, skills: tuple[str, ...], seed: int, lr: float, keep: Path, n: int) -> dict:
    """Why the plain sum fails: per projection kind, each delta's size relative to the weight (whole matrix and
    its own support), the overlap of the two supports and the cosine of the two deltas on it; the composed model's
    greedy answers; and the sum restricted to attention or MLP layers for the second skill."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparse_peft import compose
    from sparse_peft.embedded import exact_match, skill_examples
    from sparse_peft.masks import sparse_delta_layers
    from sparse_peft.quickstart import greedy_answers

    first, second = skills[:2]
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                      folder_of(keep, family, first, seed, lr), adapter_name=first)
    model.load_adapter(folder_of(keep, family, second, seed, lr), adapter_name=second)
    model.eval()
    layers = sparse_delta_layers(model)
    per_kind: dict[str, list[list[float]]] = {}
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight.detach().float().reshape(-1)
        (ia, va), (ib, vb) = ((layer.support_indices[a].long(), layer.delta_values(a).detach().float())
                              for a in (first, second))
        shared_a, shared_b = torch.isin(ia, ib), torch.isin(ib, ia)
        cosine = float(torch.nn.functional.cosine_similarity(va[shared_a], vb[shared_b], dim=0)) \
            if shared_a.any() else 0.0
        per_kind.setdefault(name.rsplit(".", 1)[-1], []).append([
            float(va.norm() / weight.norm()), float(vb.norm() / weight.norm()),
            float(va.norm() / weight[ia].norm()), float(shared_a.float().mean()), cosine,
        ])
    stats = {kind: [statistics.fmean(col) for col in zip(*rows, strict=True)] for kind, rows in per_kind.items()}
    tests = {s: skill_examples(s, "test", n) for s in (first, second)}
    scores, answers = {}, {}
    compose(model, [first, second], new_adapter_name="sum")
    for part, keep_layer in (("attention", lambda n: "self_attn" in n), ("mlp", lambda n: "mlp" in n)):
        compose(model, [first, second], new_adapter_name=f"sum-{part}")
        with torch.no_grad():  # the second skill's delta only where keep_layer: the first's elsewhere
            for name, layer in layers.items():
                if not keep_layer(name):
                    layer.set_adapter_indices(f"sum-{part}", layer.support_indices[first].clone(),
                                              values=layer.delta_values(first).detach().float().clone())
    for adapter in ("sum", "sum-attention", "sum-mlp"):
        model.set_adapter(adapter)
        scores[adapter] = {s: exact_match(model, tokenizer, pairs) for s, pairs in tests.items()}
    model.set_adapter("sum")
    for s, pairs in tests.items():
        answers[s] = [{"prompt": p, "expected": c, "answer": a} for (p, c), a in
                      zip(pairs[:3], greedy_answers(model, tokenizer, [p for p, _ in pairs[:3]]), strict=True)]
    return {"family": family, "skills": [first, second], "seed": seed, "per_kind": stats, "scores": scores,
            "sum_answers": answers}


def best_density(entries: list[dict], family: str, skills: list[str], method: str) -> float | None:
    """Seed 0's density with the best mean validation exact match over the composed skills (ties: the smaller)."""
    scored = {e["density"]: statistics.fmean(e["validation"].values()) for e in entries
              if (e["family"], e["skills"], e["method"], e["seed"]) == (family, skills, method, 0)}
    if not scored:
        return None
    if None in scored:
        return None
    return max(sorted(scored), key=lambda d: scored[d])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.composition", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke configuration (a few minutes)")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--out", type=Path, default=OUT, help="JSON output; entries already in it are kept")
    args = parser.parse_args(argv)
    from sparse_peft.embedded import base_model_path

    settings = dict(QUICK if args.quick else FULL)
    seeds = settings.pop("seeds")
    quality_out = QUALITY_OUT if not args.quick else args.out.parent / "quality.json"  # --quick: beside --out
    quality = json.loads(quality_out.read_text()) if quality_out.is_file() else {}
    chosen = quality.get("chosen_lr", {})
    train_settings = dict(QUALITY_QUICK if args.quick else QUALITY_FULL)
    train_settings.pop("seeds", None)
    train_settings.pop("lrs", None)
    base = base_model_path()
    keep = KEEP if not args.quick else args.out.parent / "quality-adapters"
    data: dict[str, Any] = {"entries": [], "seconds": 0.0}
    if args.out.is_file():
        data = json.loads(args.out.read_text())
    command = " ".join(["python -m benchmarks.composition", shlex.join(argv if argv is not None else sys.argv[1:])])
    data["commands"] = list(dict.fromkeys([*data.get("commands", []), command.strip()]))
    data["settings"] = {**settings, "seeds": seeds, "densities": list(DENSITIES),
                        "adapters": f"benchmarks.quality, {train_settings['steps']} steps, batch "
                                    f"{train_settings['batch_size']}"}
    data["chosen_lr"] = data.get("chosen_lr", {})

    def done(**key: Any) -> bool:
        return any(all(e.get(k) == v for k, v in key.items()) for e in data["entries"])

    for family in args.families:
        method = METHODS.get(family, METHODS["sparse_delta gradient"])
        lr = chosen.get(method.name, method.lrs[0])
        data["chosen_lr"][family] = lr
        for skills in SKILL_SETS if not args.quick else SKILL_SETS[:1]:
            for seed in seeds:
                for skill in skills:  # the single-skill adapters: the quality benchmark's, or trained to compose
                    folder = folder_of(keep, family, skill, seed, lr)
                    if folder.is_dir():
                        continue
                    if family in TRAINED_FOR_COMPOSITION and folder.name.startswith(family.replace(" ", "_")):
                        train_for_composition(base, family, skill, seed, lr, train_settings, keep)
                    else:
                        run_one(base, method, skill, seed, lr, train_settings, list(skills), keep)
                if seed == min(seeds):
                    wanted = [(m, d) for m in methods_of(family) for d in densities_of(m, args.quick)]
                else:
                    wanted = [(m, best_density(data["entries"], family, list(skills), m)) for m in methods_of(family)]
                wanted = [(m, d) for m, d in wanted
                          if not done(family=family, skills=list(skills), seed=seed, method=m, density=d)]
                if not wanted and done(family=family, skills=list(skills), seed=seed, method="all active"):
                    continue
                started = time.perf_counter()
                entries = evaluate_seed(base, family, skills, seed, lr, wanted, settings, keep)
                data["entries"] = [e for e in data["entries"] if not (
                    (e["family"], e["skills"], e["seed"]) == (family, list(skills), seed)
                    and (e["method"].startswith("single") or e["method"] == "all active"))] + entries
                data["seconds"] += time.perf_counter() - started
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(data, indent=2))
                for e in entries:
                    print(json.dumps({k: e[k] for k in ("family", "skills", "seed", "method", "density", "test")}),
                          flush=True)
    if not args.quick and "sparse_delta gradient" in args.families and "analysis" not in data:
        family = "sparse_delta gradient"
        data["analysis"] = analyse(base, family, SKILL_SETS[0], 0, data["chosen_lr"][family], keep, settings["test"])
        args.out.write_text(json.dumps(data, indent=2))
    return save_section(data, args.out, render)


def _single(entries: list[dict], family: str, skills: list[str], skill: str) -> list[float]:
    return [e["test"][skill] for e in entries
            if (e["family"], e["skills"], e["method"]) == (family, skills, f"single {skill}")]


def rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (skill set, family, method) at the chosen density: test exact match per skill over the seeds
    and the mean retention (composed / single of the same seed's adapters)."""
    entries, out = data["entries"], []
    for skills in dict.fromkeys(tuple(e["skills"]) for e in entries):
        for family in dict.fromkeys(e["family"] for e in entries if tuple(e["skills"]) == skills):
            for method in [*methods_of(family), "all active"]:
                density = best_density(entries, family, list(skills), method)
                chosen = [e for e in entries if (e["family"], tuple(e["skills"]), e["method"], e["density"]) ==
                          (family, skills, method, density)]
                if not chosen:
                    continue
                retention = []
                for e in chosen:
                    singles = {s: next(x["test"][s] for x in entries if (x["family"], tuple(x["skills"]),
                               x["seed"], x["method"]) == (family, skills, e["seed"], f"single {s}"))
                               for s in skills}
                    retention.append(min(e["test"][s] / singles[s] if singles[s] else 0.0 for s in skills))
                out.append({
                    "skills": skills, "family": family, "method": method, "density": density,
                    "seeds": sorted(e["seed"] for e in chosen),
                    "test": {s: [e["test"][s] for e in chosen] for s in skills},
                    "worst_retention": retention,
                })
    return out


def render(data: dict[str, Any]) -> str:
    entries = data["entries"]
    s = data["settings"]
    lines = [
        "## Composition: one adapter that keeps every skill",
        "",
        "Single-skill adapters of the quality benchmark (same budget, steps and chosen learning rates) combined "
        "into one adapter. Sparse adapters: `sparse_peft.compose(model, names, method=..., density=...)`; LoRA: "
        "PEFT's `add_weighted_adapter(combination_type=...)` (`cat` is the exact sum of the ΔW); `regmean` "
        "(RegMean on the union of the supports, alpha 1.0) matches each skill adapter's layer outputs on 128 of "
        "that skill's training examples (PEFT has no RegMean for LoRA). Density (the "
        f"fraction of each delta's entries kept) chosen per method from {s['densities']} on the validation split "
        f"({s['validation']} prompts per skill, seed 0); table: test split ({s['test']} prompts per skill), mean ± "
        "std over seeds; **worst retention** = the lowest composed / single-skill exact match over the composed "
        "skills (same seed's adapters), mean over seeds — the goal is ≥ 0.90.",
        "",
    ]
    for skills in dict.fromkeys(tuple(e["skills"]) for e in entries):
        table = [r for r in rows(data) if r["skills"] == skills]
        lines += [f"### {' + '.join(skills)}", "",
                  "| adapters | method | density | seeds | single (mean) | " + " | ".join(skills)
                  + " | worst retention |", "|---|---|---|---|---|" + "---|" * (len(skills) + 1)]
        for r in table:
            singles = [statistics.fmean(_single(entries, r["family"], list(skills), k)) for k in skills]
            lines.append(
                f"| {r['family']} | {r['method']} | {r['density'] if r['density'] is not None else '—'} | "
                f"{len(r['seeds'])} | " + " / ".join(f"{x:.0%}" for x in singles) + " | "
                + " | ".join(mean_std(r["test"][k], ".1%") for k in skills)
                + f" | {mean_std(r['worst_retention'], '.2f')} |"
            )
        lines.append("")
    if "analysis" in data:
        lines += _render_analysis(data["analysis"])
    same = [e["max_logit_difference_to_sum"] for e in entries if "max_logit_difference_to_sum" in e]
    if same:
        lines += [f"\"all active\" vs `sum` on a probe batch: largest logit difference {max(same):.2e} (the same "
                  "function, up to float rounding).", ""]
    lines += ["Commands: " + "; ".join(f"`{c}`" for c in data["commands"])
              + f" ({data['seconds'] / 60:.0f} min of evaluation) — {data['machine']}, {data['date']}."
              + (f" {data['note']}" if data.get("note") else ""), ""]
    return "\n".join(lines)


def _render_analysis(a: dict[str, Any]) -> list[str]:
    first, second = a["skills"]
    lines = [
        f"### Why the plain sum fails ({a['family']}, {first} + {second}, seed {a['seed']})", "",
        "Per projection kind, mean over the 30 layers: each delta's Frobenius norm relative to the weight's, the "
        f"{first} delta relative to the weight entries it changes, the fraction of {first}'s entries that "
        f"{second} also changes, and the cosine of the two deltas on those shared entries.", "",
        f"| projection | ‖Δ {first}‖/‖W‖ | ‖Δ {second}‖/‖W‖ | ‖Δ {first}‖/‖W on its support‖ | shared entries | "
        "cosine on shared |", "|---|---|---|---|---|---|",
    ]
    for kind, (ra, rb, rs, shared, cosine) in a["per_kind"].items():
        lines.append(f"| {kind} | {ra:.4f} | {rb:.4f} | {rs:.3f} | {shared:.0%} | {cosine:+.2f} |")
    scores = a["scores"]
    lines += ["", "Exact match (test) of the sum, and of the sum with the second skill's delta kept only in the "
              "attention or only in the MLP layers: " + "; ".join(
                  f"{k}: " + ", ".join(f"{s} {v:.0%}" for s, v in sc.items()) for k, sc in scores.items()) + ".",
              "", "Greedy answers of the summed adapter:", ""]
    for rows in a["sum_answers"].values():
        for r in rows:
            lines.append(f"- `{r['prompt']}` → `{r['answer']}` (expected `{r['expected'].strip()}`)")
    return [*lines, ""]


if __name__ == "__main__":
    sys.exit(main())
