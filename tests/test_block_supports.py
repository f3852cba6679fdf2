"""Block-structured sparse deltas (``SparseDeltaConfig(block_size=B)``): entries chosen in aligned runs of B, every
selection scoring whole blocks, files storing one index per block, and the same contract as single entries."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from sparse_peft.triton_ops.torch_ops import aligned_run_ids

from sparse_peft import SparseDeltaConfig, SparseMask, select_masks
from sparse_peft.index_codec import decode_blocks, encode_blocks, encode_indices
from sparse_peft.indices import InvalidSparseIndicesError
from sparse_peft.masks import sparse_delta_layers
from sparse_peft.selection import select_from_changes
from tests.test_sparse_delta_core import INPUT, logits, tiny_llama

BLOCK = 16


def _blocks_of(indices: torch.Tensor, block_size: int = BLOCK) -> torch.Tensor:
    ids = aligned_run_ids(indices, block_size)
    assert ids is not None, "the support is not made of whole aligned blocks"
    return ids


def _model(**kwargs):
    budget = {} if "density" in kwargs else {"r": 2}
    config = {"target_modules": "all-linear", "block_size": BLOCK, "init_weights": False} | budget | kwargs
    return get_peft_model(tiny_llama(), SparseDeltaConfig(**config))


@pytest.mark.parametrize("bad", [0, -16, 2.0, True, "16"])
def test_block_size_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="`block_size` must be a positive integer"):
        SparseDeltaConfig(block_size=bad)


def test_dynamic_masks_refuse_blocks():
    with pytest.raises(ValueError, match="dynamic masks .* use `block_size=1`"):
        SparseDeltaConfig(block_size=16, reselect_every=10)


def test_a_block_larger_than_the_matrix_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"block_size=4096 is larger than a 32x32 matrix.*\(module .*q_proj"):
        _model(block_size=4096)


@pytest.mark.parametrize("budget", [{"r": 2}, {"density": 0.1}, {"density": 1e-6}])
def test_the_budget_is_whole_blocks_nearest_to_the_entries_asked(budget):
    model = _model(**budget)
    for layer in sparse_delta_layers(model).values():
        rows, cols = layer.storage_shape
        asked = budget["r"] * (rows + cols) if "r" in budget else max(1, round(budget["density"] * rows * cols))
        k = layer.support_values["default"].numel()
        assert k % BLOCK == 0 and k == BLOCK * max(1, round(asked / BLOCK))
        _blocks_of(layer.support_indices["default"])


def test_random_blocks_depend_on_the_seed_only():
    first, again, other = _model(seed=3), _model(seed=3), _model(seed=4)
    for name, layer in sparse_delta_layers(first).items():
        ids = _blocks_of(layer.support_indices["default"])
        assert torch.equal(ids, _blocks_of(sparse_delta_layers(again)[name].support_indices["default"]))
        assert not torch.equal(ids, _blocks_of(sparse_delta_layers(other)[name].support_indices["default"]))


def test_magnitude_takes_the_blocks_of_largest_summed_magnitude():
    model = _model(selection="magnitude")
    for layer in sparse_delta_layers(model).values():
        sums = layer.dense_weight().abs().reshape(-1, BLOCK).sum(1)
        k = layer.support_values["default"].numel() // BLOCK
        expected = torch.topk(sums, k).indices.sort().values
        assert torch.equal(_blocks_of(layer.support_indices["default"]), expected)


def _batches():
    return [{"input_ids": INPUT, "labels": INPUT}]


def test_gradient_selection_scores_whole_blocks_and_respects_an_excluded_support():
    model = _model(selection="gradient")
    select_masks(model, _batches())
    first = SparseMask.from_model(model)
    for layer in sparse_delta_layers(model).values():
        _blocks_of(layer.support_indices["default"])
    model.add_adapter("second", SparseDeltaConfig(target_modules="all-linear", r=2, block_size=BLOCK,
                                                  selection="gradient"))
    select_masks(model, _batches(), adapter_name="second", exclude=first)
    for name, layer in sparse_delta_layers(model, "second").items():
        second = layer.support_indices["second"].long()
        _blocks_of(second)
        assert not bool(torch.isin(second, first.supports[name].long()).any())


def test_changes_select_the_blocks_that_changed_most():
    model = _model()
    finetuned = copy.deepcopy(model.get_base_model())
    target = "model.layers.0.mlp.down_proj"
    with torch.no_grad():
        finetuned.get_submodule(target).weight.view(-1)[5 * BLOCK: 6 * BLOCK] += 10.0  # block 5 changes most
    select_from_changes(model, finetuned)
    assert 5 in _blocks_of(sparse_delta_layers(model)[target].support_indices["default"]).tolist()


def test_block_code_round_trip_and_fallback():
    ids = torch.tensor([0, 1, 7, 300, 100_000])
    indices = (ids[:, None] * BLOCK + torch.arange(BLOCK)).reshape(-1)
    assert torch.equal(_blocks_of(indices), ids)
    assert decode_blocks(encode_blocks(ids, BLOCK))[1] == BLOCK
    assert torch.equal(decode_blocks(encode_blocks(ids, BLOCK))[0], ids)
    assert aligned_run_ids(indices[1:], BLOCK) is None  # not whole blocks
    assert aligned_run_ids(indices + 1, BLOCK) is None  # not aligned
    assert encode_blocks(ids, BLOCK).numel() < encode_indices(indices).numel() / 8


@pytest.mark.parametrize(
    "sequence, message",
    [([], "empty|no block size"), ([1, 5], "no block size or no blocks"), ([16], "no block size or no blocks")],
)
def test_malformed_block_codes_raise(sequence, message):
    with pytest.raises(InvalidSparseIndicesError, match=message):
        decode_blocks(encode_indices(torch.tensor(sequence, dtype=torch.int64)), where="m")


def test_files_store_one_index_per_block_and_load_exactly(tmp_path):
    model = _model()
    expected = logits(model, INPUT)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    codes = [k for k in tensors if k.endswith("sparse_delta_block_codes")]
    assert codes and not [k for k in tensors if k.endswith(("sparse_delta_codes", "sparse_delta_indices"))]
    assert sum(tensors[k].numel() for k in codes) < sum(
        layer.support_values["default"].numel() for layer in sparse_delta_layers(model).values()
    ) / 8
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, INPUT), expected, rtol=0, atol=0)
    for name, layer in sparse_delta_layers(model).items():
        got = sparse_delta_layers(loaded)[name].support_indices["default"]
        assert torch.equal(got.long(), layer.support_indices["default"].long())


def test_a_block_outside_the_weight_is_refused_and_nothing_stays_wrapped(tmp_path):
    _model().save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("sparse_delta_block_codes"))
    values = tensors[key.replace("block_codes", "values")]
    tensors[key] = encode_blocks(torch.arange(values.numel() // BLOCK).add(10**6), BLOCK)  # far past the end
    save_file(tensors, path)
    base = tiny_llama()
    with pytest.raises(InvalidSparseIndicesError, match="out of range|outside"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any("sparse_delta" in n for n, _ in base.named_modules())


def _saved_block_file(tmp_path):
    _model().save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    return path, tensors, next(k for k in tensors if k.endswith("sparse_delta_block_codes"))


def test_a_damaged_block_code_fails_its_checksum(tmp_path):
    path, tensors, key = _saved_block_file(tmp_path)
    ids, size = decode_blocks(tensors[key])
    moved = ids.clone()
    gap = int(torch.nonzero(ids[1:] - ids[:-1] > 1)[0])
    moved[gap] += 1  # still sorted, unique and in range: only the checksum can tell
    tensors[key] = encode_blocks(moved, size)
    save_file(tensors, path)
    with pytest.raises(InvalidSparseIndicesError, match="indices do not match the checksum"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_blocks_and_values_must_agree_in_count(tmp_path):
    path, tensors, key = _saved_block_file(tmp_path)
    values_key = key.replace("block_codes", "values")
    tensors[values_key] = tensors[values_key][:-1].clone()
    save_file(tensors, path)
    with pytest.raises(InvalidSparseIndicesError, match=r"blocks of 16 entries but \d+ values"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
