"""PEFT's mixed-adapter batches for every sparse_peft tuner: ``model(**inputs, adapter_names=[...])`` and
``model.generate(..., adapter_names=[...])``, one adapter name per row (``"__base__"``: no adapter), as PEFT's LoRA.

The tuner validates the names and injects them into each adapter layer's forward (PEFT's own hook mechanism, so
``PeftModel.forward`` / ``generate`` route them unchanged). A layer computes the base product once for the whole batch
and then each adapter's own output on that adapter's rows only: the cost grows with the rows per adapter, not with
the number of adapters, and a row never sees another row's adapter. Inference only (PEFT's rule): merged adapters
and training mode are refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

BASE = "__base__"


def _inject(module: nn.Module, args: tuple, kwargs: dict, adapter_names: Sequence[str]) -> tuple[tuple, dict]:
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


@contextmanager
def adapter_names_hooks(tuner: nn.Module, layer_type: type, known: set[str], **kwargs: Any) -> Iterator[None]:
    """While active, every ``layer_type`` layer (and ``modules_to_save`` wrapper) of ``tuner.model`` receives the
    ``adapter_names`` of ``kwargs``; a no-op without them. ``known``: the adapters the layers hold."""
    adapter_names = kwargs.get("adapter_names")
    if adapter_names is None:
        yield
        return
    if tuner.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError(f"adapter_names must be a list of adapter names, one per row, got {type(adapter_names)}.")
    unknown = {name for name in adapter_names if name != BASE} - known
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
    beams = kwargs.get("num_beams")
    if isinstance(beams, int) and beams > 1:  # generate repeats every row num_beams times
        adapter_names = [name for name in adapter_names for _ in range(beams)]
    handles = [
        module.register_forward_pre_hook(partial(_inject, adapter_names=list(adapter_names)), with_kwargs=True)
        for module in tuner.model.modules()
        if isinstance(module, layer_type | AuxiliaryTrainingWrapper)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def mixed_batch_forward(layer: Any, x: torch.Tensor, adapter_names: Sequence[str], *args: Any, **kwargs: Any) -> Any:
    """``base(x)`` for every row plus, on each adapter's rows only, that adapter's own output
    (``layer.adapter_output(name, rows_of_x)``)."""
    if len(adapter_names) != x.shape[0]:
        raise ValueError(f"adapter_names has {len(adapter_names)} names for a batch of {x.shape[0]} rows.")
    if layer.merged:
        raise ValueError("Cannot pass `adapter_names` while adapters are merged; unmerge them first.")
    result = layer.base_layer(x, *args, **kwargs)
    if getattr(layer, "quantization_backend", None) is not None:
        result = layer.quantization_backend.maybe_clone_base_result(result)
    rows_of: dict[str, list[int]] = {}
    for row, name in enumerate(adapter_names):
        rows_of.setdefault(name, []).append(row)
    for name, rows in rows_of.items():
        if name == BASE or not layer.holds_adapter(name):
            continue
        index = torch.tensor(rows, device=x.device)
        result.index_add_(0, index, layer.adapter_output(name, x.index_select(0, index)).to(result.dtype))
    return result
