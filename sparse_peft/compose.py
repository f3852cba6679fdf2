"""Composing sparse adapters (LT-SFT): one adapter whose delta is the (weighted) sum of several.

The composed support is the union of the inputs' supports; where supports overlap the values are summed. The
result is an ordinary adapter of the inputs' type (SPARSE_DELTA, or S2FT on the union of the channels): it can be
saved, merged, switched to or trained further.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from peft import PeftModel

from .masks import sparse_delta_layers
from .tuners.s2ft import S2FTConfig, S2FTLinear
from .tuners.sparse_delta.config import SparseDeltaConfig


def compose(
    model: PeftModel,
    adapter_names: Sequence[str],
    weights: Sequence[float] | None = None,
    new_adapter_name: str = "composed",
) -> str:
    """Add ``new_adapter_name`` = Σ weights[i] · delta(adapter_names[i]) to ``model`` and return its name.

    Each input's current scaling is applied. The new adapter is added but not activated
    (``model.set_adapter(new_adapter_name)`` to use it).
    """
    names = list(adapter_names)
    if len(names) < 1:
        raise ValueError("compose: give at least one adapter name.")
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"compose: {len(names)} adapters but {len(weights)} weights.")
    if new_adapter_name in model.peft_config:
        raise ValueError(f"compose: an adapter named {new_adapter_name!r} already exists.")
    kinds = {type(model.peft_config.get(name)) for name in names}
    for name in names:
        config = model.peft_config.get(name)
        if not isinstance(config, SparseDeltaConfig | S2FTConfig):
            kind = type(config).__name__ if config is not None else "nothing"
            raise ValueError(
                f"compose: adapter {name!r} is {kind}; only SparseDeltaConfig and S2FTConfig adapters can be "
                "composed."
            )
    if len(kinds) > 1:
        raise ValueError("compose: adapters of one type only (a PeftModel holds one adapter type).")

    layers = {
        n: m for n, m in sparse_delta_layers(model).items() if any(a in m.sparse_delta_values for a in names)
    }
    config = copy.deepcopy(model.peft_config[names[0]])
    config.target_modules = sorted(layers)
    config.exclude_modules = None
    config.layers_to_transform = config.layers_pattern = None
    config.selection, config.init_weights = "random", True
    if isinstance(config, S2FTConfig):  # the union of column/row slices is again a slice
        config.channel_plan = {
            name: torch.unique(torch.cat([layer.channels(a) for a in names if a in layer.sparse_delta_values]))
            .tolist()
            for name, layer in layers.items()
        }
    config.inference_mode = True
    model.add_adapter(new_adapter_name, config)

    with torch.no_grad():
        for layer in layers.values():
            present = [(a, w) for a, w in zip(names, weights, strict=True) if a in layer.sparse_delta_values]
            indices = torch.cat([layer.sparse_delta_indices[a].long() for a, _ in present])
            values = torch.cat([layer.delta_values(a).detach().float() * w for a, w in present])
            union, inverse = torch.unique(indices, return_inverse=True)
            summed = torch.zeros(union.numel(), dtype=torch.float32, device=values.device)
            summed.index_add_(0, inverse, values)
            if isinstance(layer, S2FTLinear):
                channels = torch.unique(torch.cat([layer.channels(a) for a, _ in present]))
                layer.set_channels(new_adapter_name, channels, values=summed)
            else:
                layer.set_adapter_indices(new_adapter_name, union, values=summed)
            layer.needs_calibration[new_adapter_name] = False
    return new_adapter_name
