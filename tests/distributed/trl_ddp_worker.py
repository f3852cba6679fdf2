"""Run under ``accelerate launch --multi_gpu --num_processes 2`` (gloo on CPU): TRL training of every adapter type.

Each rank gets a different shard of the data, so local gradients (and dynamic-mask regrowth scores) differ; after
training both ranks must hold identical adapters. Also runs SparsePO with learned masks, whose mask networks live
outside the DDP-wrapped model. Writes ``rank<i>.pt`` ({run: {tensor name: tensor}}) into the directory argv[1].
"""

import sys
from pathlib import Path

import torch
import trl
from accelerate import PartialState
from peft import get_peft_model
from sparse_peft.trainers import SparsePOConfig, SparsePOTrainer, attach

from sparse_peft.embedded.toy import tiny_llama
from tests.trl_helpers import SPARSE_METHODS, adapter_configs, preference_dataset, sft_dataset, word_tokenizer

COMMON = dict(
    max_steps=4,
    learning_rate=3e-2,
    per_device_train_batch_size=2,
    report_to=[],
    use_cpu=True,
    disable_tqdm=True,
    save_strategy="no",
    max_length=16,
    bf16=False,
    seed=0,
    data_seed=0,
)


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {n: t.detach().cpu().clone() for n, t in state.items() if ".default" in n}


def main(out_dir: str) -> None:
    results: dict[str, dict[str, torch.Tensor]] = {}
    for method in SPARSE_METHODS:
        trainer = trl.SFTTrainer(
            model=tiny_llama(0),
            args=trl.SFTConfig(output_dir=f"{out_dir}/{method}", **COMMON),
            train_dataset=sft_dataset("prompt_completion", n=32),
            processing_class=word_tokenizer(),
            peft_config=adapter_configs()[method],
        )
        attach(trainer)
        trainer.train()
        results[method] = adapter_state(trainer.model)
        results[f"{method}@initial"] = adapter_state(get_peft_model(tiny_llama(0), adapter_configs()[method]))
    sparsepo = SparsePOTrainer(
        model=tiny_llama(0),
        args=SparsePOConfig(output_dir=f"{out_dir}/sparsepo", mask_type="learned", **COMMON),
        train_dataset=preference_dataset(n=32),
        processing_class=word_tokenizer(),
        peft_config=adapter_configs()["sora"],
    )
    sparsepo.train()
    results["sparsepo"] = {
        **adapter_state(sparsepo.model),
        **{f"mask.{n}": p.detach().clone() for n, p in sparsepo.mask_networks.named_parameters()},
    }
    torch.save(results, Path(out_dir) / f"rank{PartialState().process_index}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
