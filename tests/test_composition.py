"""Sparse mask algebra, composition of sparse adapters, cross-model loading and extraction from full fine-tunes."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from sparse_peft import SparseDeltaConfig, SparseMask, compose, extract_sparse_delta
from sparse_peft.masks import sparse_delta_layers
from tests.test_sparse_delta_core import INPUT, logits, tiny_llama


def two_adapter_model():
    model = get_peft_model(
        tiny_llama(), SparseDeltaConfig(target_modules="all-linear", density=0.1, init_weights=False, seed=0)
    )
    model.add_adapter(
        "b", SparseDeltaConfig(target_modules="all-linear", density=0.1, init_weights=False, seed=1)
    )
    return model


def test_mask_algebra_and_statistics():
    shapes = {"m": (4, 5)}
    a = SparseMask({"m": torch.tensor([0, 3, 7, 9])}, shapes)
    b = SparseMask({"m": torch.tensor([3, 9, 12])}, shapes)
    assert (a | b).supports["m"].tolist() == [0, 3, 7, 9, 12]
    assert (a & b).supports["m"].tolist() == [3, 9]
    assert (a - b).supports["m"].tolist() == [0, 7]
    assert a.density() == pytest.approx(4 / 20)
    assert a.jaccard(b)["m"] == pytest.approx(2 / 5)
    stats = a.overlap(b)
    assert stats["intersection"] == 2 and stats["union"] == 5 and stats["fraction_of_a_shared"] == 0.5
    with pytest.raises(ValueError, match="not sorted"):
        SparseMask({"m": torch.tensor([3, 1])}, shapes)
    with pytest.raises(ValueError, match="shape"):
        a | SparseMask({"m": torch.tensor([1])}, {"m": (5, 4)})


def test_mask_from_model_matches_layer_indices():
    model = two_adapter_model()
    mask = SparseMask.from_model(model, "b")
    layers = sparse_delta_layers(model)
    assert mask.supports.keys() == layers.keys()
    for name, layer in layers.items():
        assert torch.equal(mask.supports[name], layer.sparse_delta_indices["b"].long())
    assert mask.density() == pytest.approx(0.1, abs=0.01)


def test_compose_equals_both_active_and_sums_overlaps(tmp_path):
    model = two_adapter_model()
    model.base_model.set_adapter(["default", "b"])
    both = logits(model)
    compose(model, ["default", "b"], new_adapter_name="ab")
    model.set_adapter("ab")
    torch.testing.assert_close(logits(model), both, atol=1e-5, rtol=1e-5)
    union = SparseMask.from_model(model, "default") | SparseMask.from_model(model, "b")
    composed = SparseMask.from_model(model, "ab")
    assert all(torch.equal(composed.supports[n], union.supports[n]) for n in union.supports)
    layer = next(iter(sparse_delta_layers(model).values()))
    dense = layer.get_delta_weight("default") + layer.get_delta_weight("b")
    torch.testing.assert_close(layer.get_delta_weight("ab"), dense)
    # the composition is an ordinary adapter: save, reload, merge
    model.save_pretrained(tmp_path, selected_adapters=["ab"])
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ab", adapter_name="ab")
    torch.testing.assert_close(logits(reloaded), both, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(reloaded.merge_and_unload()), both, atol=1e-5, rtol=1e-5)


def test_compose_weights_and_errors():
    model = two_adapter_model()
    compose(model, ["default"], weights=[0.5], new_adapter_name="scaled")
    layer = next(iter(sparse_delta_layers(model).values()))
    torch.testing.assert_close(layer.get_delta_weight("scaled"), 0.5 * layer.get_delta_weight("default"))
    with pytest.raises(ValueError, match="already exists"):
        compose(model, ["default"], new_adapter_name="b")
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        compose(model, ["default", "b"], weights=[1.0], new_adapter_name="x")


def test_disjoint_regression_targets_compose():
    """Two adapters trained on targets living in disjoint supports: their composition fits both."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8, bias=False))
    x = torch.randn(64, 8)
    masks = {"a": torch.arange(0, 32), "b": torch.arange(32, 64)}  # rows 0-3 vs rows 4-7
    targets = {}
    for name, support in masks.items():
        w = base[0].weight.detach().clone().flatten()
        w[support] += torch.randn(32)
        targets[name] = x @ w.view(8, 8).t()
    model = get_peft_model(base, SparseDeltaConfig(target_modules=["0"], density=0.5))
    model.add_adapter("b", SparseDeltaConfig(target_modules=["0"], density=0.5))
    for name, adapter in (("a", "default"), ("b", "b")):
        SparseMask({"0": masks[name]}, {"0": (8, 8)}).apply(model, adapter)
        model.set_adapter(adapter)
        values = model.base_model.model[0].sparse_delta_values[adapter]
        optimizer = torch.optim.Adam([values], lr=0.1)
        for _ in range(300):
            loss = (model(x) - targets[name]).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    compose(model, ["default", "b"], new_adapter_name="ab")
    model.set_adapter("ab")
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out[:, :4], targets["a"][:, :4], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out[:, 4:], targets["b"][:, 4:], atol=1e-3, rtol=1e-3)


