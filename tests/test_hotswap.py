"""The switch plan of :class:`AdapterSwitcher`: two index copies per weight, bit-identical to PEFT's own
``set_adapter`` + ``merge_adapter``, and consistent with every PEFT call made afterwards."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from sparse_peft import S2FTConfig, SoraConfig, SparseDeltaConfig
from sparse_peft.embedded.toy import tiny_llama
from sparse_peft.hotswap import BASE, AdapterSwitcher

CONFIGS = {
    "sparse_delta": lambda seed: SparseDeltaConfig(target_modules="all-linear", density=0.2, init_weights=False,
                                                   seed=seed),
    "sparse_delta_blocks": lambda seed: SparseDeltaConfig(target_modules="all-linear", density=0.2, block_size=16,
                                                          init_weights=False, seed=seed),
    "s2ft": lambda seed: S2FTConfig(r=4, init_weights=False, seed=seed),
    "sora": lambda seed: SoraConfig(target_modules="all-linear", r=4, init_weights=False),
}


def _model(kind: str, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(0), CONFIGS[kind](1), adapter_name="first")
    model.add_adapter("second", CONFIGS[kind](2))
    return model.to(dtype).eval()


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["sparse_delta", "sparse_delta_blocks", "s2ft"])
def test_the_plan_writes_exactly_what_peft_merge_writes(kind, dtype):
    reference, model = _model(kind, dtype), _model(kind, dtype)
    base = _weights(model)
    switcher = AdapterSwitcher(model)
    for name in ("first", "second", BASE, "second", "first"):
        switcher.activate(name)
        if name == BASE:
            reference.unmerge_adapter()
        else:
            if any(getattr(m, "merged", False) for m in reference.modules()):
                reference.unmerge_adapter()
            reference.set_adapter(name)
            reference.merge_adapter()
        expected, got = _weights(reference), _weights(model)
        assert all(torch.equal(got[n], expected[n]) for n in expected), name
    assert switcher._plans["first"] is not None  # the fast path ran
    run_writes = [w for e in switcher._plans["first"] for w in e.writes if w.target.dim() == 2]
    if kind != "sparse_delta":  # whole aligned runs (blocks; S2FT's head columns) are copied as rows of 16
        assert run_writes
    if kind == "sparse_delta_blocks":
        assert all(len(e.writes) == 1 for e in switcher._plans["first"])
    model.unmerge_adapter()  # PEFT's own unmerge after a planned switch restores the base bit for bit
    assert all(torch.equal(p, base[n]) for n, p in _weights(model).items())


def test_merge_and_unload_after_a_planned_switch_is_peft_s():
    model, reference = _model("sparse_delta"), _model("sparse_delta")
    AdapterSwitcher(model).activate("second")
    reference.set_adapter("second")
    merged, expected = model.merge_and_unload(), reference.merge_and_unload()
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), expected.state_dict().values(),
                                                  strict=True))


def test_a_trained_adapter_gets_a_new_plan():
    model = _model("sparse_delta")
    switcher = AdapterSwitcher(model)
    switcher.activate("first")
    switcher.activate(BASE)
    layer = next(m for m in model.modules() if hasattr(m, "support_values") and "first" in m.support_values)
    with torch.no_grad():
        layer.support_values["first"].add_(1.0)  # e.g. more training
    switcher.activate("first")
    reference = _model("sparse_delta")
    ref_layer = next(m for m in reference.modules() if hasattr(m, "support_values") and "first" in m.support_values)
    with torch.no_grad():
        ref_layer.support_values["first"].add_(1.0)
    reference.set_adapter("first")
    reference.merge_adapter()
    assert all(torch.equal(a, b) for a, b in zip(_weights(model).values(), _weights(reference).values(), strict=True))


def test_other_adapter_types_switch_through_peft():
    model = _model("sora")
    base = _weights(model)
    switcher = AdapterSwitcher(model)
    switcher.activate("first")
    assert switcher._plans["first"] is None  # no plan: PEFT's merge (dense B @ A)
    switcher.activate(BASE)
    for name, weight in _weights(model).items():
        torch.testing.assert_close(weight, base[name], atol=1e-6, rtol=0)
