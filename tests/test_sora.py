"""SORA: PEFT's generic tuner tests, the contract on tiny transformers models, the gate's proximal step, Trainer."""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
from contract import TunerCase, TunerContract, tuner_config
from lowrank_contract import check_bnb, layers, tiny_llama
from peft import get_peft_model
from peft_upstream import retarget_custom_models
from sparse_peft.trainers import SparseUpdateCallback
from transformers import Trainer, TrainingArguments

import sparse_peft  # noqa: F401  (registers SORA)
from sparse_peft import SoraConfig
from sparse_peft.proximal import apply_proximal_step, sparsity_report

TEST_CASES = [
    ("SoRA MLP lin0", "MLP", SoraConfig, {"target_modules": ["lin0"], "r": 4}),
    ("SoRA MLP both dropout", "MLP", SoraConfig, {"target_modules": ["lin0", "lin1"], "r": 2, "lora_dropout": 0.1}),
    ("SoRA MLP modules_to_save", "MLP", SoraConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("SoRA EmbConv1D", "EmbConv1D", SoraConfig, {"target_modules": ["conv1d"], "r": 3}),
]
MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    ("SoRA same", "sora", SoraConfig,
     {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin0"], "init_weights": False}),
    ("SoRA different", "sora", SoraConfig,
     {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin1"], "init_weights": False, "r": 2}),
]
TestSoraCustomModels, TestSoraMultipleActiveAdapters = retarget_custom_models(
    "Sora", SoraConfig, TEST_CASES, MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES, SoraConfig(target_modules=["lin0"], init_weights=False)
)


# ------------------------------------------------------------------------------------------ tiny transformers models
class TestSoraContract(TunerContract):
    cases = [  # LoRA-style merge (W ± ΔW in the weight dtype): exact_unmerge=False
        TunerCase("all-linear", partial(tuner_config, SoraConfig, r=4)),
        TunerCase("attention-dropout-schedule", partial(
            tuner_config, SoraConfig, attention_only=True, lora_dropout=0.1, lambda_schedule="linear",
            lambda_max=0.5, lambda_num_stages=3,
        )),
    ]


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_bases(bits, tmp_path):
    check_bnb(SoraConfig, bits, tmp_path)


def _gated_llama(**kwargs):
    model = get_peft_model(tiny_llama(0), SoraConfig(target_modules=["q_proj"], r=4, **kwargs))
    for layer in layers(model):
        with torch.no_grad():
            layer.sora_gate["default"].copy_(torch.tensor([0.05, -0.05, 0.5, -0.75]))
    return model


def test_proximal_step_is_a_true_soft_threshold():
    model = _gated_llama(sparse_lambda=1.0)
    used = apply_proximal_step(model, lr=0.125, step=0)  # threshold 0.125: exact in binary floating point
    assert used == {"default": 1.0}
    for layer in layers(model):
        gate = layer.sora_gate["default"]
        assert torch.equal(gate[:2], torch.zeros(2))  # below the threshold: exactly 0 (the reference code's quirk
        assert torch.equal(gate[2:], torch.tensor([0.375, -0.625]))  # would keep these): shrunk by exactly lr·λ
    assert sparsity_report(model) == {"model.layers.0.self_attn.q_proj": (2, 4), "model.layers.1.self_attn.q_proj": (2, 4)}


def test_proximal_step_skips_merged_inactive_and_frozen_adapters():
    model = _gated_llama(sparse_lambda=1.0)
    before = [layer.sora_gate["default"].clone() for layer in layers(model)]
    model.merge_adapter()
    apply_proximal_step(model, lr=0.125)
    model.unmerge_adapter()
    model.add_adapter("other", SoraConfig(target_modules=["q_proj"], r=4, sparse_lambda=1.0))
    model.set_adapter("other")  # "default" is now inactive and frozen
    apply_proximal_step(model, lr=0.125)
    for layer, gate in zip(layers(model), before, strict=True):
        assert torch.equal(layer.sora_gate["default"], gate)
        assert torch.equal(layer.sora_gate["other"], torch.full((4,), 0.875))


def test_lambda_schedule_from_config():
    model = _gated_llama(
        sparse_lambda=0.5, lambda_schedule="linear", lambda_max=1.5, lambda_num_stages=3, lambda_stage_steps=10
    )
    assert apply_proximal_step(model, lr=0.0, step=9) == {"default": 0.5}
    assert apply_proximal_step(model, lr=0.0, step=10) == {"default": 1.0}
    assert apply_proximal_step(model, lr=0.0, step=1000) == {"default": 1.5}


class _Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.arange(6) * (i % 5 + 1) % 32
        return {"input_ids": ids, "labels": ids}


def _trainer(tmp_path, callbacks=None, **args) -> Trainer:
    model = get_peft_model(tiny_llama(0), SoraConfig(target_modules="all-linear", r=4, sparse_lambda=4.0))
    defaults = dict(
        output_dir=str(tmp_path), max_steps=6, learning_rate=0.05, lr_scheduler_type="constant", weight_decay=0.1, per_device_train_batch_size=4,
        logging_steps=2, save_strategy="steps", save_steps=3, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    return Trainer(model=model, args=TrainingArguments(**{**defaults, **args}), train_dataset=_Tokens(), callbacks=callbacks)


def test_trainer_drives_gates_logs_sparsity_and_resumes(tmp_path):
    trainer = _trainer(tmp_path / "run", gradient_checkpointing=True)
    SparseUpdateCallback.attach(trainer)
    trainer.train()
    model = trainer.model
    gates = {id(layer.sora_gate["default"]) for layer in layers(model)}
    for group in trainer.optimizer.param_groups:  # attach() kept every gate out of weight decay
        if any(id(p) in gates for p in group["params"]):
            assert group["weight_decay"] == 0.0
    final = torch.cat([layer.sora_gate["default"].detach() for layer in layers(model)])
    assert (final == 0).any() and (final != 0).any()
    logged = [entry for entry in trainer.state.log_history if "sparsity/active" in entry]
    assert len(logged) == 4  # every 2 steps + the end-of-training summary
    assert logged[-1]["sparsity/active"] == int((final != 0).sum())
    assert "sparsity/model.layers.0.self_attn.q_proj" in logged[-1]
    assert logged[-1]["sparsity/lambda/default"] == 4.0

    resumed = _trainer(tmp_path / "run", gradient_checkpointing=True)  # a fresh model, continued from the step-3 checkpoint
    SparseUpdateCallback.attach(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    again = torch.cat([layer.sora_gate["default"].detach() for layer in layers(resumed.model)])
    torch.testing.assert_close(again, final, atol=1e-5, rtol=0)


def test_plain_callback_warns_about_weight_decay_on_gates(tmp_path):
    """Without `attach`/`install` (which keep gates out of weight decay), a plain callback warns about it."""
    trainer = _trainer(tmp_path, callbacks=[SparseUpdateCallback()], max_steps=1, save_strategy="no")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert any("weight decay" in str(w.message) for w in caught)
    assert "sparsity/active" in trainer.state.log_history[0]


def test_installed_integration_keeps_gates_out_of_weight_decay(tmp_path):
    from sparse_peft import trainers

    trainers.install()
    try:
        trainer = _trainer(tmp_path, callbacks=[SparseUpdateCallback()], max_steps=1, save_strategy="no")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
    finally:
        trainers.uninstall()
    assert not any("weight decay" in str(w.message) for w in caught)
    gates = {id(p) for n, p in trainer.model.named_parameters() if "sora_gate" in n}
    decayed = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert gates and not gates & decayed


def test_trl_dpo_trains_default_and_leaves_the_ref_adapter_alone(tmp_path):
    """TRL copies the adapter into a frozen ``ref`` adapter; only the trained one takes proximal steps."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<bos>"] + [f"w{i}" for i in range(29)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    model = get_peft_model(tiny_llama(0), SoraConfig(target_modules=["q_proj", "v_proj"], r=4, sparse_lambda=2.0))
    pairs = Dataset.from_dict({"prompt": ["w1 w2", "w3 w4"] * 4, "chosen": [" w5 w6", " w7"] * 4,
                               "rejected": [" w8", " w9 w10"] * 4})
    args = trl.DPOConfig(output_dir=str(tmp_path), max_steps=3, learning_rate=0.05, per_device_train_batch_size=4,
                         report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    SparseUpdateCallback.attach(trainer)
    trainer.train()
    assert "ref" in trainer.model.peft_config
    for layer in layers(trainer.model):
        assert torch.equal(layer.sora_gate["ref"], torch.ones(4))  # frozen copy: no proximal step
        assert (layer.sora_gate["default"] < 1).all()  # trained: shrunk by lr·λ at every step
    assert "sparsity/active" in trainer.state.log_history[0]
