"""DPO vs SparsePO on the real base model, on a preference task where a few tokens inside a long shared completion
decide each pair.

Task ("records"): the prompt gives a person and an ISO date of birth; the completion rewrites it as a record,
``name=…; born=DD/MM/YYYY; from=…; status=ok; source=form``. The rejected completion is the same record with the
date in the US order (``MM/DD/YYYY``): they differ in the few digit tokens of day and month; the text before is
identical and the tail after is the same text under a different context. The reference is the embedded
SmolLM2-135M-Instruct after a short SFT on records whose date order is right half of the time (a sparse delta
merged into the weights), so it writes the format but picks the order at chance. Each method then trains the same
sparse-delta adapter through TRL on the same pairs for the same steps. Held-out metrics, on the test split:
**exact match** (greedy decoding writes the correct record and stops), DPO's implicit reward margin over all
completion tokens (the same yardstick for every method), and the final reward-mask density for SparsePO. Each
method's learning rate is chosen on the validation split (exact match, then margin), then 3 seeds run at it.
The learned mask's L1 weight is swept separately (density against exact match). Peak memory: one process per
method, the same batch, the peak resident set over the training steps (``VmHWM`` after a reset) minus the
resident set before them.

    python -m benchmarks.sparsepo                 # the full run (about an hour on 2 CPU cores)
    python -m benchmarks.sparsepo --quick         # smoke run (a few minutes)
    python -m benchmarks.sparsepo --memory-only   # only the peak-memory probe
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from benchmarks.report import mean_std, save_section

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT = REPO_ROOT / "docs" / "sparsepo.json"
DOC = REPO_ROOT / "docs" / "sparsepo.md"
DOC_MARKERS = ("<!-- sparsepo-results -->\n", "<!-- /sparsepo-results -->")
METHODS: dict[str, dict[str, Any] | None] = {  # name -> SparsePOConfig overrides (None: TRL's DPOTrainer)
    "DPO": None,
    "SparsePO (activation)": {"mask_type": "activation"},
    "SparsePO (learned)": {"mask_type": "learned", "mask_learning_rate": 1e-3},
}
LEARNED = "SparsePO (learned)"
ACTIVATION = "SparsePO (activation)"


class MaskSweep(NamedTuple):
    """One mask's sparsity knob: swept at the method's chosen lr, chosen on validation like the lr."""

    stage: str  # the JSON list of its runs
    grid: str  # the settings attribute with the values to sweep
    keys: tuple[str, ...]  # the SparsePOConfig fields that take the value
    label: str  # how a row of the seeds table names the value
    column: str  # the sweep table's column for the value
    title: str  # the sweep table's heading

    def overrides(self, value: float) -> dict[str, float]:
        return dict.fromkeys(self.keys, value)


SWEEPS = {
    LEARNED: MaskSweep("l1_sweep", "l1_weights", ("mask_l1_reward", "mask_l1_kl"), "L1", "L1 weight",
                       "Learned mask: L1 weight (λ_u = λ_d, on each completion's summed mask)"),
    ACTIVATION: MaskSweep("threshold_sweep", "thresholds", ("mask_threshold",), "threshold",
                          "threshold", "Activation mask: threshold (weights below it become 0)"),
}  # fmt: skip
MASK_SETTINGS = tuple(key for sweep in SWEEPS.values() for key in sweep.keys)
LRS_DPO = [1e-4, 3e-4, 1e-3, 3e-3]
"""DPO's grid; SparsePO's is [1e-4, 3e-4, 1e-3] (3e-3 dropped for time: DPO already collapsed at 1e-3)."""
LRS_SPARSEPO = [1e-4, 3e-4, 1e-3]
REFERENCE_CACHE = REPO_ROOT / ".cache" / "sparsepo"
"""Where the full run keeps its SFT reference, so that a stopped run resumes on the same reference."""
FULL_LOGITS = "SparsePO (activation), full logits"  # memory probe only: the pre-chunking path, for comparison


# ---------------------------------------------------------------------------------------------------- the task
def _record(rng: random.Random) -> tuple[str, str, str]:
    from sparse_peft.embedded.skills import WORDS

    first, last, town = rng.sample(WORDS, 3)
    year, month, day = rng.randrange(1950, 2010), rng.randrange(1, 13), rng.randrange(1, 29)
    while day == month:  # the two orders must differ
        day = rng.randrange(1, 29)
    prompt = f"record: {first} {last}, born {year}-{month:02d}-{day:02d}, from {town} ->"
    tail = f"/{year}; from={town}; status=ok; source=form"
    chosen = f" name={first} {last}; born={day:02d}/{month:02d}{tail}"
    rejected = f" name={first} {last}; born={month:02d}/{day:02d}{tail}"
    return prompt, chosen, rejected


def records(split: str, n: int, seed: int) -> list[dict[str, str]]:
    """``n`` distinct prompt/chosen/rejected rows of ``split`` (the skills' stable prompt-hash split)."""
    from sparse_peft.embedded.skills import split_of

    rng, rows, seen = random.Random(f"records/{split}/{seed}"), [], set()
    while len(rows) < n:
        prompt, chosen, rejected = _record(rng)
        if prompt not in seen and split_of(prompt) == split:
            seen.add(prompt)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def reference_model(settings: argparse.Namespace, folder: Path) -> Path:
    """The embedded model after a short SFT on records with a random date order, merged and saved to ``folder``
    (reused when ``folder`` already holds it: the full run resumes on the same reference)."""
    done = folder / "reference" / "reference.json"
    if done.is_file():
        settings.reference = json.loads(done.read_text())
        return folder / "reference"
    from datasets import Dataset
    from peft import get_peft_model

    from sparse_peft import SparseDeltaConfig
    from sparse_peft.embedded.finetune import finetune
    from sparse_peft.embedded.pretrained import load_base_model
    from sparse_peft.embedded.skills import exact_match

    model, tok = load_base_model(progress=False)
    rows = records("train", settings.sft_examples, seed=10_000)
    rng = random.Random(1)
    completions = [r["chosen"] if rng.random() < 0.5 else r["rejected"] for r in rows]
    train = Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "completion": completions})
    peft_model = get_peft_model(model, SparseDeltaConfig(target_modules="all-linear", r=16, seed=0))
    finetune(peft_model, tok, train, steps=settings.sft_steps, lr=3e-3, batch_size=16, seed=0)
    merged = peft_model.merge_and_unload()
    held = records("validation", settings.eval_pairs, seed=999)
    for key in ("chosen", "rejected"):  # the reference writes the format, either order about equally often
        settings.reference[key] = exact_match(
            merged, tok, [(r["prompt"], r[key]) for r in held], batch_size=64
        )
    print("reference exact match:", settings.reference, flush=True)
    merged.save_pretrained(folder / "reference")
    tok.save_pretrained(folder / "reference")
    done.write_text(json.dumps(settings.reference))
    return folder / "reference"


