"""export_to_lora: pruned SoRA / group-sparse LoRA adapters load in vanilla PEFT and reproduce the gated outputs.

Tolerance: the export folds the gate into B (``B·diag(g)``) and drops exactly-zero ranks, which only re-associates
float products, so outputs agree to ~1e-6 in fp32; the tests use ``atol=1e-5``.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from lowrank_contract import (
    BUILDERS,
    TARGETS,
    layers,
    output,
    outputs_in_fresh_process,
    random_gates_to_zero,
    save_tiny_base,
    tiny_llama,
)
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import sparse_peft  # noqa: F401
from sparse_peft import GroupSparseLoraConfig, SoraConfig, export_to_lora

ATOL = 1e-5


def _sparse_model(kind: str, config_cls, **kwargs):
    extra = {"task_type": "SEQ_CLS", "modules_to_save": ["classifier"]} if kind == "bert" else {}
    model = get_peft_model(BUILDERS[kind](0), config_cls(target_modules=TARGETS[kind], r=6, init_weights=False,
                                                         lora_alpha=12, **extra, **kwargs))
    random_gates_to_zero(model, seed=1)
    if kind == "bert":  # a trained head must travel with the export
        with torch.no_grad():
            model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    return model.eval()


@pytest.mark.slow
def test_export_round_trips_through_vanilla_peft_in_a_fresh_process(tmp_path):
    cases, expected = [], []
    for kind, config_cls in (("llama", SoraConfig), ("gpt2", SoraConfig), ("bert", GroupSparseLoraConfig)):
        model = _sparse_model(kind, config_cls)
        report = export_to_lora(model, tmp_path / f"lora-{kind}")
        assert report.dropped_modules and 0 < report.kept_fraction < 1
        cases.append({"kind": kind, "base": str(save_tiny_base(kind, tmp_path)), "adapter": str(tmp_path / f"lora-{kind}")})
        expected.append(output(model))
    for got, want in zip(outputs_in_fresh_process(cases, with_sparse_peft=False), expected, strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_export_prunes_zero_ranks_and_writes_rank_patterns(tmp_path):
    model = _sparse_model("llama", SoraConfig)
    expected = {}
    for name, layer in model.named_modules():
        if layer in layers(model):
            expected[name.removeprefix("base_model.model.")] = int((layer.sora_gate["default"] != 0).sum())
    report = export_to_lora(model, tmp_path)
    assert report.ranks == {n: r for n, r in expected.items() if r} and report.dropped_modules == [
        n for n, r in expected.items() if not r
    ]
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["rank_pattern"]  # ranks differ per module
    assert not set(report.dropped_modules) & set(saved["target_modules"])

    y = output(model)
    lora = PeftModel.from_pretrained(model.unload(), tmp_path).eval()
    torch.testing.assert_close(output(lora), y, atol=ATOL, rtol=0)
    for name, r in report.ranks.items():  # each module got exactly its active rank, with the same scaling (12/6)
        module = lora.base_model.model.get_submodule(name)
        assert module.r["default"] == r and module.scaling["default"] == pytest.approx(2.0)
    n_params = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    sizes = {n: lora.base_model.model.get_submodule(n) for n in report.ranks}
    assert n_params == sum(r * (sizes[n].in_features + sizes[n].out_features) for n, r in report.ranks.items())


def test_channel_groups_export_exactly_with_a_warning(tmp_path):
    model = get_peft_model(tiny_llama(0), GroupSparseLoraConfig(target_modules=["q_proj"], group_by="row",
                                                                init_weights=False))
    for layer in layers(model):
        with torch.no_grad():
            layer.weight_B("default")[::2] = 0  # half of the output channels pruned
    y = output(model.eval())
    with pytest.warns(UserWarning, match="cannot drop channels"):
        export_to_lora(model, tmp_path)
    lora = PeftModel.from_pretrained(model.unload(), tmp_path)
    torch.testing.assert_close(output(lora), y, atol=ATOL, rtol=0)


def test_export_refuses_what_it_cannot_export(tmp_path):
    model = get_peft_model(tiny_llama(0), SoraConfig(target_modules=["q_proj"]))
    for layer in layers(model):
        with torch.no_grad():
            layer.sora_gate["default"].zero_()
    with pytest.raises(ValueError, match="switched off"):
        export_to_lora(model, tmp_path)
    lora = get_peft_model(tiny_llama(0), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="SORA or GROUP_SPARSE_LORA"):
        export_to_lora(lora, tmp_path)


class _Nested(nn.Module):
    """``sub.lin`` and ``x.sub.lin``: a plain name list would make LoRA adapt both."""

    def __init__(self) -> None:
        super().__init__()
        self.sub = nn.ModuleDict({"lin": nn.Linear(8, 8)})
        self.x = nn.ModuleDict({"sub": nn.ModuleDict({"lin": nn.Linear(8, 8)})})

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.x["sub"]["lin"](self.sub["lin"](t))


def test_export_targets_exactly_the_exported_modules(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(_Nested(), SoraConfig(target_modules=r"^sub\.lin$", init_weights=False, r=2))
    t = torch.randn(3, 8)
    y = model(t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_to_lora(model, tmp_path)
    assert isinstance(report.config.target_modules, str)  # an anchored regex, not a suffix-matched name list
    lora = PeftModel.from_pretrained(model.unload(), tmp_path)
    assert [n for n, m in lora.named_modules() if hasattr(m, "lora_A")] == ["base_model.model.sub.lin"]
    torch.testing.assert_close(lora(t), y, atol=ATOL, rtol=0)
