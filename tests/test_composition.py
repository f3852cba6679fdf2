"""Sparse mask algebra, composition of sparse adapters, cross-model loading and extraction from full fine-tunes."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from sparse_peft import S2FTConfig, SparseDeltaConfig, SparseMask, compose, extract_sparse_delta
from sparse_peft.compose import METHODS, input_grams, merge_deltas, regmean_values
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
        assert torch.equal(mask.supports[name], layer.support_indices["b"].long())
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


def _delta(indices, values):
    return torch.tensor(indices), torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "regmean"])
def test_disjoint_supports_keep_every_value_at_full_density(method):
    """Entries only one adapter changed keep exactly its value, whatever the method (DARE at density 1 drops
    nothing)."""
    a, b = _delta([0, 4, 9], [0.5, -1.0, 2.0]), _delta([1, 5], [3.0, -0.25])
    union, values = merge_deltas([a, b], [1.0, 1.0], method, density=1.0)
    assert union.tolist() == [0, 1, 4, 5, 9]
    assert values.tolist() == [0.5, 3.0, -1.0, -0.25, 2.0]


def test_ties_elects_a_sign_and_averages_instead_of_adding():
    a, b, c = _delta([0, 1, 2], [1.0, 2.0, -1.0]), _delta([0, 1, 2], [3.0, -1.0, -3.0]), _delta([2], [5.0])
    union, summed = merge_deltas([a, b, c], [1, 1, 1], "sum")
    union, ties = merge_deltas([a, b, c], [1, 1, 1], "ties")
    assert summed.tolist() == [4.0, 1.0, 1.0]
    # entry 0: both positive -> mean 2; entry 1: sum +1 elects +, only a's 2.0 agrees; entry 2: sum +1 -> c's 5.0
    assert ties.tolist() == [2.0, 2.0, 5.0]


def test_trimming_keeps_the_largest_fraction_of_each_deltas_own_entries():
    a = _delta([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [0.1, -5.0, 0.2, 0.3, 4.0, 0.1, 0.1, 0.2, 0.1, 0.1])
    b = _delta([100, 101], [0.01, -0.02])  # a delta of small values keeps its own largest entries
    union, values = merge_deltas([a, b], [1.0, 1.0], "magnitude_prune", density=0.2)
    kept = {i: v for i, v in zip(union.tolist(), values.tolist(), strict=True) if v != 0}
    assert kept == {1: -5.0, 4: 4.0, 101: pytest.approx(-0.02)}


def test_dare_drops_at_the_density_and_rescales_the_rest():
    n = 20_000
    a = _delta(list(range(n)), [1.0] * n)
    generator = torch.Generator().manual_seed(0)
    _, values = merge_deltas([a], [1.0], "dare_linear", density=0.25, generator=generator)
    assert set(values.unique().tolist()) == {0.0, 4.0}
    assert abs((values != 0).float().mean().item() - 0.25) < 0.02  # expectation preserved: mean ~ 1
    _, again = merge_deltas([a], [1.0], "dare_linear", 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(values, again)


@pytest.mark.parametrize("config", [
    SparseDeltaConfig(target_modules="all-linear", density=0.1, init_weights=False),
    S2FTConfig(heads_ratio=0.5, channels_ratio=0.5, init_weights=False),
], ids=["sparse_delta", "s2ft"])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "magnitude_prune"])
def test_compose_methods_build_ordinary_adapters_that_save_and_reload(tmp_path, config, method):
    other = copy.deepcopy(config)
    other.seed = 1
    model = get_peft_model(tiny_llama(), config)
    model.add_adapter("b", other)
    compose(model, ["default", "b"], new_adapter_name="merged", method=method, density=0.3)
    for layer in sparse_delta_layers(model).values():
        parts = [(layer.support_indices[a], layer.delta_values(a).detach()) for a in ("default", "b")]
        union, expected = merge_deltas(parts, [1.0, 1.0], method, 0.3, torch.Generator().manual_seed(0))
        dense = torch.zeros(layer.numel).index_put_((union,), expected).reshape(layer.storage_shape)
        if layer.fan_in_fan_out:
            dense = dense.T
        if method == "dare_ties":  # DARE's draws depend on the layer order; its exactness is tested above
            assert layer.support_values["merged"].numel() <= union.numel()
            continue
        torch.testing.assert_close(layer.get_delta_weight("merged"), dense)
        if isinstance(config, SparseDeltaConfig):  # trimmed entries leave the support
            assert layer.support_values["merged"].numel() == int((expected != 0).sum())
        else:  # S2FT keeps the union of the slices, trimmed entries at 0
            assert layer.support_values["merged"].numel() == union.numel()
    model.set_adapter("merged")
    expected_logits = logits(model)
    model.save_pretrained(tmp_path, selected_adapters=["merged"])
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "merged", adapter_name="merged")
    torch.testing.assert_close(logits(reloaded), expected_logits, atol=1e-5, rtol=1e-5)


def test_compose_method_errors():
    model = two_adapter_model()
    with pytest.raises(ValueError, match="method must be one of"):
        compose(model, ["default", "b"], new_adapter_name="x", method="average")
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        compose(model, ["default", "b"], new_adapter_name="x", method="ties", density=0.0)
    with pytest.raises(ValueError, match="sum keeps every entry"):
        compose(model, ["default", "b"], new_adapter_name="x", method="sum", density=0.5)
    assert "x" not in model.peft_config


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
        values = model.base_model.model[0].support_values[adapter]
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
        assert torch.equal(layer.support_indices["c"].long(), mask.supports[name])
        assert layer.support_values["c"].numel() == mask.supports[name].numel()


def test_adapter_file_loads_on_another_model_of_same_architecture(tmp_path):
    model = get_peft_model(tiny_llama(0), SparseDeltaConfig(target_modules="all-linear", init_weights=False))
    model.save_pretrained(tmp_path)
    other = PeftModel.from_pretrained(tiny_llama(seed=7), tmp_path)
    for name, layer in sparse_delta_layers(other).items():
        source = sparse_delta_layers(model)[name]
        assert torch.equal(layer.support_indices["default"], source.support_indices["default"])
        assert torch.equal(layer.support_values["default"], source.support_values["default"])


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


# ------------------------------------------------------------------ training adapters that compose
def _calibration_batches():
    return [{"input_ids": INPUT, "labels": INPUT}]


def test_a_second_skill_selects_its_mask_outside_the_first_ones_support():
    from sparse_peft import select_masks

    model = get_peft_model(tiny_llama(), SparseDeltaConfig(target_modules="all-linear", density=0.1,
                                                           selection="gradient"))
    select_masks(model, _calibration_batches())
    model.add_adapter("second", SparseDeltaConfig(target_modules="all-linear", density=0.1, selection="gradient"))
    first = SparseMask.from_model(model, "default")
    select_masks(model, _calibration_batches(), adapter_name="second")
    unrestricted = SparseMask.from_model(model, "second")
    assert (unrestricted & first).nnz > 0  # the same batches: gradient masks overlap unless told otherwise
    select_masks(model, _calibration_batches(), adapter_name="second", exclude=first)
    second = SparseMask.from_model(model, "second")
    assert (second & first).nnz == 0 and second.nnz == first.nnz  # disjoint, and the same budget


def test_lt_sft_masks_come_from_the_largest_changes_of_a_full_finetune():
    from sparse_peft.selection import select_from_changes

    finetuned = tiny_llama()
    layer_name = "model.layers.0.mlp.down_proj"
    weight = dict(finetuned.named_modules())[layer_name].weight
    with torch.no_grad():
        weight.view(-1)[[3, 17, 40]] += torch.tensor([5.0, -4.0, 3.0])
    model = get_peft_model(tiny_llama(), SparseDeltaConfig(target_modules="all-linear", density=0.1))
    select_from_changes(model, finetuned)
    layer = sparse_delta_layers(model)[layer_name]
    assert {3, 17, 40} <= set(layer.support_indices["default"].tolist())
    assert torch.count_nonzero(layer.support_values["default"]) == 0  # trained from the base


def test_l1_pull_soft_thresholds_the_values_after_each_step():
    from sparse_peft import apply_proximal_step
    from sparse_peft.proximal import sparsity_report

    model = get_peft_model(tiny_llama(), SparseDeltaConfig(target_modules="all-linear", density=0.1,
                                                           init_weights=False, l1_lambda=0.5))
    layer = next(iter(sparse_delta_layers(model).values()))
    before = layer.support_values["default"].detach().clone()
    apply_proximal_step(model, lr=0.2)  # threshold 0.1
    expected = torch.sign(before) * (before.abs() - 0.1).clamp(min=0)
    torch.testing.assert_close(layer.support_values["default"].detach(), expected)
    active, total = next(iter(sparsity_report(model).values()))
    assert 0 < active < total
    plain = get_peft_model(tiny_llama(), SparseDeltaConfig(target_modules="all-linear", init_weights=False))
    assert apply_proximal_step(plain, lr=0.2) == {}  # no L1: untouched
    with pytest.raises(ValueError, match="l1_lambda"):
        SparseDeltaConfig(l1_lambda=-1.0)


def _task_batches(seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 6), generator=generator)
    return [{"input_ids": ids, "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])}]


def _objective(layer, grams: dict, adapters: list[str], composed: str) -> float:
    """RegMean's loss Σ_i tr((Δ − Δ_i) G_i (Δ − Δ_i)ᵀ) of one layer, in (out, in) orientation."""
    def dense(adapter: str) -> torch.Tensor:
        d = layer.get_delta_weight(adapter).double()
        return d.T if layer.fan_in_fan_out else d

    target = dense(composed)
    return sum(float(torch.trace((target - dense(a)) @ grams[a].double() @ (target - dense(a)).T)) for a in adapters)


