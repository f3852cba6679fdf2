"""Group-sparse LoRA tuner layer: LoRA factors with a block-soft-threshold step on groups."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...proximal import block_soft_threshold_, group_norms
from .._lowrank import SparseLowRankLayer
from .config import GroupSparseLoraConfig


class GroupSparseLoraLayer(SparseLowRankLayer):
    """``y = base(x) + s·B·A·x`` whose groups (ranks, output rows, input columns or the module) shrink to exactly 0."""

    prefix = "group_sparse_lora_"
    a_name = "group_sparse_lora_A"
    b_name = "group_sparse_lora_B"
    dropout_name = "group_sparse_lora_dropout"
    adapter_layer_names = ("group_sparse_lora_A", "group_sparse_lora_B")
    other_param_names = (
        "r",
        "lora_alpha",
        "scaling",
        "group_sparse_lora_dropout",
        "sparse_schedule",
        "group_by",
    )
    extra_dict_names = ("group_by",)
    sparsity_unit = "groups"

    def update_layer(self, adapter_name: str, config: GroupSparseLoraConfig, **kwargs: Any) -> None:  # type: ignore[override]
        self.group_by[adapter_name] = config.group_by
        super().update_layer(adapter_name, config, **kwargs)

    def groups(self, adapter_name: str) -> tuple[list[tuple[torch.Tensor, int | None]], int]:
        """The group layout for :func:`~sparse_peft.proximal.block_soft_threshold_` and the size |g| of one group."""
        a, b = self.weight_A(adapter_name), self.weight_B(adapter_name)
        r = self.r[adapter_name]
        by = self.group_by[adapter_name]
        if by == "rank":  # A is (r, in): rank i is row i of A and column i of B
            return [(a, 0), (b, 1)], self.in_features + self.out_features
        if by == "row":  # output channel j: row j of B
            return [(b, 0)], r
        if by == "column":  # input channel k: column k of A
            return [(a, 1)], r
        return [(a, None), (b, None)], r * (self.in_features + self.out_features)

    def proximal_step(self, adapter_name: str, lr: float, lam: float) -> None:
        parts, size = self.groups(adapter_name)
        block_soft_threshold_(parts, lr * lam * math.sqrt(size))

    def penalized_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return [self.weight_A(adapter_name), self.weight_B(adapter_name)]

    def sparsity(self, adapter_name: str) -> tuple[int, int]:
        norms = group_norms(self.groups(adapter_name)[0])
        return int((norms > 0).sum()), int(norms.numel())


class Linear(GroupSparseLoraLayer):
    """The module that wraps ``nn.Linear``, ``Conv1D`` and quantized linear layers."""
