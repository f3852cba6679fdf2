"""One way to fine-tune on a skill, shared by the quickstart and the quality benchmark: TRL's ``SFTTrainer`` on
prompt/completion data (loss on the completion only), with sparse_peft's callback attached by ``import
trainers``, after calibrating any adapter whose mask is chosen from data (gradient/snip/activation)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..selection import select_masks
from .skills import completion_batch

if TYPE_CHECKING:  # datasets is the optional [trl] extra: imported where a dataset is built
    from datasets import Dataset


@dataclass
class FinetuneRun:
    seconds: float
    final_loss: float
    calibrated: bool


def needs_calibration(model: torch.nn.Module) -> bool:
    """Whether any sparse layer of the model still waits for :func:`select_masks`."""
    return any(any(getattr(m, "needs_calibration", {}).values()) for m in model.modules())


def finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: Dataset,
    steps: int,
    lr: float,
    batch_size: int = 32,
    seed: int = 0,
    calibration_batches: int = 2,
    progress: bool = False,
) -> FinetuneRun:
    """Train ``model`` (a PeftModel, or a plain model for full fine-tuning) for ``steps`` optimizer steps on
    ``train`` (``prompt``/``completion`` columns), warmup then cosine decay. fp32 on CPU: TRL's default bf16
    autocast is several times slower there."""
    import trl

    import trainers  # noqa: F401  (installs SparseUpdateCallback on every Trainer)

    calibrated = needs_calibration(model)
    if calibrated:
        pairs = list(zip(train["prompt"], train["completion"], strict=True))
        batches = [
            completion_batch(tokenizer, pairs[i * batch_size : (i + 1) * batch_size])
            for i in range(calibration_batches)
        ]
        select_masks(model, batches, adapter_name=model.active_adapter)
    with tempfile.TemporaryDirectory() as scratch:
        args = trl.SFTConfig(
            output_dir=scratch,
            max_steps=steps,
            learning_rate=lr,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, steps // 20),
            per_device_train_batch_size=batch_size,
            weight_decay=0.0,
            bf16=False,
            gradient_checkpointing=False,
            use_cpu=not torch.cuda.is_available(),
            report_to=[],
            save_strategy="no",
            logging_steps=max(1, steps // 10),
            disable_tqdm=not progress,
            seed=seed,
            data_seed=seed,
        )
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    model.eval()
    return FinetuneRun(
        seconds=seconds, final_loss=losses[-1] if losses else float("nan"), calibrated=calibrated
    )
