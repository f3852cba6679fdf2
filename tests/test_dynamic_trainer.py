"""Dynamic masks under transformers' Trainer: checkpoint/resume equals an uninterrupted run; gradient
accumulation and gradient checkpointing work."""

from __future__ import annotations

import torch
from peft import get_peft_model
from sparse_peft.trainers import SparseUpdateCallback
from transformers import Trainer, TrainerCallback, TrainingArguments

from sparse_peft import SparseDeltaConfig
from sparse_peft.embedded.toy import chain_batch, successor_table, tiny_llama
from sparse_peft.masks import sparse_delta_layers


def dataset(n: int = 96) -> list[dict[str, torch.Tensor]]:
    batch = chain_batch(n, successor_table(0), torch.Generator().manual_seed(0))
    return [{"input_ids": ids, "labels": ids.clone()} for ids in batch["input_ids"]]


def make_trainer(output_dir, callbacks=(), **overrides) -> Trainer:
    # window straddles the checkpoint at step 6: reselections after steps 4, 8, 12; windows 2-4, 6-8, 10-12
    config = SparseDeltaConfig(
        target_modules="all-linear", density=0.05, reselect_every=4, regrow_window=3, reselect_fraction=0.5
    )
    model = get_peft_model(tiny_llama(0), config)
    settings = dict(
        output_dir=str(output_dir),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=3e-2,
        save_strategy="steps",
        save_steps=6,
        report_to=[],
        use_cpu=True,
        logging_steps=4,
        dataloader_num_workers=0,
        seed=0,
    )
    args = TrainingArguments(**{**settings, **overrides})
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), callbacks=list(callbacks))
    SparseUpdateCallback.attach(trainer)
    return trainer


def adapter_state(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        name: (
            layer.support_indices["default"].clone(),
            layer.support_values["default"].detach().clone(),
        )
        for name, layer in sparse_delta_layers(model).items()
    }


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_mid_window_matches_uninterrupted_run(tmp_path):
    full = make_trainer(tmp_path / "full")
    full.train()
    expected = adapter_state(full.model)
    initial = adapter_state(make_trainer(tmp_path / "init").model)
    assert any(not torch.equal(expected[n][0], initial[n][0]) for n in expected)  # masks really moved

    interrupted = make_trainer(tmp_path / "resumed", callbacks=[StopAt(6)])
    interrupted.train()
    assert (tmp_path / "resumed/checkpoint-6/sparse_peft_hooks.pt").is_file()
    resumed = make_trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed/checkpoint-6"))
    got = adapter_state(resumed.model)
    for name, (indices, values) in expected.items():
        assert torch.equal(got[name][0], indices), name
        torch.testing.assert_close(got[name][1], values, rtol=1e-5, atol=1e-6)
    history = [log for log in resumed.state.log_history if "sparsity/reselections" in log]
    assert history and history[-1]["sparsity/reselections"] == 3


def test_gradient_accumulation_and_checkpointing(tmp_path):
    trainer = make_trainer(
        tmp_path, gradient_accumulation_steps=2, gradient_checkpointing=True, per_device_train_batch_size=4
    )
    before = adapter_state(trainer.model)
    trainer.train()
    after = adapter_state(trainer.model)
    assert any(not torch.equal(before[n][0], after[n][0]) for n in before)
    for name, (indices, values) in after.items():
        assert indices.numel() == before[name][0].numel() and torch.isfinite(values).all()


def test_trl_ref_adapter_copy_shares_the_moved_support(tmp_path):
    """TRL's DPOTrainer copies a pre-wrapped adapter into ``ref`` by parameters only (indices are buffers)."""
    trl = __import__("pytest").importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<bos>"] + [f"w{i}" for i in range(40)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )
    sft = make_trainer(tmp_path / "sft")
    sft.train()  # the masks moved away from the config's initial support
    model = sft.model
    moved = adapter_state(model)
    pairs = Dataset.from_dict(
        {
            "prompt": ["w1 w2", "w3 w4"] * 4,
            "chosen": [" w5 w6", " w7"] * 4,
            "rejected": [" w8", " w9 w10"] * 4,
        }
    )
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        max_steps=2,
        learning_rate=0.01,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    dpo = trl.DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    SparseUpdateCallback.attach(dpo)
    for name, layer in sparse_delta_layers(dpo.model).items():
        assert torch.equal(layer.support_indices["ref"], moved[name][0]), name
        assert torch.equal(layer.support_values["ref"].detach(), moved[name][1]), name
    dpo.train()
    for name, layer in sparse_delta_layers(dpo.model).items():  # the frozen reference never moves
        assert torch.equal(layer.support_indices["ref"], moved[name][0]), name
