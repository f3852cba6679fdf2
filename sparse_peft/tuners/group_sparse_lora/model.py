"""Group-sparse LoRA tuner model."""

from __future__ import annotations

from .._lowrank import SparseLowRankModel
from .layer import GroupSparseLoraLayer, Linear


class GroupSparseLoraModel(SparseLowRankModel):
    """Wraps every targeted linear-like module in a :class:`GroupSparseLoraLayer`."""

    prefix: str = "group_sparse_lora_"
    tuner_layer_cls = GroupSparseLoraLayer
    linear_cls = Linear
