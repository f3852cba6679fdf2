"""Tensors that FSDP2 may have sharded: the adapter values (and their optimizer state) become DTensors under
``fully_shard``. Code that reads or rewrites a whole adapter (reselection, loading a checkpoint into a live model)
goes through these two helpers, so it works on a plain tensor and on every rank's shard alike."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded DTensor is gathered (a collective: every rank must call), a plain one is itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def assign_in_place(target: torch.Tensor, source: torch.Tensor) -> None:
    """Write ``source`` (the whole tensor, plain or a DTensor laid out like ``target``) into ``target`` in place.
    A DTensor target keeps its sharding and takes its own shard; the object stays the same, so optimizers and FSDP
    keep referring to it."""
    if isinstance(target, DTensor) and not isinstance(source, DTensor):
        shard = distribute_tensor(source.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(shard.to_local())
    else:
        target.copy_(source)