def test_train_new_adapter_restricted_to_mask():
    model = two_adapter_model()
    mask = SparseMask.from_model(model, "default") & SparseMask.from_model(model, "b")
    model.add_adapter("c", SparseDeltaConfig(target_modules="all-linear", density=0.1, seed=2))
    mask.apply(model, "c")
    model.set_adapter("c")
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=INPUT, labels=INPUT).loss.backward()
    optimizer.step()
    for name, layer in sparse_delta_layers(model).items():
        assert torch.equal(layer.sparse_delta_indices["c"].long(), mask.supports[name])
        assert layer.sparse_delta_values["c"].numel() == mask.supports[name].numel()


def test_adapter_file_loads_on_another_model_of_same_architecture(tmp_path):
    model = get_peft_model(tiny_llama(0), SparseDeltaConfig(target_modules="all-linear", init_weights=False))
    model.save_pretrained(tmp_path)
    other = PeftModel.from_pretrained(tiny_llama(seed=7), tmp_path)
    for name, layer in sparse_delta_layers(other).items():
        source = sparse_delta_layers(model)[name]
        assert torch.equal(layer.sparse_delta_indices["default"], source.sparse_delta_indices["default"])
        assert torch.equal(layer.sparse_delta_values["default"], source.sparse_delta_values["default"])


def _finetune(change_density: float):
    base = tiny_llama()
    finetuned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in finetuned.named_parameters():
            if "proj" in name:
                mask = torch.rand(param.shape, generator=gen) < change_density
                param[mask] += 0.05 * torch.randn(int(mask.sum()), generator=gen)
    return finetuned


@pytest.mark.parametrize("budget", ["per_layer", "global"])
def test_extraction_reproduces_finetune_at_true_density(budget):
    finetuned = _finetune(0.03)
    expected = logits(finetuned)
    extracted = extract_sparse_delta(tiny_llama(), finetuned, density=0.06, budget=budget)
    report = extracted.extraction_report
    assert report.relative_error < 1e-6
    assert report.untargeted_changed_params == []
    torch.testing.assert_close(logits(extracted), expected, atol=1e-5, rtol=1e-5)
    low = extract_sparse_delta(tiny_llama(), finetuned, density=0.01, budget=budget).extraction_report
    assert low.relative_error > 0.3  # below the true change density the error is real and reported


def test_extraction_reports_untargeted_changes():
    finetuned = _finetune(0.03)
    with torch.no_grad():
        finetuned.model.norm.weight.add_(1.0)
    report = extract_sparse_delta(tiny_llama(), finetuned, density=0.06).extraction_report
    assert report.untargeted_changed_params == ["model.norm.weight"]
