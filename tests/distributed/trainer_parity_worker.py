"""Run under ``torchrun --nproc_per_node 2``: every adapter type through TRL's SFTTrainer, 4 steps with checkpoints,
then a second trainer resumes from step 2; both save their adapter under argv[1] (``<method>/final``,
``<method>/resume/final``) with the number of DTensor (FSDP-sharded) parameters the trainer ended with.

argv[2] is ``fsdp`` (``fsdp_config={"fsdp_version": 2}``, on CUDA) or ``ddp`` (CPU, gloo). Accelerate routes FSDP
only for GPU runs: on a CPU the same ``fsdp=`` arguments silently give DDP, so CPU runs use DDP explicitly.
"""

import sys
from pathlib import Path

import trl
from datasets import Dataset
from sparse_peft.trainers import attach

from sparse_peft.embedded.toy import tiny_llama
from tests.trl_helpers import SPARSE_METHODS, adapter_configs, word_tokenizer

FSDP = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}


def same_rows() -> Dataset:
    """Identical rows: every rank's shard is the same batch, so two ranks × 2 rows equal one process × 4 rows."""
    return Dataset.from_dict({"prompt": ["w1 w2 w3"] * 32, "completion": [" w4 w5 w6 w7"] * 32})


def train(out: Path, method: str, batch: int, resume: Path | None = None, use_cpu: bool = True, **extra) -> None:
    args = trl.SFTConfig(output_dir=str(out), max_steps=4, learning_rate=3e-2, per_device_train_batch_size=batch,
                         report_to=[], use_cpu=use_cpu, disable_tqdm=True, save_strategy="steps", save_steps=2,
                         max_length=16, bf16=False, seed=0, data_seed=0, **extra)
    trainer = trl.SFTTrainer(model=tiny_llama(0), args=args, train_dataset=same_rows(),
                             processing_class=word_tokenizer(), peft_config=adapter_configs()[method])
    attach(trainer)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.save_model(str(out / "final"))
    sharded = sum(type(p).__name__ == "DTensor" for p in trainer.model.parameters())
    if trainer.args.should_save:  # rank 0, which wrote the adapter
        (out / "final" / "dtensor_parameters.txt").write_text(str(sharded))  # proof that FSDP really sharded


def main(out_dir: str, mode: str) -> None:
    extra = {**FSDP, "use_cpu": False} if mode == "fsdp" else {}
    for method in SPARSE_METHODS:
        first = Path(out_dir) / method
        train(first, method, batch=2, **extra)
        train(first / "resume", method, batch=2, resume=first / "checkpoint-2", **extra)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
