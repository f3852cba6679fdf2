"""TRL's SFTTrainer and DPOTrainer with every sparse_peft adapter type: peft_config=..., pre-wrapped PeftModels
(TRL's ``ref`` adapter copy), every dataset format, the callback attached automatically after the opt-in
``sparse_peft.trainers.install()`` (and nothing patched without it), and the reference (adapter disabled) exactly the
base model."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import trl
from peft import PeftModel, get_peft_model
from sparse_peft.trainers import SparseUpdateCallback

from sparse_peft import trainers
from sparse_peft.embedded.toy import tiny_llama
from tests.trl_helpers import (
    SPARSE_METHODS,
    TRAIN_ARGS,
    adapter_configs,
    assert_only_adapter_changed,
    preference_dataset,
    sft_dataset,
    snapshot,
    word_tokenizer,
)

COMMON = {**TRAIN_ARGS}
FORMATS = {  # every TRL SFT format, each with more than one adapter type
    "sparse_delta": "text",
    "sparse_delta_dynamic": "messages",
    "sora": "prompt_completion",
    "group_sparse_lora": "messages",
    "s2ft": "text",
}


@pytest.fixture(autouse=True, scope="module")
def installed():
    """This module tests the automatic attachment: the documented opt-in, undone afterwards."""
    trainers.install()
    yield
    trainers.uninstall()


def test_importing_the_integration_patches_nothing_and_uninstall_restores_transformers():
    script = (
        "import transformers.trainer as t\n"
        "from transformers import Trainer\n"
        "before = (list(t.DEFAULT_CALLBACKS), Trainer.get_decay_parameter_names)\n"
        "import sparse_peft, sparse_peft.trainers as st\n"
        "assert (list(t.DEFAULT_CALLBACKS), Trainer.get_decay_parameter_names) == before, 'import patched'\n"
        "assert not st.installed()\n"
        "st.install(); st.install()\n"
        "assert st.installed() and t.DEFAULT_CALLBACKS.count(st.integration.AutoSparseUpdateCallback) == 1\n"
        "st.uninstall()\n"
        "assert (list(t.DEFAULT_CALLBACKS), Trainer.get_decay_parameter_names) == before, 'uninstall left a patch'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_without_the_opt_in_a_trainer_gets_the_callback_only_from_attach(tmp_path):
    trainers.uninstall()
    try:
        trainer = trl.SFTTrainer(
            model=tiny_llama(0),
            args=trl.SFTConfig(output_dir=str(tmp_path), max_length=16, **{**COMMON, "max_steps": 1}),
            train_dataset=sft_dataset("text"),
            processing_class=word_tokenizer(),
            peft_config=adapter_configs()["sora"],
        )
        assert callbacks(trainer) == []
        assert trainers.attach(trainer) is callbacks(trainer)[0]
    finally:
        trainers.install()


def callbacks(trainer) -> list[SparseUpdateCallback]:
    return [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SparseUpdateCallback)]


def check_logs(trainer, method: str) -> None:
    logs = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    assert torch.isfinite(torch.tensor(logs.get("loss", logs.get("train_loss")))).item()
    if method in ("sora", "group_sparse_lora"):
        assert "sparsity/active_fraction" in logs  # the proximal hook ran and logged
    if method == "sparse_delta_dynamic":
        assert logs["sparsity/reselections"] >= 1  # masks were reselected during TRL training


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_sft_trainer_with_peft_config(tmp_path, method):
    args = trl.SFTConfig(output_dir=str(tmp_path), max_length=16, **COMMON)
    trainer = trl.SFTTrainer(
        model=tiny_llama(0),
        args=args,
        train_dataset=sft_dataset(FORMATS[method]),
        processing_class=word_tokenizer(),
        peft_config=adapter_configs()[method],
    )
    assert len(callbacks(trainer)) == 1  # attached automatically after `trainers.install()`
    assert trainers.attach(trainer) is callbacks(trainer)[0]  # the explicit call never adds a second one
    assert len(callbacks(trainer)) == 1
    before = snapshot(trainer.model)
    trainer.train()
    assert_only_adapter_changed(before, snapshot(trainer.model), "default")
    check_logs(trainer, method)


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_dpo_trainer_with_peft_config_reference_is_the_base(tmp_path, method):
    base = tiny_llama(0)
    reference = copy.deepcopy(base)
    args = trl.DPOConfig(output_dir=str(tmp_path), max_length=16, **COMMON)
    trainer = trl.DPOTrainer(
        model=base,
        args=args,
        train_dataset=preference_dataset(conversational=method in ("sora", "s2ft")),
        processing_class=word_tokenizer(),
        peft_config=adapter_configs()[method],
    )
    assert "ref" not in trainer.model.peft_config  # a fresh adapter: the reference is the adapter disabled
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    assert_only_adapter_changed(before, after, "default")
    check_logs(trainer, method)
    ids = torch.randint(5, 45, (2, 10), generator=torch.Generator().manual_seed(1))
    model = trainer.model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            disabled = model(input_ids=ids).logits
        # accelerate leaves the trained model's forward wrapped in the run's autocast: compare like with like
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            expected = reference(input_ids=ids).logits.float()
    assert torch.equal(disabled, expected)  # bit-exact base, also for fused sparse deltas
    assert not torch.allclose(adapted, expected)


@pytest.mark.parametrize("method", [*SPARSE_METHODS, "lora"])
def test_dpo_trainer_pre_wrapped_copies_the_adapter_into_ref(tmp_path, method):
    model = get_peft_model(tiny_llama(0), adapter_configs()[method])
    with torch.no_grad():  # a "pretrained" adapter: move every adapter tensor away from its initial value
        for name, p in model.named_parameters():
            if ".default" in name:
                p.add_(torch.randn_like(p) * 0.05)
    trained = {n: t for n, t in snapshot(model).items() if ".default" in n}
    args = trl.DPOConfig(output_dir=str(tmp_path), max_length=16, **COMMON)
    trainer = trl.DPOTrainer(
        model=model, args=args, train_dataset=preference_dataset(), processing_class=word_tokenizer()
    )
    assert isinstance(trainer.model, PeftModel) and "ref" in trainer.model.peft_config
    start = snapshot(trainer.model)
    for name, value in trained.items():  # every tensor (gates and index buffers too) was copied
        assert torch.equal(start[name.replace(".default", ".ref")], value), name
    trainer.train()
    end = snapshot(trainer.model)
    assert_only_adapter_changed(start, end, "default")  # the `ref` adapter is frozen


def test_explicit_callback_and_automatic_one_never_both_run(tmp_path):
    """``callbacks=[SparseUpdateCallback()]`` (the pre-install way) next to the automatic instance: one runs."""
    args = trl.SFTConfig(output_dir=str(tmp_path), max_length=16, **{**COMMON, "max_steps": 2})
    explicit = SparseUpdateCallback()
    trainer = trl.SFTTrainer(
        model=tiny_llama(0),
        args=args,
        train_dataset=sft_dataset("text"),
        processing_class=word_tokenizer(),
        peft_config=adapter_configs()["sora"],
        callbacks=[explicit],
    )
    assert len(callbacks(trainer)) == 2
    trainer.train()
    assert [cb for cb in callbacks(trainer) if cb._active] == [explicit]
    assert "sparsity/active_fraction" in trainer.state.log_history[0]
