"""QLoRA-style training through TRL on bitsandbytes 4-bit and 8-bit bases (CPU) for every adapter type: the
adapter trains, the quantized base stays untouched, and merge_and_unload gives a model with the adapter's outputs."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
import trl
from peft import PeftModel
from sparse_peft.trainers import attach
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

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

ARGS = {**TRAIN_ARGS, "max_steps": 2, "max_length": 16, "bf16": False}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(0).save_pretrained(path)
    return path


def quantized(path, bits: int):
    config = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        if bits == 4
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)
    layer_type = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert isinstance(model.model.layers[0].mlp.down_proj, layer_type)
    return model


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_sft_on_quantized_base_then_merge(tmp_path, tiny_path, method, bits):
    trainer = trl.SFTTrainer(
        model=quantized(tiny_path, bits),
        args=trl.SFTConfig(output_dir=str(tmp_path), **ARGS),
        train_dataset=sft_dataset("prompt_completion"),
        processing_class=word_tokenizer(),
        peft_config=adapter_configs()[method],
    )
    attach(trainer)
    before = snapshot(trainer.model)
    trainer.train()
    assert_only_adapter_changed(before, snapshot(trainer.model), "default")  # quantized weights untouched
    model = trainer.model.eval()
    ids = torch.randint(5, 45, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        merged_out = merged(input_ids=ids).logits
    assert not isinstance(merged, PeftModel)
    # re-quantizing the merged weight adds quantization noise, but the merge must carry the adapter's change
    change = (adapted - base).abs().mean()
    assert change > 0
    assert (merged_out - adapted).abs().mean() < (merged_out - base).abs().mean() + 0.5 * change


def test_dpo_on_4bit_base_reference_is_the_quantized_base(tmp_path, tiny_path):
    reference = quantized(tiny_path, 4)
    trainer = trl.DPOTrainer(
        model=quantized(tiny_path, 4),
        args=trl.DPOConfig(output_dir=str(tmp_path), **ARGS),
        train_dataset=preference_dataset(),
        processing_class=word_tokenizer(),
        peft_config=adapter_configs()["sparse_delta_dynamic"],
    )
    attach(trainer)
    before = snapshot(trainer.model)
    trainer.train()
    assert_only_adapter_changed(before, snapshot(trainer.model), "default")
    ids = torch.randint(5, 45, (2, 10), generator=torch.Generator().manual_seed(1))
    model = trainer.model.eval()  # like the reference: bitsandbytes' CPU 4-bit kernel differs in train and eval mode
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(input_ids=ids).logits, reference.eval()(input_ids=ids).logits)
