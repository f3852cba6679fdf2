"""PEFT's own generic tuner tests (``tests/test_custom_models.py`` of the installed PEFT's sdist) on SPARSE_DELTA.

The upstream suite is fetched by the test set-up (``python -m tests.peft_upstream --fetch``); without it this module
fails at import with that instruction, on purpose: a silent skip would hide that the contract went unchecked.

Every upstream test parametrized over PEFT's ``TEST_CASES`` (or over the config class) runs on our cases below, on
PEFT's toy models (``MLP``: ``lin0`` 10→20, ``lin1`` 20→2; ``EmbConv1D``: an embedding into a GPT-2 ``Conv1D``).
Tests that exercise a feature our method does not have are listed in ``NOT_APPLICABLE`` with the reason; tests
hard-wired to another upstream tuner (they construct e.g. a ``LoraConfig`` themselves) are not collected.
"""

from __future__ import annotations

import pytest
from peft import get_peft_model
from peft_upstream import import_tests, retarget_custom_models

import sparse_peft  # noqa: F401  (registers SPARSE_DELTA)
from sparse_peft import S2FTConfig, SparseDeltaConfig

upstream = import_tests("test_custom_models")

# (test_name, model_id, config_cls, config_kwargs), as upstream's TEST_CASES
TEST_CASES = [
    ("MLP lin0 density", "MLP", SparseDeltaConfig, {"target_modules": "lin0", "density": 0.5}),
    ("MLP lin0 r", "MLP", SparseDeltaConfig, {"target_modules": ["lin0"], "r": 1}),
    ("MLP both unfused", "MLP", SparseDeltaConfig, {"target_modules": ["lin0", "lin1"], "density": 0.3, "fused": False}),
    ("MLP lin0 blocks", "MLP", SparseDeltaConfig, {"target_modules": ["lin0"], "density": 0.5, "block_size": 4}),
    ("MLP lin1 magnitude", "MLP", SparseDeltaConfig, {"target_modules": ["lin1"], "density": 0.5, "selection": "magnitude"}),
    ("MLP modules_to_save", "MLP", SparseDeltaConfig, {"target_modules": ["lin0"], "density": 0.2, "modules_to_save": ["lin1"]}),
    ("EmbConv1D conv1d", "EmbConv1D", SparseDeltaConfig, {"target_modules": ["conv1d"], "density": 0.6}),
    ("EmbConv1D both unfused", "EmbConv1D", SparseDeltaConfig, {"target_modules": ["conv1d", "lin0"], "density": 0.5, "fused": False}),
    # S2FT on the headless toy models: roles mapped explicitly (lin0's input channels act as FFN channels)
    ("MLP s2ft down", "MLP", S2FTConfig, {"module_roles": {"down": "lin0"}, "channels_ratio": 0.5}),
    ("MLP s2ft rows unfused", "MLP", S2FTConfig,
     {"module_roles": {"up": "lin0", "down": "lin1"}, "up_gate_rows": True, "channels_ratio": 0.5, "fused": False}),
    ("EmbConv1D s2ft conv1d", "EmbConv1D", S2FTConfig, {"module_roles": {"down": "conv1d"}, "channels_ratio": 0.5}),
]

# (test_name, tuner_method, config_cls, config_kwargs_1, config_kwargs_2), as upstream's MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES
MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    ("SparseDelta same", "sparse_delta", SparseDeltaConfig,
     {"target_modules": ["lin0"], "density": 0.3, "init_weights": False, "seed": 1},
     {"target_modules": ["lin0"], "density": 0.3, "init_weights": False, "seed": 2}),
    ("SparseDelta different", "sparse_delta", SparseDeltaConfig,
     {"target_modules": ["lin0"], "density": 0.3, "init_weights": False},
     {"target_modules": ["lin1"], "density": 0.5, "init_weights": False, "fused": False}),
    ("S2FT same", "s2ft", S2FTConfig,
     {"module_roles": {"down": "lin0"}, "channels_ratio": 0.5, "init_weights": False, "seed": 1},
     {"module_roles": {"down": "lin0"}, "channels_ratio": 0.5, "init_weights": False, "seed": 2}),
]

# upstream test name -> why it does not apply to SPARSE_DELTA (reported as skipped). Upstream skips a few more
# itself for every non-LoRA method (the `bias` option, bias warnings, several active adapters with modules_to_save).
NOT_APPLICABLE: dict[str, str] = {
    "test_add_weighted_adapter_cat_with_rank_pattern": (
        "add_weighted_adapter is LoRA-only; the test builds a LoraConfig and ignores config_cls "
        "(combining sparse deltas is sparse_peft's compose())"
    ),
}

# upstream toy model -> (module we would target, why its cases are not in TEST_CASES); each must fail clearly
UNSUPPORTED_MODELS: dict[str, tuple[str, str]] = {
    "Conv1d": ("conv1d", "torch.nn.Conv1d is not a linear-like layer"),
    "Conv2d": ("conv2d", "torch.nn.Conv2d is not a linear-like layer"),
    "Conv3d": ("conv3d", "torch.nn.Conv3d is not a linear-like layer"),
    "MHA": ("mha", "nn.MultiheadAttention keeps its weights outside nn.Linear layers"),
    "EmbConv1D": ("emb", "embeddings are not adapted (use modules_to_save)"),
}

TestSparseDeltaCustomModels, TestSparseDeltaMultipleActiveAdapters = retarget_custom_models(
    "SparseDelta", SparseDeltaConfig, TEST_CASES, MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES,
    SparseDeltaConfig(target_modules=["lin0"], init_weights=False, density=0.3), NOT_APPLICABLE,
)
RETARGETED = (TestSparseDeltaCustomModels, TestSparseDeltaMultipleActiveAdapters)


@pytest.mark.parametrize("model_id", sorted(UNSUPPORTED_MODELS))
def test_unsupported_upstream_layers_raise_clear_error(model_id):
    """The layer types left out of TEST_CASES are refused with an error naming the supported layers."""
    target, _ = UNSUPPORTED_MODELS[model_id]
    model = upstream.MockTransformerWrapper.from_pretrained(model_id)
    with pytest.raises(TypeError, match="supported layers are"):
        get_peft_model(model, SparseDeltaConfig(target_modules=[target]))


def test_upstream_suite_is_retargeted():
    """Guards against a PEFT update silently turning the generic tests into no-ops (or stale skips) for us."""
    assert len(TestSparseDeltaCustomModels.upstream_retargeted) >= 30
    assert len(TestSparseDeltaMultipleActiveAdapters.upstream_retargeted) >= 3
    stale = set(NOT_APPLICABLE) - {test for cls in RETARGETED for test in cls.upstream_not_applicable}
    assert not stale, f"NOT_APPLICABLE names tests upstream no longer has: {sorted(stale)}"
