"""Choosing which weight entries a sparse delta trains.

``random`` and ``magnitude`` are decided when the adapter is created. ``gradient`` (largest accumulated
``|dL/dW|``) and ``snip`` (largest ``|W * dL/dW|``) need data: :func:`select_masks` runs a few calibration
batches and re-selects every such adapter. The dense gradient of a layer is formed from the layer's input and
output gradient inside a hook, folded into that layer's score and freed at once; scores are kept only for
``layers_per_pass`` layers at a time (one extra dense matrix per layer in the pass), at the cost of one pass over
the batches per group.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from .masks import SparseMask, sparse_delta_layers
from .tuners._support import batch_loss, dense_grad_hooks, top_k_indices
from .tuners.s2ft.calibration import select_s2ft
from .tuners.s2ft.config import S2FTConfig
from .tuners.sparse_delta.layer import SparseDeltaLayer


def _excluding(score: torch.Tensor, exclude: SparseMask | None, name: str) -> torch.Tensor:
    """``score`` with the entries of ``exclude``'s support for module ``name`` ruled out (below every score)."""
    if exclude is None or name not in exclude.supports:
        return score
    flat = score.reshape(-1)
    flat[exclude.supports[name].to(flat.device)] = -1.0  # scores are >= 0
    return score


def _score_hooks(layer: SparseDeltaLayer, score: torch.Tensor, snip: bool) -> list[Any]:
    """Add ``|dL/dW|`` (or ``|W * dL/dW|``) of every batch into ``score``."""

    def consume(dense_grad: torch.Tensor) -> None:
        if snip:
            dense_grad = dense_grad * layer.dense_weight().float()
        score.add_(dense_grad.abs_())

    return dense_grad_hooks(layer, consume)


@torch.no_grad()
def _reselect(layer: SparseDeltaLayer, adapter_name: str, score: torch.Tensor, block_size: int = 1) -> None:
    k = layer.support_values[adapter_name].numel()
    indices = top_k_indices(score, k, block_size).to(score.device)
    if bool((score.reshape(-1)[indices] < 0).any()):
        raise ValueError(
            f"sparse_delta adapter '{adapter_name}': {k} entries asked but fewer are outside the excluded support."
        )
    layer.set_adapter_indices(adapter_name, indices)
    layer.needs_calibration[adapter_name] = False


def _block_size(model: nn.Module, adapter_name: str) -> int:
    return getattr(getattr(model, "peft_config", {}).get(adapter_name), "block_size", 1)


def select_masks(
    model: nn.Module,
    batches: Iterable[Any],
    adapter_name: str = "default",
    selection: str | None = None,
    layers_per_pass: int | None = None,
    loss_fn: Any = None,
    exclude: SparseMask | None = None,
) -> dict[str, int]:
    """Select the support of a data-driven sparse-delta adapter (``gradient``: largest accumulated ``|dL/dW|``;
    ``snip``: largest ``|W·dL/dW|``) from calibration batches; for an S2FT adapter choose whole heads/channels by
    ``activation`` or ``gradient`` scores instead. Values are reset to zero on the new support.

    Args:
        model (`nn.Module`): the PeftModel holding the adapter.
        batches (`Iterable`): model inputs (dicts with ``labels`` for causal LMs, or anything ``loss_fn(model, batch)``
            understands); iterated once per pass, so pass a list or a re-iterable loader.
        adapter_name (`str`, *optional*, defaults to `"default"`): the adapter to select for.
        selection (`str`, *optional*, defaults to `None`): overrides the config's selection (e.g. re-select a random
            adapter by gradient).
        layers_per_pass (`int`, *optional*, defaults to `None`): layers that keep a dense score at once (default:
            all); lower it to bound memory at the cost of more passes.
        loss_fn (`Callable`, *optional*, defaults to `None`): ``loss_fn(model, batch) -> loss`` for batches without
            labels.
        exclude (`SparseMask`, *optional*, defaults to `None`): a support the new one must not touch (e.g.
            ``SparseMask.from_model(model, "first_skill")``, so a second skill trains on disjoint entries).

    Returns:
        `dict[str, int]`: trainable entries per re-selected module.
    """
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if isinstance(config, S2FTConfig):  # structured: whole heads / channels per block
        if exclude is not None:
            raise ValueError("select_masks: exclude= applies to sparse_delta adapters, not S2FT.")
        return select_s2ft(model, batches, adapter_name, selection=selection, loss_fn=loss_fn)
    selection = selection or getattr(config, "selection", "gradient")
    if selection not in ("gradient", "snip"):
        raise ValueError(f"select_masks: selection must be 'gradient' or 'snip', got {selection!r}.")
    layers = sparse_delta_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"select_masks: the model has no sparse_delta adapter named {adapter_name!r}.")
    batches = list(batches) if not isinstance(batches, list | tuple) else batches
    if not batches:
        raise ValueError("select_masks: at least one calibration batch is needed.")
    loss_fn = loss_fn or batch_loss
    block_size = _block_size(model, adapter_name)
    names = list(layers)
    group = layers_per_pass or len(names)
    was_training = model.training
    model.train()
    grad_state = {n: p.requires_grad for n, p in model.named_parameters()}
    for layer in layers.values():
        layer.needs_calibration[adapter_name] = False  # scoring passes run the current placeholder support
        layer.support_values[adapter_name].requires_grad_(True)
    try:
        for start in range(0, len(names), group):
            chunk = names[start : start + group]
            scores = {
                n: torch.zeros(
                    layers[n].storage_shape, dtype=torch.float32, device=layers[n]._weight_device()
                )
                for n in chunk
            }
            with ExitStack() as stack:
                for n in chunk:
                    for handle in _score_hooks(layers[n], scores[n], snip=selection == "snip"):
                        stack.callback(handle.remove)
                for batch in batches:
                    loss = loss_fn(model, batch)
                    loss.backward()
            for n in chunk:
                _reselect(layers[n], adapter_name, _excluding(scores[n], exclude, n), block_size)
                del scores[n]
    finally:
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(grad_state.get(n, p.requires_grad))
        model.train(was_training)
    return {n: layers[n].support_values[adapter_name].numel() for n in names}


@torch.no_grad()
def select_from_changes(
    model: nn.Module, finetuned: nn.Module, adapter_name: str = "default", exclude: SparseMask | None = None
) -> dict[str, int]:
    """LT-SFT's mask selection: put each layer of ``adapter_name`` on the entries that a (short) full fine-tuning
    ``finetuned`` of the same base changed most (largest ``|W_ft - W_0|``), keeping the layer's budget; values reset
    to zero (LT-SFT then trains the sparse delta from the base). One layer's difference is dense at a time."""
    layers = sparse_delta_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"select_from_changes: the model has no sparse_delta adapter named {adapter_name!r}.")
    tuned = dict(finetuned.named_modules())
    for name, layer in layers.items():
        other = tuned.get(name)
        if other is None or not hasattr(other, "weight"):
            raise ValueError(f"select_from_changes: the fine-tuned model has no weight at {name!r}.")
        base = layer.get_base_layer().weight
        if other.weight.shape != base.shape:
            raise ValueError(f"select_from_changes: {name!r} is {tuple(other.weight.shape)} in the fine-tuned model "
                             f"but {tuple(base.shape)} here.")
        change = (other.weight.detach().float().to(base.device) - layer.dense_weight().float()).abs_()
        score = _excluding(change.reshape(layer.storage_shape), exclude, name)
        _reselect(layer, adapter_name, score, _block_size(model, adapter_name))
    return {n: layer.support_values[adapter_name].numel() for n, layer in layers.items()}
