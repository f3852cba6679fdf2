"""DPO vs SparsePO (activation and learned masks) on a preference task whose signal sits in one token.

Task (SparsePO's sentiment-control setting in miniature): a prompt of neutral words, then a completion of
``length`` neutral words in which one position holds a sentiment word. Chosen completions carry a *positive* word,
rejected ones the same completion with a *negative* word at that position, so only one token per pair carries the
preference. The base is a tiny Llama first fine-tuned briefly on completions with random sentiment (so the
reference prefers neither class). Each method then trains the same sparse-delta adapter through TRL for the same
steps; the held-out metric is DPO's implicit reward margin ``β·[(log π − log π_ref)(chosen) − (…)(rejected)]``
summed over all completion tokens (the same yardstick for every method), its accuracy, and, for SparsePO, the
final reward-mask density (fraction of completion tokens with a non-zero mask).

    python -m benchmarks.sparsepo            # full run (about 2 minutes on 2 CPU cores)
    python -m benchmarks.sparsepo --quick    # smoke run
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import mean_std, save_section

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT = REPO_ROOT / "docs" / "sparsepo.json"
NEUTRAL = [f"n{i}" for i in range(30)]
POSITIVE = [f"p{i}" for i in range(8)]
NEGATIVE = [f"q{i}" for i in range(8)]
WORDS = ["<pad>", "<eos>", "<bos>", *NEUTRAL, *POSITIVE, *NEGATIVE]
METHODS = {  # name -> SparsePOConfig overrides (None: TRL's DPOTrainer)
    "DPO": None,
    "SparsePO (activation)": {"mask_type": "activation"},
    "SparsePO (learned)": {
        "mask_type": "learned",
        "mask_l1_reward": 0.01,
        "mask_l1_kl": 0.01,
        "mask_learning_rate": 2e-3,
    },
}


def tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )


def pairs(n: int, length: int, seed: int) -> list[dict[str, str]]:
    """prompt/chosen/rejected rows: identical neutral completions except one positive vs negative word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choices(NEUTRAL, k=3))
        words = rng.choices(NEUTRAL, k=length)
        slot = rng.randrange(length)
        chosen, rejected = list(words), list(words)
        chosen[slot], rejected[slot] = rng.choice(POSITIVE), rng.choice(NEGATIVE)
        rows.append(
            {"prompt": prompt, "chosen": " " + " ".join(chosen), "rejected": " " + " ".join(rejected)}
        )
    return rows


def base_model(settings: argparse.Namespace, folder: Path) -> Path:
    """A tiny Llama fine-tuned on completions with random (balanced) sentiment, saved to ``folder``."""
    import trl
    from datasets import Dataset

    from sparse_peft.embedded.toy import tiny_llama

    rows = pairs(256, settings.length, seed=10_000)
    rng = random.Random(1)
    text = [r["prompt"] + (r["chosen"] if rng.random() < 0.5 else r["rejected"]) for r in rows]
    args = trl.SFTConfig(
        output_dir=str(folder / "sft"), max_steps=settings.pretrain_steps, learning_rate=3e-3,
        per_device_train_batch_size=16, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
        bf16=False, max_length=32, seed=0,
    )  # fmt: skip
    trainer = trl.SFTTrainer(
        model=tiny_llama(0, vocab_size=len(WORDS)), args=args, train_dataset=Dataset.from_dict({"text": text}),
        processing_class=tokenizer(),
    )  # fmt: skip
    trainer.train()
    trainer.model.save_pretrained(folder / "base")
    return folder / "base"


@torch.no_grad()
def heldout_margins(model: Any, tok: Any, rows: list[dict[str, str]], beta: float) -> list[float]:
    """β·[(log π − log π_ref)(chosen) − (log π − log π_ref)(rejected)] per pair (reference = adapter disabled)."""

    def completion_logp(completion_key: str) -> torch.Tensor:
        prompts = [tok(r["prompt"])["input_ids"] for r in rows]
        full = [p + tok(r[completion_key])["input_ids"] for p, r in zip(prompts, rows, strict=True)]
        width = max(len(f) for f in full)
        ids = torch.tensor([f + [tok.pad_token_id] * (width - len(f)) for f in full])
        attention = torch.tensor([[1] * len(f) + [0] * (width - len(f)) for f in full])
        mask = torch.zeros_like(ids, dtype=torch.float)
        for i, (p, f) in enumerate(zip(prompts, full, strict=True)):
            mask[i, len(p) : len(f)] = 1
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        token = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (token * mask[:, 1:]).sum(dim=1)

    model.eval()
    policy = completion_logp("chosen") - completion_logp("rejected")
    with model.disable_adapter():
        reference = completion_logp("chosen") - completion_logp("rejected")
    return (beta * (policy - reference)).tolist()


