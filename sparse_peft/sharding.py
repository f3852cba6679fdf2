"""Parameters that a distributed engine manages: FSDP2 shards them (DTensors); DeepSpeed ZeRO-1/2 keeps their fp32
master copies, and the optimizer state, in flat partitions inside its optimizer.

Code that reads or rewrites a whole adapter between optimizer steps (a proximal step, a dynamic-mask reselection,
loading a checkpoint into a live model) goes through these helpers, so it works on a plain tensor, on every rank's
shard, and on a ZeRO master copy alike: an edit that only touched the model's copy would be overwritten by the
master copy at the next step."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

ZERO3_UNSUPPORTED = (
    "sparse_peft: proximal steps (SoRA, group-sparse LoRA, l1_lambda) and dynamic-mask reselection edit parameters "
    "between optimizer steps, which is not supported under DeepSpeed ZeRO-3 (it partitions the parameters "
    "themselves). Use ZeRO-1/2 or FSDP2; static sparse deltas and S2FT train under ZeRO-3."
)


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


def _zero_managed(param: torch.Tensor) -> bool:
    """A parameter of a DeepSpeed ZeRO-1/2 optimizer (its master copy lives in the optimizer's partitions)."""
    return hasattr(param, "_hp_mapping")


def check_editable(params: Sequence[nn.Parameter]) -> None:
    """Raise (:data:`ZERO3_UNSUPPORTED`) for parameters that DeepSpeed ZeRO-3 partitions."""
    if any(hasattr(p, "ds_id") for p in params):
        raise NotImplementedError(ZERO3_UNSUPPORTED)


@contextmanager
def editing(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Edit ``params`` in place inside this block. Under DeepSpeed ZeRO-1/2 each one holds its fp32 master value
    during the block (gathered: every rank must enter) and the edited value goes to the master copy and the
    model's copy after it; elsewhere nothing changes. ZeRO-3 is refused (:data:`ZERO3_UNSUPPORTED`)."""
    check_editable(params)
    managed = [p for p in params if _zero_managed(p)]
    if not managed:
        yield
        return
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    model_copies = []
    for param in managed:
        model_copies.append(param.data)
        param.data = safe_get_full_fp32_param(param)
    try:
        yield
        for param, model_copy in zip(managed, model_copies, strict=True):
            safe_set_full_fp32_param(param, param.data)
            model_copy.copy_(param.data)
    finally:
        for param, model_copy in zip(managed, model_copies, strict=True):
            param.data = model_copy


def _innermost(optimizer: Any) -> Any:
    """Through accelerate's and DeepSpeed's wrappers (each keeps the one it wraps as ``.optimizer``)."""
    seen = optimizer
    while getattr(seen, "optimizer", None) is not None and not hasattr(seen, "bit16_groups"):
        seen = seen.optimizer
    return seen


def groups_with_parameters(optimizer: Any) -> list[tuple[dict[str, Any], list[nn.Parameter]]]:
    """Each optimizer group with the model parameters it trains (a ZeRO-1/2 optimizer's groups hold flat partitions:
    the model parameters are its ``bit16_groups``)."""
    inner = _innermost(optimizer)
    if hasattr(inner, "bit16_groups"):
        return list(zip(inner.param_groups, inner.bit16_groups, strict=True))
    return [(group, list(group["params"])) for group in getattr(optimizer, "param_groups", [])]


def element_states(optimizer: Any, param: nn.Parameter) -> dict[str, torch.Tensor]:
    """The optimizer's per-element state of ``param`` (Adam's moments, ...), each as a whole tensor."""
    if optimizer is None:
        return {}
    if _zero_managed(param):
        from deepspeed.utils import safe_get_full_optimizer_state

        base = _innermost(optimizer).optimizer  # the torch optimizer on the flat partitions
        keys = sorted({k for s in base.state.values() for k, v in s.items() if torch.is_tensor(v) and v.dim() > 0})
        return {key: safe_get_full_optimizer_state(param, key) for key in keys}
    state = getattr(optimizer, "state", {}).get(param, {})
    return {k: full_tensor(v) for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == param.shape}


def set_element_state(optimizer: Any, param: nn.Parameter, key: str, value: torch.Tensor) -> None:
    """Write one per-element state tensor of ``param`` (see :func:`element_states`) in place."""
    if _zero_managed(param):
        from deepspeed.utils import safe_set_full_optimizer_state

        safe_set_full_optimizer_state(param, value, key)
    else:
        assign_in_place(optimizer.state[param][key], value)