# ---------------------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def heldout(model: Any, tok: Any, rows: list[dict[str, str]], beta: float) -> dict[str, float]:
    """Exact match of the chosen record under greedy decoding, the share choosing the right order, and the mean
    implicit reward margin (reference = adapter disabled)."""
    from sparse_peft.embedded.skills import completion_batch, exact_match

    def completion_logps() -> torch.Tensor:
        out = []
        for key in ("chosen", "rejected"):
            batch = completion_batch(tok, [(r["prompt"], r[key]) for r in rows])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            token = (
                logits[:, :-1].float().log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
            )
            out.append((token * (labels != -100)).sum(dim=1))
        return out[0] - out[1]

    model.eval()
    pairs = [(r["prompt"], r["chosen"]) for r in rows]
    exact = exact_match(model, tok, pairs, batch_size=64)
    policy = completion_logps()
    with model.disable_adapter():
        reference = completion_logps()
    margins = beta * (policy - reference)
    return {
        "exact_match": exact,
        "prefers_chosen": (policy > 0).float().mean().item(),
        "margin": margins.mean().item(),
    }


# ---------------------------------------------------------------------------------------------------- training
def make_trainer(method: str, overrides: dict[str, Any], seed: int, lr: float, reference: Path,
                 settings: argparse.Namespace, folder: Path, steps: int) -> Any:  # fmt: skip
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparse_peft import SparseDeltaConfig, trainers

    tok = AutoTokenizer.from_pretrained(reference)
    train = Dataset.from_list(records("train", settings.train_pairs, seed=seed))
    common = dict(
        output_dir=str(folder / f"run-{seed}"), max_steps=steps, learning_rate=lr,
        per_device_train_batch_size=settings.batch_pairs, report_to=[], use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True, save_strategy="no", bf16=False, max_length=64, seed=seed, data_seed=seed,
        beta=settings.beta, logging_steps=max(steps // 4, 1), lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
    )  # fmt: skip
    spec = METHODS.get(method) if method != FULL_LOGITS else METHODS[ACTIVATION]
    spec = None if spec is None else {**spec, **overrides}
    args = trl.DPOConfig(**common) if spec is None else trainers.SparsePOConfig(**common, **spec)
    cls = trl.DPOTrainer if spec is None else trainers.SparsePOTrainer
    config = SparseDeltaConfig(target_modules="all-linear", r=16, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32)
    return cls(model=model, args=args, train_dataset=train, processing_class=tok, peft_config=config)


def run_one(method: str, seed: int, lr: float, reference: Path, settings: argparse.Namespace, folder: Path,
            splits: tuple[str, ...], overrides: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    torch.manual_seed(seed)
    trainer = make_trainer(method, overrides or {}, seed, lr, reference, settings, folder, settings.steps)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logs = trainer.state.log_history
    density = [entry["mask/density"] for entry in logs if "mask/density" in entry]
    mean_mask = [entry["mask/chosen_mean"] for entry in logs if "mask/chosen_mean" in entry]
    run = {
        "method": method, "seed": seed, "lr": lr, **(overrides or {}),
        **{split: heldout(trainer.model, trainer.processing_class, records(split, settings.eval_pairs, seed=999),
                          settings.beta) for split in splits},
        "final_mask_density": density[-1] if density else None,
        "final_mask_mean": mean_mask[-1] if mean_mask else None,
        "step_seconds": round(seconds / settings.steps, 3),
    }  # fmt: skip
    print(json.dumps(run), flush=True)
    return run


def memory_probe(method: str, reference: Path, settings: argparse.Namespace) -> dict[str, float]:
    """Peak resident memory of a few training steps (this process only; call it in a fresh process)."""
    with tempfile.TemporaryDirectory() as tmp:
        if method == FULL_LOGITS:
            from sparse_peft.trainers import SparsePOTrainer

            SparsePOTrainer._hidden_state_path = lambda self, causal_lm: False  # the pre-chunking path
        trainer = make_trainer(method, {}, 0, 1e-3, reference, settings, Path(tmp), settings.memory_steps)
        trainer.create_optimizer_and_scheduler(settings.memory_steps)
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident set
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        return {
            "peak_mib": (_status_kib("VmHWM") - before) / 1024,
            "step_seconds": seconds / settings.memory_steps,
        }


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_table(reference: Path, settings: argparse.Namespace) -> list[dict[str, Any]]:
    """Each method's peak memory in its own process (allocator state from one run must not leak into the next)."""
    rows = []
    for method in [*METHODS, FULL_LOGITS]:
        for repeat in range(settings.memory_repeats):
            code = (
                "import json, argparse, sys; from pathlib import Path; from benchmarks import sparsepo as s; "
                f"print('RESULT', json.dumps(s.memory_probe({method!r}, Path({str(reference)!r}), "
                f"argparse.Namespace(**{vars(settings)!r}))))"
            )
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
            done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True,
                                  text=True, check=False)  # fmt: skip
            result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not result:
                raise RuntimeError(f"memory probe of {method} failed:\n{done.stderr[-3000:]}")
            rows.append(
                {"method": method, "repeat": repeat, **json.loads(result[-1].removeprefix("RESULT "))}
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sparsepo", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: few steps, one seed, one learning rate"
    )
    parser.add_argument(
        "--memory-only", action="store_true", help="only the peak-memory probe (updates the JSON)"
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method at its chosen lr (default 3)")
    parser.add_argument(
        "--out", type=Path, default=OUT, help=f"JSON output (default {OUT.relative_to(REPO_ROOT)})"
    )
    args = parser.parse_args(argv)
    settings = argparse.Namespace(
        steps=4 if args.quick else 30,
        sft_steps=6 if args.quick else 60,
        sft_examples=64 if args.quick else 960,
        lrs={m: [1e-3] for m in METHODS} if args.quick else {**{m: LRS_SPARSEPO for m in METHODS}, "DPO": LRS_DPO},
        l1_weights=[0.01] if args.quick else [0.001, 0.003, 0.01, 0.1],
        thresholds=[0.5] if args.quick else [0.3, 0.5, 0.7],
        beta=0.1,
        batch_pairs=4,
        train_pairs=64 if args.quick else 240,
        eval_pairs=32 if args.quick else 200,
        memory_steps=2 if args.quick else 4,
        memory_repeats=1,
        reference={},
    )
    seeds = list(range(1 if args.quick else args.seeds))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    command = shlex.join(
        ["python", "-m", "benchmarks.sparsepo", *(argv if argv is not None else sys.argv[1:])]
    )
    data: dict[str, Any] = {"lr_sweep": [], "runs": [], "memory": [], **{sw.stage: [] for sw in SWEEPS.values()}}
    if args.out.is_file() and not args.quick:  # resume: every finished run is kept
        data = {**data, **json.loads(args.out.read_text())}
    data.update(settings=vars(settings), seeds=seeds, command=command, memory_command=command)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.memory_only:  # memory does not depend on what the reference learned: the embedded model will do
            from sparse_peft.embedded.pretrained import base_model_path

            data["memory"] = memory_table(base_model_path(progress=False), settings)
            return publish(data, args.out)
        reference = reference_model(settings, folder if args.quick else REFERENCE_CACHE)
        data["settings"] = vars(settings)  # with the reference's exact match
        both = ("validation", "test")

        def run(stage: str, method: str, seed: int, lr: float, splits: tuple[str, ...], **overrides: Any) -> None:
            key = {"method": method, "seed": seed, "lr": lr, **overrides}
            if not any(all(r.get(k) == v for k, v in key.items()) for r in data[stage]):
                data[stage].append(run_one(method, seed, lr, reference, settings, folder, splits, overrides))
                publish(data, args.out)

        # in order of what the conclusions need most, each result saved as it comes (a stopped run resumes)
        if not data["memory"]:
            data["memory"] = memory_table(reference, settings)
            publish(data, args.out)
        for method in METHODS:
            for lr in settings.lrs[method]:
                run("lr_sweep", method, 0, lr, both)
        data["chosen_lr"] = chosen = {
            m: max((r for r in data["lr_sweep"] if r["method"] == m), key=_validation_score)["lr"] for m in METHODS
        }
        values = {m: sorted(getattr(settings, sw.grid), reverse=True) for m, sw in SWEEPS.items()}
        for method, sweep in SWEEPS.items():  # the strongest first: does the mask become sparse?
            run(sweep.stage, method, 0, chosen[method], both, **sweep.overrides(values[method][0]))
        # a mask's sparsity knob is a hyperparameter like the lr: chosen on validation (0 = the lr sweep's run)
        seed0 = {m: max((r for r in data["lr_sweep"] + (data[SWEEPS[m].stage] if m in SWEEPS else [])
                         if r["method"] == m and r["lr"] == chosen[m]), key=_validation_score) for m in METHODS}
        data["chosen_l1"] = seed0[LEARNED].get("mask_l1_reward", 0.0)
        data["chosen_threshold"] = seed0[ACTIVATION].get("mask_threshold", 0.0)
        settings_of = {m: _mask_settings_of(seed0[m]) for m in METHODS}
        data["runs"] = [seed0[m] for m in METHODS] + [
            r for r in data["runs"] if r["seed"] > 0 and r["lr"] == chosen[r["method"]]
            and _mask_settings_of(r) == settings_of[r["method"]]
        ]  # fmt: skip
        for seed in seeds[1:]:
            for method in METHODS:
                run("runs", method, seed, chosen[method], ("test",), **settings_of[method])
        for method, sweep in SWEEPS.items():  # the rest of the sweeps last (the seeds use the best value so far)
            for value in values[method][1:]:
                run(sweep.stage, method, 0, chosen[method], both, **sweep.overrides(value))
    return publish(data, args.out)


def _mask_settings_of(run: dict[str, Any]) -> dict[str, float]:
    return {k: run[k] for k in MASK_SETTINGS if run.get(k)}


def _validation_score(run: dict[str, Any]) -> tuple[float, float]:
    """How a setting is chosen: validation exact match, then the validation margin."""
    return run["validation"]["exact_match"], run["validation"]["margin"]


def publish(data: dict[str, Any], out: Path) -> int:
    """Save the JSON; for the committed results also refresh the table in docs/sparsepo.md."""
    status = save_section(data, out, render)
    if out.resolve() == OUT.resolve():
        text = DOC.read_text()
        head, rest = text.split(DOC_MARKERS[0], 1)
        DOC.write_text(head + DOC_MARKERS[0] + render(data) + rest[rest.index(DOC_MARKERS[1]) :])
    return status


def _setting_label(run: dict[str, Any]) -> str:
    sweep = SWEEPS.get(run["method"])
    value = run.get(sweep.keys[0]) if sweep else None
    return f" ({sweep.label} {value:g})" if value else ""


def render(data: dict[str, Any]) -> str:
    """Markdown: the test table (mean ± std over seeds), the sweeps that chose the settings, and peak memory."""
    s = data["settings"]
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run in data["runs"]:
        by_method.setdefault(run["method"], []).append(run)
    reference = s.get("reference") or {}
    lines = [
        "## SparsePO vs DPO on the real base model (records: the date order decides each pair)",
        "",
        f"Reference: SmolLM2-135M-Instruct after {s['sft_steps']} SFT steps on records whose date order is right half "
        "of the time (greedy exact match on the validation split: "
        f"{reference.get('chosen', float('nan')):.0%} writes the correct record, "
        f"{reference.get('rejected', float('nan')):.0%} the US-order one). Each method trains a sparse-delta adapter "
        f"(r = 16, all linear layers) for {s['steps']} steps × {s['batch_pairs']} pairs, β = {s['beta']}, at its "
        f"validation-chosen lr; {s['eval_pairs']} test prompts. Exact match: greedy decoding writes the correct "
        "record and stops. Prefers chosen: the policy's log-likelihood of the chosen record beats the rejected one. "
        "Margin: β·implicit reward (chosen − rejected) over all completion tokens. Mask density / mean: completion "
        "tokens with a non-zero reward mask / the mean mask value (end of training).",
        "",
        "| method | lr | seeds | exact match | prefers chosen | margin | mask density | mask mean | s / step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, rows in by_method.items():
        test = [r["test"] for r in rows]
        dens = [r["final_mask_density"] for r in rows if r["final_mask_density"] is not None]
        means = [r["final_mask_mean"] for r in rows if r.get("final_mask_mean") is not None]
        lines.append(
            f"| {method}{_setting_label(rows[0])} | {rows[0]['lr']:g} | "
            f"{len(rows)} | {mean_std([t['exact_match'] for t in test], '.1%')} | "
            f"{mean_std([t['prefers_chosen'] for t in test], '.1%')} | "
            f"{mean_std([t['margin'] for t in test], '.3f')} | {mean_std(dens, '.2f') if dens else '—'} | "
            f"{mean_std(means, '.2f') if means else '—'} | "
            f"{statistics.fmean(r['step_seconds'] for r in rows):.2f} |"
        )
    lines += ["", "Learning-rate sweep (validation split, seed 0):", "",
              "| method | lr | exact match | margin |", "|---|---|---|---|"]  # fmt: skip
    for r in sorted(data["lr_sweep"], key=lambda r: (list(METHODS).index(r["method"]), r["lr"])):
        v = r["validation"]
        lines.append(f"| {r['method']} | {r['lr']:g} | {v['exact_match']:.1%} | {v['margin']:.3f} |")
    for method, sweep in SWEEPS.items():
        stage, key, title, column = sweep.stage, sweep.keys[0], sweep.title, sweep.column
        if not data.get(stage):
            continue
        lines += ["", f"{title} against density (validation split, seed 0; {column} 0 is the lr sweep's run at the "
                  "same lr):", "", f"| lr | {column} | mask density | mask mean | exact match | margin |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        lrs = {r["lr"] for r in data[stage]}
        zero = [r for r in data["lr_sweep"] if r["method"] == method and r["lr"] in lrs]
        for r in sorted(zero + data[stage], key=lambda r: (r["lr"], r.get(key, 0))):
            lines.append(
                f"| {r['lr']:g} | {r.get(key, 0):g} | {r['final_mask_density']:.2f} | {r['final_mask_mean']:.2f} | "
                f"{r['validation']['exact_match']:.1%} | {r['validation']['margin']:.3f} |"
            )
    if data.get("memory"):
        peaks: dict[str, list[float]] = {}
        for r in data["memory"]:
            peaks.setdefault(r["method"], []).append(r["peak_mib"])
        dpo = statistics.fmean(peaks.get("DPO", [float("nan")]))
        lines += ["", f"Peak memory of {s['memory_steps']} training steps ({s['batch_pairs']} pairs per step, fp32, "
                  "one process per method and repeat; that process's resident-set peak minus its resident set before "
                  "training):", "",
                  "| method | peak MiB | ratio to DPO |", "|---|---|---|"]  # fmt: skip
        for method, values in peaks.items():
            lines.append(f"| {method} | {mean_std(values, '.0f')} | {statistics.fmean(values) / dpo:.2f}× |")
    lines += ["", f"Command: `{data['command']}` (resumes a stopped run) — {data['machine']}, {data['date']}."
              + (f" {data['note']}" if data.get("note") else ""), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
