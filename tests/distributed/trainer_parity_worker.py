"""Run under ``torchrun --nproc_per_node 2``: every adapter type through TRL's SFTTrainer, 4 steps with checkpoints,
then a second trainer resumes from step 2; both save their adapter under argv[1] (``<method>/final``,
``<method>/resume/final``) with the number of DTensor (FSDP-sharded) parameters the trainer ended with and, per rank,
a digest of the rank's supports (dynamic masks must reselect the same entries on every rank).

argv[2] is the mode (see :data:`MODES`): ``ddp`` (CPU, gloo); ``fsdp`` (FSDP2 through the Trainer's ``fsdp=``
arguments, on CUDA); ``fsdp_cpu`` (the same arguments on CPU processes, full-state-dict checkpoints);
``fsdp_cpu_launch`` (FSDP2 from ``accelerate launch --use_fsdp ...`` flags, see :data:`LAUNCH`, sharded checkpoints);
``zero2_cpu`` and ``zero3_cpu`` (DeepSpeed ZeRO-2/3 from the Trainer's ``deepspeed=`` config, the Trainer's AdamW and
schedule). The CPU modes use :mod:`tests.distributed.cpu_routing`. Under ZeRO-3 the methods that edit parameters
between steps (proximal steps, reselection) are refused before training: the worker writes the message to
``<method>/refused.txt``. Each run also writes the class that wrapped the model (``wrapped.txt``).
"""

import hashlib
import sys
from pathlib import Path

import torch
import trl
from datasets import Dataset
from sparse_peft.trainers import attach

from sparse_peft.embedded.toy import tiny_llama
from tests.distributed.cpu_routing import count_deepspeed_processes_on_cpu, route_fsdp_on_cpu
from tests.trl_helpers import SPARSE_METHODS, adapter_configs, word_tokenizer

FSDP = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}


def zero(stage: int) -> dict:
    """DeepSpeed ZeRO with the Trainer's own optimizer, schedule and clipping ("auto": from the arguments)."""
    config = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_allow_untested_optimizer": True}
    return {"deepspeed": config, "use_cpu": False}


MODES = {"ddp": {}, "fsdp": {**FSDP, "use_cpu": False}, "fsdp_cpu": FSDP,
         "fsdp_cpu_launch": {},  # FSDP from the launcher's flags, not from the arguments
         "zero2_cpu": zero(2), "zero3_cpu": zero(3)}
EDITING_METHODS = ("sparse_delta_dynamic", "sora", "group_sparse_lora")  # edit parameters between optimizer steps
LAUNCH = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
          "--use_fsdp", "--fsdp_version", "2", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
          "--fsdp_state_dict_type", "SHARDED_STATE_DICT"]  # the flags of the README's command (Many processes and GPUs)


def same_rows() -> Dataset:
    """Identical rows: every rank's shard is the same batch, so two ranks × 2 rows equal one process × 4 rows."""
    return Dataset.from_dict({"prompt": ["w1 w2 w3"] * 32, "completion": [" w4 w5 w6 w7"] * 32})


def support_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every buffer of the adapter (supports: indices, channel ids) in name order."""
    digest = hashlib.sha256()
    for name, buffer in sorted(model.named_buffers()):
        if "sparse_delta_indices" in name or "s2ft_channels" in name:
            digest.update(name.encode() + buffer.cpu().numpy().tobytes())
    return digest.hexdigest()


def train(out: Path, method: str, batch: int, resume: Path | None = None, use_cpu: bool = True, **extra) -> None:
    args = trl.SFTConfig(output_dir=str(out), max_steps=4, learning_rate=3e-2, per_device_train_batch_size=batch,
                         report_to=[], use_cpu=use_cpu, disable_tqdm=True, save_strategy="steps", save_steps=2,
                         max_length=16, bf16=False, seed=0, data_seed=0, **extra)
    trainer = trl.SFTTrainer(model=tiny_llama(0), args=args, train_dataset=same_rows(),
                             processing_class=word_tokenizer(), peft_config=adapter_configs()[method])
    attach(trainer)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if trainer.is_fsdp_enabled:  # what PEFT's FSDP guide does: the final adapter from the full state dict
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(out / "final"))
    sharded = sum(type(p).__name__ == "DTensor" for p in trainer.model.parameters())
    rank = trainer.args.process_index
    (out / "final").mkdir(parents=True, exist_ok=True)  # only rank 0 saved into it
    (out / "final" / f"supports_rank{rank}.txt").write_text(support_digest(trainer.model))
    if trainer.args.should_save:  # rank 0, which wrote the adapter; proof of what really ran:
        (out / "final" / "dtensor_parameters.txt").write_text(str(sharded))  # FSDP sharded
        (out / "final" / "wrapped.txt").write_text(type(trainer.model_wrapped).__name__)  # DDP, DeepSpeedEngine, ...


def main(out_dir: str, mode: str) -> None:
    if mode.startswith("fsdp_cpu"):
        route_fsdp_on_cpu()
    if mode.startswith("zero"):
        count_deepspeed_processes_on_cpu()
    for method in SPARSE_METHODS:
        first = Path(out_dir) / method
        if mode == "zero3_cpu" and method in EDITING_METHODS:
            try:
                train(first, method, batch=2, **MODES[mode])
            except NotImplementedError as refused:
                first.mkdir(parents=True, exist_ok=True)
                (first / "refused.txt").write_text(str(refused))
            continue
        train(first, method, batch=2, **MODES[mode])
        train(first / "resume", method, batch=2, resume=first / "checkpoint-2", **MODES[mode])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
