"""The compact on-disk index code: exact round trips, size, and clear errors for malformed codes."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_sparse_delta_core import tiny_llama

from sparse_peft import SparseDeltaConfig
from sparse_peft.index_codec import decode_indices, encode_indices
from sparse_peft.indices import InvalidSparseIndicesError


@pytest.mark.parametrize(
    "indices",
    [
        torch.zeros(0, dtype=torch.int64),
        torch.tensor([0]),
        torch.tensor([5, 6, 7, 127, 128, 129, 16383, 16384, 2**31 - 1, 2**40]),
        torch.tensor([0, 2**62, 2**62 + 1, 2**62 + 2**21]),  # the longest gap (9 bytes) next to one-byte gaps
        torch.sort(torch.randperm(10**6, generator=torch.Generator().manual_seed(0))[:5000]).values,
    ],
)
def test_round_trip_is_exact(indices):
    code = encode_indices(indices)
    assert code.dtype == torch.uint8
    assert torch.equal(decode_indices(code), indices.long())


def test_code_is_small_at_lora_like_densities():
    gen = torch.Generator().manual_seed(0)
    for density, limit in ((0.04, 1.05), (0.01, 1.35)):
        k = int(density * 10**6)
        indices = torch.sort(torch.randperm(10**6, generator=gen)[:k]).values
        assert encode_indices(indices).numel() / k <= limit, density


@pytest.mark.parametrize("bad", [torch.tensor([3, 1]), torch.tensor([1, 1]), torch.tensor([-2, 4])])
def test_encode_refuses_unsorted_duplicated_negative(bad):
    with pytest.raises(InvalidSparseIndicesError, match="sorted, unique"):
        encode_indices(bad)


@pytest.mark.parametrize(
    "code,message",
    [
        (torch.tensor([5, 0x85], dtype=torch.uint8), "truncated"),
        (torch.tensor([5, 0], dtype=torch.uint8), "duplicates"),
        (torch.tensor([5, 0x80, 0x80, 0], dtype=torch.uint8), "duplicates"),  # a zero gap in three bytes
        (torch.tensor([0xFF] * 10 + [1], dtype=torch.uint8), "longer than 63 bits"),
        (torch.tensor([1, 2], dtype=torch.int32), "1-D uint8"),
        (torch.tensor([[1, 2]], dtype=torch.uint8), "1-D uint8"),
    ],
)
def test_malformed_codes_raise(code, message):
    with pytest.raises(InvalidSparseIndicesError, match=message):
        decode_indices(code, where="module 'x'")


def test_adapter_files_use_the_code_and_stay_loadable(tmp_path):
    model = get_peft_model(tiny_llama(), SparseDeltaConfig(target_modules=["q_proj"], density=0.1, init_weights=False))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    assert any(k.endswith("sparse_delta_codes") for k in tensors)
    assert not any(k.endswith("sparse_delta_indices") for k in tensors)
    x = torch.randint(0, 64, (1, 6))
    expected = model.eval()(x).logits
    assert torch.equal(PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()(x).logits, expected)
    # a truncated code names the module, and the base stays untouched
    key = next(k for k in tensors if k.endswith("sparse_delta_codes"))
    tensors[key] = torch.cat([tensors[key], torch.tensor([0x80], dtype=torch.uint8)])
    save_file(tensors, path)
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(InvalidSparseIndicesError, match="q_proj.*truncated"):
        PeftModel.from_pretrained(base, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items() if k in before)