@pytest.mark.parametrize("config", [
    SparseDeltaConfig(target_modules="all-linear", density=0.1, init_weights=False),
    S2FTConfig(heads_ratio=0.5, channels_ratio=0.5, init_weights=False),
], ids=["sparse_delta", "s2ft"])
def test_regmean_minimises_every_tasks_output_error_on_the_union_support(tmp_path, config):
    """With alpha = 1 RegMean is the least-squares optimum on the union support: its loss on the tasks' own layer
    inputs is below the sum's and TIES' (both live on subsets of that support) in every layer; it saves and
    reloads like any adapter."""
    other = copy.deepcopy(config)
    other.seed = 1
    model = get_peft_model(tiny_llama(), config)
    model.add_adapter("b", other)
    inputs = {"default": _task_batches(0), "b": _task_batches(1)}
    compose(model, ["default", "b"], new_adapter_name="rm", method="regmean", inputs=inputs, alpha=1.0)
    compose(model, ["default", "b"], new_adapter_name="sum", method="sum")
    compose(model, ["default", "b"], new_adapter_name="ties", method="ties", density=0.5)
    layers = sparse_delta_layers(model)
    grams = input_grams(model, {n: m for n, m in layers.items()}, inputs)
    for name, layer in layers.items():
        per_task = {a: grams[a][name] for a in ("default", "b")}
        best = _objective(layer, per_task, ["default", "b"], "rm")
        assert best <= _objective(layer, per_task, ["default", "b"], "sum") * (1 + 1e-6) + 1e-9, name
        assert best <= _objective(layer, per_task, ["default", "b"], "ties") * (1 + 1e-6) + 1e-9, name
    model.set_adapter("rm")
    expected_logits = logits(model)
    model.save_pretrained(tmp_path, selected_adapters=["rm"])
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "rm", adapter_name="rm")
    torch.testing.assert_close(logits(reloaded), expected_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("in_out", [False, True])
def test_regmean_of_one_delta_is_that_delta_and_the_layout_does_not_matter(in_out):
    torch.manual_seed(0)
    out_features, in_features = 5, 7
    x = torch.randn(20, in_features)
    gram = x.T @ x / 20
    logical = torch.zeros(out_features, in_features)
    logical.view(-1)[torch.tensor([1, 3, 8, 9, 20, 34])] = torch.randn(6)
    stored = logical.T.contiguous() if in_out else logical
    indices = stored.reshape(-1).nonzero().squeeze(1)
    union, values = regmean_values([(indices, stored.reshape(-1)[indices])], [gram], tuple(stored.shape), in_out)
    assert torch.equal(union, indices)
    torch.testing.assert_close(values, stored.reshape(-1)[indices], rtol=1e-4, atol=1e-6)
    # two deltas: the result in the (in, out) layout is the transpose of the (out, in) one
    second = torch.zeros(out_features, in_features)
    second.view(-1)[torch.tensor([2, 3, 15, 33])] = torch.randn(4)
    gram2 = (lambda y: y.T @ y / 20)(torch.randn(20, in_features))
    results = []
    for layout_in_out in (False, True):
        parts = []
        for d in (logical, second):
            s = d.T.contiguous() if layout_in_out else d
            i = s.reshape(-1).nonzero().squeeze(1)
            parts.append((i, s.reshape(-1)[i]))
        shape = (in_features, out_features) if layout_in_out else (out_features, in_features)
        u, v = regmean_values(parts, [gram, gram2], shape, layout_in_out)
        dense = torch.zeros(shape).reshape(-1).index_put_((u,), v).reshape(shape)
        results.append(dense.T if layout_in_out else dense)
    torch.testing.assert_close(results[0], results[1])


def test_regmean_rows_of_every_width_equal_their_direct_solves():
    """Narrow rows are solved directly, wide ones through the complement of one shared inverse: both exact."""
    torch.manual_seed(0)
    out_features, in_features = 12, 10
    grams = [(lambda y: y.T @ y / 30)(torch.randn(30, in_features) * torch.logspace(0, -1, in_features))
             for _ in range(2)]  # fmt: skip
    parts = []
    for _ in range(2):
        mask = torch.zeros(out_features, in_features, dtype=torch.bool)
        for row in range(out_features):  # every width from 1 to all inputs, the full row included
            mask[row, torch.randperm(in_features)[: 1 + row % in_features]] = True
        indices = mask.reshape(-1).nonzero().squeeze(1)
        parts.append((indices, torch.randn(indices.numel())))
    union, values = regmean_values(parts, grams, (out_features, in_features), False)
    total = (grams[0] + grams[1]).double()
    total += 1e-6 * torch.diagonal(total).mean() * torch.eye(in_features, dtype=torch.float64)
    target = sum(
        torch.zeros(out_features * in_features, dtype=torch.float64).index_put_((i,), v.double()).view(
            out_features, in_features) @ g.double()
        for (i, v), g in zip(parts, grams, strict=True)
    )  # fmt: skip
    expected = torch.zeros(out_features * in_features, dtype=torch.float64)
    for row in range(out_features):
        support = union[union // in_features == row] % in_features
        expected[row * in_features + support] = torch.linalg.solve(total[support][:, support], target[row, support])
    assert {int(c) for c in torch.unique(union // in_features, return_counts=True)[1]} >= {1, in_features}
    torch.testing.assert_close(values.double(), expected[union], rtol=1e-5, atol=1e-6)


def test_regmean_errors():
    model = two_adapter_model()
    with pytest.raises(ValueError, match="needs inputs"):
        compose(model, ["default", "b"], new_adapter_name="x", method="regmean")
    with pytest.raises(ValueError, match="needs inputs"):
        compose(model, ["default", "b"], new_adapter_name="x", method="regmean", inputs={"default": _task_batches(0)})
    with pytest.raises(ValueError, match="regmean keeps every entry"):
        compose(model, ["default", "b"], new_adapter_name="x", method="regmean", density=0.5,
                inputs={"default": _task_batches(0), "b": _task_batches(1)})
    with pytest.raises(ValueError, match="used by method='regmean' only"):
        compose(model, ["default", "b"], new_adapter_name="x", method="ties", inputs={"b": _task_batches(1)})
    with pytest.raises(ValueError, match="regmean needs input Gram"):
        merge_deltas([_delta([0], [1.0])], [1.0], "regmean")
    assert "x" not in model.peft_config
