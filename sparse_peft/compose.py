"""Composing sparse adapters: one adapter whose delta combines several (LT-SFT's composition, TIES, DARE).

The inputs are sparse deltas on the same base. ``sum`` adds them (LT-SFT; where supports overlap the values add).
The others follow the model-merging literature, applied to sparse deltas entry by entry:

- ``magnitude_prune``: keep each delta's largest-|value| ``density`` fraction of its *own entries* (a dense task
  vector is trimmed against the whole matrix; a sparse delta is already a top-k of the matrix, so the trim is
  relative to its support), then sum.
- ``ties`` (Yadav et al. 2023, "TIES-Merging", arXiv 2306.01708): trim as above, elect a sign per entry from the
  sum of the trimmed values, and average the values that agree with it ("disjoint mean"): entries changed by one
  adapter keep their value, entries changed by several do not add up.
- ``dare_linear`` / ``dare_ties`` (Yu et al. 2024, "Language Models are Super Mario", arXiv 2311.03099): drop each
  entry with probability ``1 - density`` and rescale the rest by ``1 / density``, then sum / TIES-merge.

Names and semantics follow PEFT's ``LoraModel.add_weighted_adapter(combination_type=...)`` (``weights`` scale each
delta before the merge; ``majority_sign_method="total"``). On the real base model, two and three skill adapters
composed by ``sum`` lose the later skills and ``ties`` keeps them; see docs/benchmarks.md, "Composition".

The result is an ordinary adapter of the inputs' type (SPARSE_DELTA, or S2FT on the union of the channels, with
trimmed entries at zero): it can be saved, merged, switched to or trained further.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
from peft import PeftModel

from .masks import sparse_delta_layers
from .tuners.s2ft import S2FTConfig, S2FTLinear
from .tuners.sparse_delta.config import SparseDeltaConfig

CompositionMethod = Literal["sum", "magnitude_prune", "ties", "dare_linear", "dare_ties"]
METHODS: tuple[str, ...] = ("sum", "magnitude_prune", "ties", "dare_linear", "dare_ties")
DEFAULT_TIES_DENSITY = 0.2
"""The density the trimming methods use when none is given: TIES-merging's default (keep 20%), and the best for two
skill adapters on the validation split of the real-model composition benchmark (benchmarks/composition.py; for
three, 0.1 was)."""


def merge_deltas(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor]],
    weights: Sequence[float],
    method: CompositionMethod = "sum",
    density: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine sparse deltas ``(flat indices, values)`` of one matrix; returns the union of the supports (sorted,
    int64) and the combined value on each (0 where every input was trimmed or dropped)."""
    kept = []
    for (indices, values), weight in zip(parts, weights, strict=True):
        indices, values = indices.long(), values.float()
        if method in ("magnitude_prune", "ties") and density < 1.0 and values.numel():
            keep = values.abs().topk(max(1, round(density * values.numel()))).indices
            mask = torch.zeros_like(values, dtype=torch.bool)
            mask[keep] = True
            values = values * mask
        elif method in ("dare_linear", "dare_ties") and density < 1.0:
            mask = torch.rand(values.shape, generator=generator, device="cpu").to(values.device) < density
            values = values * mask / density
        kept.append((indices, values * weight))
    union, inverse = torch.unique(torch.cat([i for i, _ in kept]), return_inverse=True)
    values = torch.cat([v for _, v in kept])
    total = torch.zeros(union.numel(), dtype=torch.float32, device=values.device).index_add_(0, inverse, values)
    if method not in ("ties", "dare_ties"):
        return union, total
    agree = (torch.sign(values) == torch.sign(total)[inverse]) & (values != 0)
    summed = torch.zeros_like(total).index_add_(0, inverse, values * agree)
    count = torch.zeros_like(total).index_add_(0, inverse, agree.float())
    return union, summed / count.clamp(min=1.0)


def compose(
    model: PeftModel,
    adapter_names: Sequence[str],
    weights: Sequence[float] | None = None,
    new_adapter_name: str = "composed",
    method: CompositionMethod = "sum",
    density: float | None = None,
    seed: int = 0,
) -> str:
    """Add ``new_adapter_name``, the combination of ``adapter_names``' deltas by ``method`` (see the module
    docstring), to ``model`` and return its name. The new adapter is added but not activated.

    Args:
        model (`PeftModel`): holds the adapters, all SPARSE_DELTA or all S2FT.
        adapter_names (`Sequence[str]`): the adapters to combine.
        weights (`Sequence[float]`, *optional*, defaults to `None`):
            A factor per delta (default 1; each input's own scaling is applied too).
        new_adapter_name (`str`, *optional*, defaults to `"composed"`): name of the result; must be new.
        method (`str`, *optional*, defaults to `"sum"`):
            ``sum``, ``magnitude_prune``, ``ties``, ``dare_linear`` or ``dare_ties``.
        density (`float`, *optional*, defaults to `None`):
            Fraction of each delta's entries that ``magnitude_prune`` / ``ties`` keep and ``dare_*`` keep in
            expectation; ``None``: :data:`DEFAULT_TIES_DENSITY` for those, 1.0 for ``sum``.
        seed (`int`, *optional*, defaults to `0`): seeds DARE's random drop.

    Example:

    ```py
    >>> from sparse_peft import compose
    >>> compose(model, ["reverse", "date"], method="ties", density=0.2, new_adapter_name="both")
    >>> model.set_adapter("both")
    ```
    """
    names = list(adapter_names)
    if len(names) < 1:
        raise ValueError("compose: give at least one adapter name.")
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"compose: {len(names)} adapters but {len(weights)} weights.")
    if method not in METHODS:
        raise ValueError(f"compose: method must be one of {METHODS}, got {method!r}.")
    if density is None:
        density = 1.0 if method == "sum" else DEFAULT_TIES_DENSITY
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"compose: density must be in (0, 1], got {density!r}.")
    if method == "sum" and density != 1.0:
        raise ValueError("compose: density applies to magnitude_prune, ties and dare_*; sum keeps every entry.")
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
        n: m for n, m in sorted(sparse_delta_layers(model).items()) if any(a in m.support_values for a in names)
    }
    config = copy.deepcopy(model.peft_config[names[0]])
    config.target_modules = sorted(layers)
    config.exclude_modules = None
    config.layers_to_transform = config.layers_pattern = None
    config.selection, config.init_weights = "random", True
    if isinstance(config, S2FTConfig):  # the union of column/row slices is again a slice
        config.channel_plan = {
            name: torch.unique(torch.cat([layer.channels(a) for a in names if a in layer.support_values]))
            .tolist()
            for name, layer in layers.items()
        }
    config.inference_mode = True
    model.add_adapter(new_adapter_name, config)

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():  # sorted by name: DARE's draws do not depend on module order
            present = [(a, w) for a, w in zip(names, weights, strict=True) if a in layer.support_values]
            parts = [(layer.support_indices[a], layer.delta_values(a).detach()) for a, _ in present]
            union, merged = merge_deltas(parts, [w for _, w in present], method, float(density), generator)
            if isinstance(layer, S2FTLinear):  # the union of slices is a slice: keep it whole, trimmed entries at 0
                channels = torch.unique(torch.cat([layer.channels(a) for a, _ in present]))
                layer.set_channels(new_adapter_name, channels, values=merged)
            else:
                if method != "sum":  # trimmed or dropped entries leave the support
                    union, merged = union[merged != 0], merged[merged != 0]
                layer.set_adapter_indices(new_adapter_name, union, values=merged)
            layer.needs_calibration[new_adapter_name] = False
    return new_adapter_name
