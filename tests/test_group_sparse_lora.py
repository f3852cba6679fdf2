"""GROUP_SPARSE_LORA: PEFT's generic tuner tests, the contract on tiny models, and the group-lasso proximal step."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from contract import TunerCase, TunerContract, tuner_config
from lowrank_contract import INPUT_IDS, check_bnb, layers, tiny_llama
from peft import get_peft_model
from peft_upstream import retarget_custom_models

import sparse_peft  # noqa: F401  (registers GROUP_SPARSE_LORA)
from sparse_peft import GroupSparseLoraConfig
from sparse_peft.proximal import apply_proximal_step, param_groups, sparsity_report

TEST_CASES = [
    ("GS-LoRA MLP rank", "MLP", GroupSparseLoraConfig, {"target_modules": ["lin0"], "r": 4}),
    ("GS-LoRA MLP row", "MLP", GroupSparseLoraConfig, {"target_modules": ["lin0", "lin1"], "group_by": "row"}),
    ("GS-LoRA MLP column modules_to_save", "MLP", GroupSparseLoraConfig,
     {"target_modules": ["lin0"], "group_by": "column", "modules_to_save": ["lin1"]}),
    ("GS-LoRA EmbConv1D module", "EmbConv1D", GroupSparseLoraConfig, {"target_modules": ["conv1d"], "group_by": "module"}),
]
MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    ("GS-LoRA same", "group_sparse_lora", GroupSparseLoraConfig,
     {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin0"], "init_weights": False}),
    ("GS-LoRA different", "group_sparse_lora", GroupSparseLoraConfig,
     {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin1"], "init_weights": False, "r": 2}),
]
TestGroupSparseLoraCustomModels, TestGroupSparseLoraMultipleActiveAdapters = retarget_custom_models(
    "GroupSparseLora", GroupSparseLoraConfig, TEST_CASES, MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES, GroupSparseLoraConfig(target_modules=["lin0"], init_weights=False)
)


# ------------------------------------------------------------------------------------------ tiny transformers models
class TestGroupSparseLoraContract(TunerContract):
    cases = [  # LoRA-style merge (W ± ΔW in the weight dtype): exact_unmerge=False
        TunerCase("rank-groups", partial(tuner_config, GroupSparseLoraConfig, r=4)),
        TunerCase("row-groups-attention", partial(tuner_config, GroupSparseLoraConfig, attention_only=True,
                                                  group_by="row")),
    ]


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_bases(bits, tmp_path):
    check_bnb(GroupSparseLoraConfig, bits, tmp_path)


# ------------------------------------------------------------------------------------------ block soft-threshold
def _layer(group_by: str, lam: float = 1.0):
    config = GroupSparseLoraConfig(target_modules=["q_proj"], layers_to_transform=[0], r=4, group_by=group_by,
                                   sparse_lambda=lam, init_weights=False)
    model = get_peft_model(tiny_llama(0), config)
    (layer,) = layers(model)
    return model, layer


# group_by -> (per-group norm before the step, group size, how to read one group back from (A, B))
def _norms(layer, group_by):
    a, b = layer.weight_A("default").detach(), layer.weight_B("default").detach()
    if group_by == "rank":
        return (a.pow(2).sum(1) + b.pow(2).sum(0)).sqrt()
    if group_by == "row":
        return b.norm(dim=1)
    if group_by == "column":
        return a.norm(dim=0)
    return torch.cat([a.flatten(), b.flatten()]).norm().reshape(1)


@pytest.mark.parametrize("group_by", ["rank", "row", "column", "module"])
def test_block_soft_threshold_zeroes_small_groups_and_shrinks_the_rest_by_the_threshold(group_by):
    model, layer = _layer(group_by)
    _, size = layer.groups("default")
    before = _norms(layer, group_by)
    a0, b0 = layer.weight_A("default").detach().clone(), layer.weight_B("default").detach().clone()
    threshold = float(before.median()) if before.numel() > 1 else float(before[0]) / 2
    lr = threshold / math.sqrt(size)  # so that lr·λ·√|g| = threshold with λ = 1
    apply_proximal_step(model, lr=lr)
    after = _norms(layer, group_by)
    dead = before <= threshold
    assert torch.equal(after[dead], torch.zeros(int(dead.sum())))
    torch.testing.assert_close(after[~dead], before[~dead] - threshold, atol=1e-5, rtol=0)
    # each group only shrinks (same direction), and parameters outside the groups are left alone
    a1, b1 = layer.weight_A("default").detach(), layer.weight_B("default").detach()
    if group_by == "row":
        assert torch.equal(a1, a0)
    if group_by == "column":
        assert torch.equal(b1, b0)
    cos = torch.nn.functional.cosine_similarity(torch.cat([a1.flatten(), b1.flatten()]), torch.cat([a0.flatten(), b0.flatten()]), dim=0)
    assert cos > 0
    active, total = sparsity_report(model)["model.layers.0.self_attn.q_proj"]
    assert (active, total) == (int((~dead).sum()), before.numel())


def test_group_lasso_in_a_custom_loop_prunes_ranks():
    config = GroupSparseLoraConfig(target_modules=["q_proj", "v_proj"], r=4, sparse_lambda=2.0)
    model = get_peft_model(tiny_llama(0), config)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=0.0), lr=0.02)
    for step in range(15):
        model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        apply_proximal_step(model, lr=optimizer.param_groups[0]["lr"], step=step)
    report = sparsity_report(model)
    assert sum(a for a, _ in report.values()) < sum(t for _, t in report.values())
    for layer in layers(model):  # a pruned rank is an exactly-zero row of A and column of B
        dead = layer.weight_A("default").detach().abs().sum(1) == 0
        assert torch.equal(dead, layer.weight_B("default").detach().abs().sum(0) == 0)


def test_config_validation():
    with pytest.raises(ValueError, match="group_by"):
        GroupSparseLoraConfig(group_by="head")
    with pytest.raises(ValueError, match="lambda_max"):
        GroupSparseLoraConfig(lambda_schedule="linear", lambda_num_stages=3)
