"""``sparse-peft train {sft,dpo,sparsepo}``: train one adapter with TRL and save it where PeftModel loads it.

The adapter is built from ``--method`` and its options, handed to TRL as ``peft_config`` (so TRL's own QLoRA and
reference handling apply), and trained with ``SparseUpdateCallback`` attached. The run summary (trainable
parameters, time, peak memory, final loss, mask/gate statistics) is printed and written to
``<output>/run_summary.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from . import positive_float, positive_int

KINDS = ("sft", "dpo", "sparsepo")
METHODS = ("sparse_delta", "sora", "s2ft", "group_sparse_lora", "lora")
DATA_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SFT_COLUMNS = (("text",), ("messages",), ("prompt", "completion"))
PREFERENCE_COLUMNS = ("chosen", "rejected")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train",
        help="fine-tune an adapter with TRL (SFT, DPO or SparsePO)",
        description="Train a sparse_peft (or LoRA) adapter with TRL and save it for PeftModel.from_pretrained.",
    )
    train.add_argument(
        "kind",
        choices=KINDS,
        help="sft (text / messages / prompt+completion data), dpo or sparsepo (prompt/chosen/rejected data)",
    )
    train.add_argument(
        "--method", choices=METHODS, default="sparse_delta", help="adapter type (default: sparse_delta)"
    )
    train.add_argument(
        "--model",
        default=None,
        help="Hugging Face model id or local path (default: the embedded SmolLM2-135M-Instruct, converted and cached on first use)",
    )
    train.add_argument(
        "--data",
        required=True,
        help="a .jsonl/.json/.csv/.parquet file, a datasets name, or skill:NAME for an embedded skill "
        "(skill:reverse, skill:date, skill:sort; prompt/completion for sft, chosen/rejected for dpo/sparsepo)",
    )
    train.add_argument("--split", default="train", help="dataset split (default: train)")
    train.add_argument(
        "--output", default="train-out", help="output adapter directory (default: ./train-out)"
    )
    method = train.add_argument_group("method options")
    method.add_argument(
        "--target-modules",
        default="all-linear",
        help="comma-separated module names or 'all-linear' (default); ignored by s2ft",
    )
    method.add_argument(
        "--r",
        type=positive_int,
        default=None,
        help="rank (sora, group_sparse_lora, lora; default 8) or LoRA-equivalent budget (sparse_delta, "
        "s2ft; default for s2ft: 8)",
    )
    method.add_argument(
        "--density",
        type=_fraction,
        default=None,
        help="sparse_delta: fraction of each matrix trained (default 0.01 unless --r)",
    )
    method.add_argument(
        "--selection",
        choices=("random", "magnitude", "gradient", "snip", "weight", "activation"),
        default=None,
        help="sparse_delta: random|magnitude|gradient|snip (default random); s2ft: random|weight|activation|"
        "gradient (default random). gradient/snip/activation score the weights on --calibration-batches "
        "batches of the training data before training (sft only)",
    )
    method.add_argument(
        "--calibration-batches",
        type=positive_int,
        default=2,
        help="batches scored by --selection gradient/snip/activation (default 2)",
    )
    method.add_argument(
        "--block-size",
        type=positive_int,
        default=None,
        help="sparse_delta: choose entries in aligned blocks of N consecutive entries (16 = one fp32 cache line: "
        "faster adapter switching, loading and training steps; static masks only; default 1)",
    )
    method.add_argument(
        "--reselect-every",
        type=positive_int,
        default=None,
        help="sparse_delta: dynamic masks, prune/regrow every N steps (default: static mask)",
    )
    method.add_argument(
        "--sparse-lambda",
        type=_non_negative,
        default=0.1,
        help="sora / group_sparse_lora: penalty strength λ (default 0.1)",
    )
    method.add_argument(
        "--group-by",
        choices=("rank", "row", "column", "module"),
        default="rank",
        help="group_sparse_lora: groups (default rank)",
    )
    method.add_argument(
        "--lora-alpha", type=positive_float, default=None, help="low-rank methods: alpha (default r)"
    )
    opt = train.add_argument_group("training")
    opt.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default: one epoch)")
    opt.add_argument(
        "--epochs", type=positive_float, default=1.0, help="epochs when --steps is not given (default 1)"
    )
    opt.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate (default 1e-3)")
    opt.add_argument("--batch-size", type=positive_int, default=8, help="per-device batch size (default 8)")
    opt.add_argument(
        "--grad-accum", type=positive_int, default=1, help="gradient accumulation steps (default 1)"
    )
    opt.add_argument(
        "--max-length", type=positive_int, default=512, help="max tokens per example (default 512)"
    )
    opt.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    opt.add_argument("--bf16", action="store_true", help="bf16 mixed precision (default: fp32)")
    opt.add_argument("--logging-steps", type=positive_int, default=10, help="log every N steps (default 10)")
    opt.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    pref = train.add_argument_group("dpo / sparsepo")
    pref.add_argument("--beta", type=positive_float, default=0.1, help="DPO β (default 0.1)")
    pref.add_argument(
        "--mask-type",
        choices=("activation", "learned", "ones"),
        default="activation",
        help="sparsepo: which completion tokens carry the reward and KL. activation: weights from the reference "
        "model's hidden states (no parameters); learned: a small network on those hidden states, trained with the "
        "adapter (saved in checkpoints, resumable); ones: every token, which is DPO (default activation)",
    )
    pref.add_argument(
        "--mask-sharing",
        choices=("shared", "independent"),
        default="shared",
        help="sparsepo learned masks: one mask for reward and KL, or one each (default shared)",
    )
    pref.add_argument("--no-kl", action="store_true", help="sparsepo: drop the token-level KL term")
    pref.add_argument(
        "--mask-l1",
        type=_non_negative,
        default=0.0,
        help="sparsepo learned masks: L1 weight on each completion's summed mask; larger values push more tokens' "
        "weights to zero (sparser masks, the point of SparsePO). The SparsePO authors' scale: they used 0.001; "
        "docs/sparsepo.md has density against weight on the real model (default 0)",
    )
    pref.add_argument(
        "--mask-lr",
        type=positive_float,
        default=None,
        help="sparsepo learned masks: learning rate of the mask networks (default: --lr)",
    )
    pref.add_argument(
        "--mask-threshold",
        type=_unit_interval,
        default=0.0,
        help="sparsepo activation masks: token weights (0..1 over each completion) below this become 0, so only "
        "the most active tokens carry the reward and KL; 0 keeps every token (default 0)",
    )
    train.set_defaults(func=run)


CALIBRATED = ("gradient", "snip", "activation")
"""Selections chosen from data: :func:`sparse_peft.select_masks` runs on training batches before training."""


class UsageError(ValueError):
    """A bad argument combination or input, reported as one line and exit status 2."""


def _model_path(model: str | None) -> str:
    if model is not None:
        return model
    from sparse_peft.embedded import base_model_path

    return str(base_model_path())


def peft_config(args: argparse.Namespace) -> Any:
    """The adapter config the method options describe (validated: options of other methods are an error)."""
    from peft import LoraConfig

    from sparse_peft import GroupSparseLoraConfig, S2FTConfig, SoraConfig, SparseDeltaConfig
    from sparse_peft.tuners.s2ft.config import S2FT_SELECTIONS
    from sparse_peft.tuners.sparse_delta.config import SELECTIONS

    targets: Any = args.target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    only = {
        "--density": ("sparse_delta", args.density),
        "--reselect-every": ("sparse_delta", args.reselect_every),
        "--block-size": ("sparse_delta", args.block_size),
    }
    for flag, (owner, value) in only.items():
        if value is not None and args.method != owner:
            raise UsageError(f"{flag} applies to --method {owner}, not {args.method}")
    if args.selection is not None:
        allowed = {"sparse_delta": SELECTIONS, "s2ft": S2FT_SELECTIONS}.get(args.method, ())
        if args.selection not in allowed:
            raise UsageError(f"--selection {args.selection} is not available for --method {args.method}")
        if args.selection in CALIBRATED and args.kind != "sft":
            raise UsageError(
                f"--selection {args.selection} scores weights on labelled sft batches; with {args.kind} use "
                "random, magnitude (sparse_delta) or weight (s2ft), or train the mask with sft first"
            )
    if args.method == "sparse_delta":  # the budget rule (r or density, not both; the default) is the config's
        dynamic = {"reselect_every": args.reselect_every} if args.reselect_every else {}
        return SparseDeltaConfig(
            target_modules=targets,
            selection=args.selection or "random",
            seed=args.seed,
            r=args.r,
            density=args.density,
            block_size=args.block_size or 1,
            **dynamic,
        )
    if args.method == "s2ft":
        return S2FTConfig(r=args.r or 8, selection=args.selection or "random", seed=args.seed)
    r = args.r or 8
    alpha = args.lora_alpha or r
    if args.method == "lora":
        return LoraConfig(target_modules=targets, r=r, lora_alpha=alpha, task_type="CAUSAL_LM")
    if args.method == "sora":
        return SoraConfig(target_modules=targets, r=r, lora_alpha=alpha, sparse_lambda=args.sparse_lambda)
    return GroupSparseLoraConfig(
        target_modules=targets,
        r=r,
        lora_alpha=alpha,
        sparse_lambda=args.sparse_lambda,
        group_by=args.group_by,
    )


def load_data(spec: str, split: str, kind: str) -> Any:
    """A file (by extension) or a datasets name, checked for the columns the trainer kind needs."""
    from datasets import load_dataset

    path = Path(spec)
    suffix = path.suffix.lower()
    if spec.startswith("skill:"):
        from sparse_peft.embedded import SKILLS, skill_dataset

        name = spec.removeprefix("skill:")
        if name not in SKILLS:
            raise UsageError(f"--data {spec}: unknown skill; the skills are {', '.join(SKILLS)}")
        data = skill_dataset(name, split, n=500, kind="prompt_completion" if kind == "sft" else "preference")
    elif suffix in DATA_FORMATS:
        if not path.is_file():
            raise UsageError(f"--data {spec}: no such file")
        if path.stat().st_size == 0:
            raise UsageError(f"--data {spec} is empty")
        try:
            data = load_dataset(DATA_FORMATS[suffix], data_files=str(path), split="train")
        except Exception as exc:  # datasets wraps parse errors (malformed JSON, ragged CSV) in several types
            cause = exc.__cause__ or exc
            raise UsageError(
                f"--data {spec}: cannot be read as {DATA_FORMATS[suffix]} ({type(cause).__name__}: "
                f"{str(cause).splitlines()[0] if str(cause) else 'no detail'})"
            ) from exc
    else:
        if path.exists():
            raise UsageError(f"--data {spec}: unsupported file type (use one of {', '.join(DATA_FORMATS)})")
        try:
            data = load_dataset(spec, split=split)
        except Exception as exc:  # datasets raises many types (missing, offline, bad split)
            raise UsageError(f"--data {spec}: could not load it as a datasets name ({exc})") from exc
    columns = set(data.column_names)
    if kind == "sft":
        if not any(set(group) <= columns for group in SFT_COLUMNS):
            raise UsageError(
                f"sft data needs a 'text', 'messages' or 'prompt'+'completion' column; got {sorted(columns)}"
            )
    elif not set(PREFERENCE_COLUMNS) <= columns:
        raise UsageError(
            f"{kind} data needs 'chosen' and 'rejected' columns (and usually 'prompt'); got {sorted(columns)}"
        )
    if len(data) == 0:
        raise UsageError(f"--data {spec} is empty")
    required = [c for group in (SFT_COLUMNS if kind == "sft" else (PREFERENCE_COLUMNS,)) for c in group
                if c in columns]
    for column in required:
        missing = [i for i, value in enumerate(data[column]) if value is None]
        if missing:
            raise UsageError(
                f"--data {spec}: column {column!r} is empty (null) in {len(missing)} row(s), first at row {missing[0]}"
            )
    return data


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def summarize(trainer: Any, seconds: float) -> dict[str, Any]:
    """Trainable params, time, peak memory, final loss and the last logged sparsity / mask / reward statistics."""
    model = trainer.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    latest: dict[str, float] = {}
    for log in trainer.state.log_history:
        latest.update(
            {k: v for k, v in log.items() if k.split("/")[0] in ("sparsity", "mask", "rewards", "kl")}
        )
    return {
        "trainable_params": trainable,
        "total_params": total,
        "steps": trainer.state.global_step,
        "train_seconds": round(seconds, 2),
        "peak_memory_mb": round(_peak_memory_mb(), 1),
        "final_loss": losses[-1] if losses else trainer.state.log_history[-1].get("train_loss"),
        "statistics": {k: latest[k] for k in sorted(latest) if "/model." not in k and "/base_model" not in k},
    }


def _trainer(args: argparse.Namespace, model_path: str, data: Any) -> Any:
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparse_peft.trainers import SparsePOConfig, SparsePOTrainer, attach

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    common: dict[str, Any] = dict(
        output_dir=args.output,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_length=args.max_length,
        seed=args.seed,
        bf16=args.bf16,
        logging_steps=args.logging_steps,
        disable_tqdm=args.no_progress,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )
    common.update({"max_steps": args.steps} if args.steps else {"num_train_epochs": args.epochs})
    if args.kind == "sft":
        cls, config = trl.SFTTrainer, trl.SFTConfig(**common)
    elif args.kind == "dpo":
        cls, config = trl.DPOTrainer, trl.DPOConfig(beta=args.beta, **common)
    else:
        cls = SparsePOTrainer
        config = SparsePOConfig(
            beta=args.beta,
            mask_type=args.mask_type,
            mask_sharing=args.mask_sharing,
            use_kl=not args.no_kl,
            mask_l1_reward=args.mask_l1,
            mask_l1_kl=args.mask_l1,
            mask_learning_rate=args.mask_lr,
            mask_threshold=args.mask_threshold,
            **common,
        )
    trainer = cls(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=peft_config(args),
    )
    attach(trainer)
    return trainer


def calibrate(trainer: Any, batches: int) -> None:
    """Choose the adapter's support from the gradients (or activations) of the first training batches."""
    from itertools import islice

    from sparse_peft import select_masks

    device = trainer.model.device
    loader = trainer.get_train_dataloader()
    calibration = [
        {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        for batch in islice(loader, batches)
    ]
    select_masks(trainer.model, calibration, adapter_name=trainer.model.active_adapter)


def run(args: argparse.Namespace) -> int:
    try:
        config = peft_config(args)  # validate the options before anything heavy is loaded
        del config
        model_path = _model_path(args.model)
        data = load_data(args.data, args.split, args.kind)
        trainer = _trainer(args, model_path, data)
    except (UsageError, ValueError, OSError) as exc:
        print(f"sparse-peft train: error: {exc}", file=sys.stderr)
        return 2
    if args.selection in CALIBRATED:
        calibrate(trainer, args.calibration_batches)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    output = Path(args.output)
    trainer.save_model(str(output))
    trainer.processing_class.save_pretrained(str(output))
    summary = {"kind": args.kind, "method": args.method, "model": model_path, **summarize(trainer, seconds)}
    (output / "run_summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\n{args.kind} / {args.method} on {model_path}: {summary['steps']} steps in {summary['train_seconds']} s"
    )
    print(f"  trainable params {summary['trainable_params']:,} of {summary['total_params']:,}")
    print(f"  peak memory {summary['peak_memory_mb']} MiB, final loss {summary['final_loss']}")
    for key, value in summary["statistics"].items():
        print(f"  {key}: {value:.4g}")
    print(
        f"  adapter saved to {output} (PeftModel.from_pretrained(base, '{output}') after `import sparse_peft`)"
    )
    return 0
