"""One way to fine-tune on a skill, shared by the quickstart and the quality benchmark: TRL's ``SFTTrainer`` on
prompt/completion data (loss on the completion only), with sparse_peft's callback attached by ``import
trainers``, after calibrating any adapter whose mask is chosen from data (gradient/snip/activation)."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from ..selection import select_masks
from .skills import completion_batch

if TYPE_CHECKING:  # datasets is the optional [trl] extra: imported where a dataset is built
    from datasets import Dataset

    from ..masks import SparseMask


@dataclass
class FinetuneRun:
    seconds: float
    final_loss: float
    calibrated: bool


def needs_calibration(model: torch.nn.Module) -> bool:
    """Whether any sparse layer of the model still waits for :func:`select_masks`."""
    return any(any(getattr(m, "needs_calibration", {}).values()) for m in model.modules())


class LabelledProgress(TrainerCallback):
    """One progress bar per run, named after what trains, with the loss as its postfix: the Trainer's own bar has
    no label and prints every logged dict."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label, self.enabled, self.bar = label, enabled, None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.bar = tqdm(total=state.max_steps, desc=self.label, unit="step", disable=not self.enabled)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs and self.bar is not None:
            self.bar.set_postfix(loss=f"{float(logs['loss']):.3f}", refresh=False)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.bar.close()


@contextlib.contextmanager
def quiet_data_preparation() -> Iterator[None]:
    """Hide the ``datasets`` map bars TRL shows while it tokenizes (five per run, seconds each)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


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
    label: str = "training",
    exclude: SparseMask | None = None,
) -> FinetuneRun:
    """Train ``model`` (a PeftModel, or a plain model for full fine-tuning) for ``steps`` optimizer steps on
    ``train`` (``prompt``/``completion`` columns), warmup then cosine decay. fp32 on CPU: TRL's default bf16
    autocast is several times slower there. ``label`` names the progress bar (shown when ``progress``). ``exclude``:
    a support a gradient-selected mask must avoid (see :func:`sparse_peft.select_masks`)."""
    import transformers
    import trl

    from sparse_peft.trainers import attach

    calibrated = needs_calibration(model)
    if calibrated:
        pairs = list(zip(train["prompt"], train["completion"], strict=True))
        batches = [
            completion_batch(tokenizer, pairs[i * batch_size : (i + 1) * batch_size])
            for i in range(calibration_batches)
        ]
        select_masks(model, batches, adapter_name=model.active_adapter, exclude=exclude)
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
            activation_checkpointing=False,
            use_cpu=not torch.cuda.is_available(),
            report_to=[],
            save_strategy="no",
            logging_steps=max(1, steps // 10),
            disable_tqdm=True,
            seed=seed,
            data_seed=seed,
        )
        with quiet_data_preparation():
            trainer = trl.SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
        attach(trainer)
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        trainer.add_callback(LabelledProgress(label, progress))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    model.eval()
    return FinetuneRun(
        seconds=seconds, final_loss=losses[-1] if losses else float("nan"), calibrated=calibrated
    )
