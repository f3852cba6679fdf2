"""The PEFT tuner contract (tests/contract.py) for SPARSE_DELTA on tiny Llama, Qwen2, GPT-2 and BERT models."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from contract import ARCHS, Arch, Batch, TunerCase, TunerContract, tuner_config
from peft import PeftModel, get_peft_model

from sparse_peft import SparseDeltaConfig, SparseDeltaLayer, select_masks


def sparse_delta(arch: Arch, *, init_weights: bool, variant: int = 0, **kwargs):
    """Config factory: ``variant`` becomes the seed, so variants pick different entries and values."""
    return tuner_config(SparseDeltaConfig, arch, init_weights=init_weights, seed=variant, **kwargs)


def calibrate(model: PeftModel, adapter_name: str, batches: list[Batch]) -> None:
    """Gradient selection from the batches; then non-zero values again if the config asked for them."""
    select_masks(model, batches, adapter_name=adapter_name)
    if model.peft_config[adapter_name].init_weights:
        return
    gen = torch.Generator().manual_seed(len(adapter_name))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SparseDeltaLayer) and adapter_name in module.support_values:
                values = module.support_values[adapter_name]
                values.copy_(torch.randn(values.shape, generator=gen) * 0.1)


class TestSparseDeltaContract(TunerContract):
    cases = [
        TunerCase("density-fused", partial(sparse_delta, density=0.1), exact_unmerge=True),
        TunerCase("r-unfused", partial(sparse_delta, r=1, fused=False), exact_unmerge=True),
        TunerCase(
            "attention-layer1-magnitude",
            partial(sparse_delta, attention_only=True, density=0.2, selection="magnitude"),
            exact_unmerge=True,
        ),
        TunerCase(
            "gradient-calibrated", partial(sparse_delta, density=0.05, selection="gradient"), exact_unmerge=True,
            prepare=calibrate,
        ),
        TunerCase(
            "blocks-gradient", partial(sparse_delta, density=0.1, selection="gradient", block_size=8),
            exact_unmerge=True, prepare=calibrate,
        ),
    ]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_budget_counts_only_values(arch):
    """Trainable parameters are exactly the per-matrix budgets (indices are buffers, not parameters)."""
    config = sparse_delta(ARCHS[arch], init_weights=True, r=2)
    model = get_peft_model(ARCHS[arch].build(), config)
    layers = [m for m in model.modules() if isinstance(m, SparseDeltaLayer)]
    assert len({layer.storage_shape for layer in layers}) > 1  # GQA k/v and Conv1D shapes differ from q
    assert model.get_nb_trainable_parameters()[0] == sum(config.budget(*layer.storage_shape) for layer in layers)