def run_one(method: str, seed: int, base: Path, settings: argparse.Namespace, folder: Path) -> dict[str, Any]:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from sparse_peft import SparseDeltaConfig, trainers

    tok = tokenizer()
    train = Dataset.from_list(pairs(settings.train_pairs, settings.length, seed=seed))
    common = dict(
        output_dir=str(folder / f"{method}-{seed}"), max_steps=settings.steps, learning_rate=settings.lr,
        per_device_train_batch_size=8, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
        bf16=False, max_length=32, seed=seed, beta=settings.beta, logging_steps=max(settings.steps // 4, 1),
    )  # fmt: skip
    overrides = METHODS[method]
    args = trl.DPOConfig(**common) if overrides is None else trainers.SparsePOConfig(**common, **overrides)
    cls = trl.DPOTrainer if overrides is None else trainers.SparsePOTrainer
    config = SparseDeltaConfig(target_modules="all-linear", density=0.05, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    trainer = cls(model=model, args=args, train_dataset=train, processing_class=tok, peft_config=config)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    margins = heldout_margins(
        trainer.model, tok, pairs(settings.eval_pairs, settings.length, seed=999), settings.beta
    )
    density = [log["mask/density"] for log in trainer.state.log_history if "mask/density" in log]
    return {
        "method": method,
        "seed": seed,
        "heldout_margin": statistics.fmean(margins),
        "heldout_accuracy": sum(m > 0 for m in margins) / len(margins),
        "final_mask_density": density[-1] if density else None,
        "train_seconds": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sparsepo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer steps and seeds")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    parser.add_argument(
        "--out", type=Path, default=OUT, help=f"JSON output (default {OUT.relative_to(REPO_ROOT)})"
    )
    args = parser.parse_args(argv)
    settings = argparse.Namespace(
        steps=8 if args.quick else 60,
        pretrain_steps=10 if args.quick else 150,
        lr=2e-2,
        beta=0.1,
        length=6,
        train_pairs=64 if args.quick else 480,
        eval_pairs=32 if args.quick else 128,
    )
    seeds = list(range(1 if args.quick else args.seeds))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = base_model(settings, folder)
        runs = [run_one(m, s, base, settings, folder) for m in METHODS for s in seeds]
    data = {
        "settings": vars(settings),
        "seeds": seeds,
        "runs": runs,
        "command": shlex.join(
            ["python", "-m", "benchmarks.sparsepo", *(argv if argv is not None else sys.argv[1:])]
        ),
    }
    return save_section(data, args.out, render)


def render(data: dict[str, Any]) -> str:
    """Markdown section: per method, held-out margin / accuracy (mean ± std over seeds), ratio to DPO, density."""
    runs = data["runs"]
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    dpo = statistics.fmean(r["heldout_margin"] for r in by_method.get("DPO", runs))
    s = data["settings"]
    lines = [
        "## SparsePO vs DPO (token-level preference signal)",
        "",
        f"One sentiment word per {s['length']}-word completion decides each pair; sparse-delta adapter (density "
        f"0.05) on a tiny Llama, {s['steps']} steps, β = {s['beta']}, {len(data['seeds'])} seed(s), "
        f"{s['eval_pairs']} held-out pairs. Margin = β·(implicit reward of chosen − rejected), summed over all "
        "completion tokens for every method; mask density = fraction of completion tokens with a non-zero reward "
        "mask at the end of training.",
        "",
        "| method | held-out reward margin | ratio to DPO | held-out accuracy | mask density | train s |",
        "|---|---|---|---|---|---|",
    ]
    for method, rows in by_method.items():
        margins = [r["heldout_margin"] for r in rows]
        accs = [r["heldout_accuracy"] for r in rows]
        dens = [r["final_mask_density"] for r in rows if r["final_mask_density"] is not None]
        ratio = statistics.fmean(margins) / dpo if dpo else float("nan")
        lines.append(
            f"| {method} | {mean_std(margins, '.3f')} | {ratio:.2f}× | {mean_std(accs, '.3f')} | "
            f"{mean_std(dens, '.3f') if dens else '—'} | {statistics.fmean(r['train_seconds'] for r in rows):.1f} |"
        )
    lines += ["", f"Command: `{data['command']}` — {data['machine']}, {data['date']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
