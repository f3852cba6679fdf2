"""Drawing and scoring a sparse support: the primitives the tuners (creation, loading) and the calibration drivers
(:mod:`sparse_peft.selection`, S2FT's calibration, dynamic masks) share. It imports no tuner, so every layer above
can use it without a cycle."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..indices import expand_blocks


def module_seed(seed: int, module_key: str) -> int:
    """A per-module seed that does not depend on the order modules are visited in."""
    return (seed * 1_000_003 + zlib.crc32(module_key.encode())) % (2**63 - 1)


def random_indices(numel: int, k: int, seed: int, block_size: int = 1) -> torch.Tensor:
    """k distinct sorted flat indices drawn uniformly, reproducible from ``seed``; with ``block_size`` > 1, k //
    block_size aligned blocks of consecutive entries (k a multiple of ``block_size``).

    For small k it draws with replacement and keeps a random k of the distinct draws (O(k log k)) instead of
    permuting all ``numel`` entries, which dominated adapter creation and loading time on large layers.
    """
    if block_size > 1:
        return expand_blocks(random_indices(numel // block_size, k // block_size, seed), block_size)
    gen = torch.Generator().manual_seed(seed)
    if 4 * k > numel:
        return torch.randperm(numel, generator=gen)[:k].sort().values
    draws = torch.zeros(0, dtype=torch.long)
    while draws.numel() < k:
        draws = torch.unique(torch.cat([draws, torch.randint(0, numel, (k + k // 4 + 16,), generator=gen)]))
    return draws[torch.randperm(draws.numel(), generator=gen)[:k]].sort().values


def top_k_indices(scores: torch.Tensor, k: int, block_size: int = 1) -> torch.Tensor:
    """Sorted flat indices of the k largest scores (ties broken by position, so the choice is deterministic).

    With ``block_size`` > 1: the k // block_size aligned blocks of largest summed score; a block holding a negative
    score (an excluded entry) ranks below every other."""
    flat = scores.reshape(-1).float()
    if block_size > 1:
        blocks = flat[: flat.numel() // block_size * block_size].view(-1, block_size)
        pooled = torch.where((blocks < 0).any(1), -1.0, blocks.sum(1))
        return expand_blocks(top_k_indices(pooled, k // block_size), block_size)
    return torch.topk(flat, k, sorted=False).indices.sort().values


def initial_indices(layer: Any, k: int, selection: str, seed: int, block_size: int = 1) -> torch.Tensor:
    """Indices chosen at creation time for a sparse-delta layer. Data-driven selections (``gradient``, ``snip``)
    start on the first k entries, a placeholder that costs nothing to make: calibration replaces it, and training
    refuses to start before (values are zero, so the placeholder never changes an output)."""
    if selection == "magnitude":
        return top_k_indices(layer.dense_weight().abs(), k, block_size).cpu()
    if selection in ("gradient", "snip"):
        return torch.arange(k)
    return random_indices(layer.numel, k, seed, block_size)


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
