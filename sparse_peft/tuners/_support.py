"""Drawing and scoring a sparse support: the primitives the tuners (creation, loading) and the calibration drivers
(:mod:`sparse_peft.selection`, S2FT's calibration, dynamic masks) share. It imports no tuner, so every layer above
can use it without a cycle."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn


def module_seed(seed: int, module_key: str) -> int:
    """A per-module seed that does not depend on the order modules are visited in."""
    return (seed * 1_000_003 + zlib.crc32(module_key.encode())) % (2**63 - 1)


def random_indices(numel: int, k: int, seed: int) -> torch.Tensor:
    """k distinct sorted flat indices drawn uniformly, reproducible from ``seed``.

    For small k it draws with replacement and keeps a random k of the distinct draws (O(k log k)) instead of
    permuting all ``numel`` entries, which dominated adapter creation and loading time on large layers.
    """
    gen = torch.Generator().manual_seed(seed)
    if 4 * k > numel:
        return torch.randperm(numel, generator=gen)[:k].sort().values
    draws = torch.zeros(0, dtype=torch.long)
    while draws.numel() < k:
        draws = torch.unique(torch.cat([draws, torch.randint(0, numel, (k + k // 4 + 16,), generator=gen)]))
    return draws[torch.randperm(draws.numel(), generator=gen)[:k]].sort().values


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat indices of the k largest scores (ties broken by position, so the choice is deterministic)."""
    flat = scores.reshape(-1).float()
    return torch.topk(flat, k, sorted=False).indices.sort().values


def initial_indices(layer: Any, k: int, selection: str, seed: int) -> torch.Tensor:
    """Indices chosen at creation time for a sparse-delta layer. Data-driven selections (``gradient``, ``snip``)
    start on the first k entries, a placeholder that costs nothing to make: calibration replaces it, and training
    refuses to start before (values are zero, so the placeholder never changes an output)."""
    if selection == "magnitude":
        return top_k_indices(layer.dense_weight().abs(), k).cpu()
    if selection in ("gradient", "snip"):
        return torch.arange(k)
    return random_indices(layer.numel, k, seed)


def batch_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, list | tuple):
        out = model(*batch)
    else:
        out = model(batch)
    loss = out["loss"] if isinstance(out, Mapping) and "loss" in out else getattr(out, "loss", out)
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            "select_masks: the model output has no `loss`; pass `loss_fn=` or batches with labels."
        )
    return loss if loss.dim() == 0 else loss.sum()


def dense_grad_hooks(layer: nn.Module, consume: Callable[[torch.Tensor], None]) -> list[Any]:
    """Hooks that hand each backward's dense ``dL/dW`` (storage layout, fp32) of ``layer`` to ``consume``.

    The gradient is formed from the saved layer input and the output gradient, passed on and dropped at once,
    so only one layer's dense gradient exists at a time. Returns the handles to remove.
    """

    def on_forward(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return
        layer_input = args[0].detach()

        def on_grad(grad: torch.Tensor) -> None:
            x = layer_input.reshape(-1, layer.in_features).float()
            dy = grad.reshape(-1, layer.out_features).float()
            consume(x.t() @ dy if layer.fan_in_fan_out else dy.t() @ x)

        output.register_hook(on_grad)

    return [layer.register_forward_hook(on_forward)]
