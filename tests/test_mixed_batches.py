"""Mixed-adapter batches with PEFT's own interface (``adapter_names=[...]`` in forward and ``generate``) for every
adapter type: each row gets exactly its own adapter's output, ``"__base__"`` rows the base model's."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import sparse_peft
from sparse_peft.embedded.toy import tiny_llama

VOCAB = 64


def _configs(seed: int) -> dict:
    return {
        "sparse_delta_fused": sparse_peft.SparseDeltaConfig(target_modules="all-linear", density=0.2,
                                                            init_weights=False, seed=seed),
        "sparse_delta_separate": sparse_peft.SparseDeltaConfig(target_modules="all-linear", density=0.2,
                                                               init_weights=False, seed=seed, fused=False),
        "s2ft": sparse_peft.S2FTConfig(r=4, init_weights=False, seed=seed),
        "sora": sparse_peft.SoraConfig(target_modules="all-linear", r=4, init_weights=False),
        "group_sparse_lora": sparse_peft.GroupSparseLoraConfig(target_modules="all-linear", r=4, init_weights=False),
    }


def _model(kind: str, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(0), _configs(1)[kind], adapter_name="one")
    torch.manual_seed(1)
    model.add_adapter("two", _configs(2)[kind])
    return model.to(dtype).eval()


def _single(model, name: str, ids: torch.Tensor) -> torch.Tensor:
    """The one-adapter path for one row: the reference a mixed batch must reproduce."""
    if name == "__base__":
        with model.disable_adapter():
            return model(ids).logits
    model.set_adapter(name)
    return model(ids).logits


KINDS = list(_configs(0))
NAMES = ["one", "__base__", "two", "one", "two"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_each_row_gets_its_own_adapter(kind, dtype):
    model = _model(kind, dtype)
    ids = torch.randint(0, VOCAB, (len(NAMES), 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mixed = model(ids, adapter_names=NAMES).logits
        expected = torch.cat([_single(model, name, ids[i : i + 1]) for i, name in enumerate(NAMES)])
        tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
        torch.testing.assert_close(mixed, expected, **tolerance)
        # the adapters differ, so a row run with another adapter would have failed the comparison
        assert not torch.allclose(expected[0], _single(model, "two", ids[:1])[0], atol=1e-3)


@pytest.mark.parametrize("kind", ["sparse_delta_fused", "s2ft", "sora"])
def test_generate_with_kv_cache_matches_one_adapter_at_a_time(kind):
    model = _model(kind)
    names = ["two", "one", "__base__"]
    prompts = torch.randint(0, VOCAB, (len(names), 5), generator=torch.Generator().manual_seed(4))
    settings = {"max_new_tokens": 6, "do_sample": False, "use_cache": True, "pad_token_id": 0}
    with torch.no_grad():
        mixed = model.generate(input_ids=prompts, adapter_names=names, **settings)
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model.generate(input_ids=prompts[i : i + 1], **settings)
            else:
                model.set_adapter(name)
                alone = model.generate(input_ids=prompts[i : i + 1], **settings)
            assert torch.equal(mixed[i : i + 1], alone), (name, mixed[i], alone[0])


def test_the_base_weights_are_untouched_and_active_adapter_kept():
    model = _model("sparse_delta_fused")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    model.set_adapter("two")
    ids = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(ids, adapter_names=["one", "two", "__base__"])
    assert model.active_adapter == "two"
    for name, param in model.named_parameters():
        if name in before:
            assert torch.equal(param, before[name]), name


@pytest.mark.parametrize("kind", ["sparse_delta_fused", "sora"])
def test_bad_adapter_names_are_refused_clearly(kind):
    model = _model(kind)
    ids = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match="non-existing adapter.*nope"):
        model(ids, adapter_names=["one", "nope"])
    with pytest.raises(ValueError, match="3 names for a batch of 2 rows"):
        model(ids, adapter_names=["one", "two", "one"])
    with pytest.raises(TypeError, match="one per row"):
        model(ids, adapter_names="one")
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(ids, adapter_names=["one", "two"])
    model.eval()
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        model(ids, adapter_names=["one", "two"])


def test_beam_search_expands_the_names_per_beam():
    model = _model("sparse_delta_separate")
    names = ["two", "__base__"]
    prompts = torch.randint(0, VOCAB, (len(names), 5), generator=torch.Generator().manual_seed(7))
    settings = {"max_new_tokens": 4, "do_sample": False, "num_beams": 2, "pad_token_id": 0}
    with torch.no_grad():
        mixed = model.generate(input_ids=prompts, adapter_names=names, **settings)
        model.set_adapter("two")
        first = model.generate(input_ids=prompts[:1], **settings)
        with model.disable_adapter():
            second = model.generate(input_ids=prompts[1:], **settings)
    assert torch.equal(mixed[:1], first) and torch.equal(mixed[1:], second)
