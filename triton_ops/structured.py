"""Structured (row/column slice) sparse deltas: the S2FT case of the sparse-delta core.

A slice selects whole rows (``axis=0``) or whole columns (``axis=1``) of a weight's *storage* layout
(``(out, in)`` for ``nn.Linear``, ``(in, out)`` for GPT-2 ``Conv1D``). Its sorted flat indices enumerate the
selected block row-major, so the same values/indices drive merge, unmerge, compose and the fused kernel, while
the gradient is a small dense matmul over the selected channels (partial backprop) instead of an SDDMM.
"""

from __future__ import annotations

import torch


def slice_flat_indices(storage_shape: tuple[int, int], axis: int, channels: torch.Tensor) -> torch.Tensor:
    """Sorted flat storage indices of the block that keeps ``channels`` along ``axis`` and everything else."""
    rows, cols = storage_shape
    channels = channels.long()
    if axis == 0:
        return (channels[:, None] * cols + torch.arange(cols, device=channels.device)[None, :]).reshape(-1)
    return (torch.arange(rows, device=channels.device)[:, None] * cols + channels[None, :]).reshape(-1)


def block_shape(storage_shape: tuple[int, int], axis: int, n_channels: int) -> tuple[int, int]:
    """Shape of the selected storage block (the values viewed row-major)."""
    rows, cols = storage_shape
    return (n_channels, cols) if axis == 0 else (rows, n_channels)


def input_side(axis: int, fan_in_fan_out: bool) -> bool:
    """Whether the slice selects input features (so only that slice of the layer input is needed)."""
    # Linear storage (out, in): columns are inputs; Conv1D storage (in, out): rows are inputs.
    return axis == (0 if fan_in_fan_out else 1)


def slice_values_grad(
    dy: torch.Tensor,
    x_saved: torch.Tensor,
    axis: int,
    channels: torch.Tensor,
    fan_in_fan_out: bool,
) -> torch.Tensor:
    """Flat gradient of the block's values from the output gradient and the saved (possibly sliced) input.

    ``x_saved`` is ``x[..., channels]`` when the slice is on the input side, else the whole input.
    Storage grad is ``A^T B`` with ``(A, B) = (dy, x)`` for Linear and ``(x, dy)`` for Conv1D; the selected side
    is restricted to ``channels``, so no dense ``dL/dW`` is ever formed.
    """
    dy2 = dy.reshape(-1, dy.shape[-1])
    x2 = x_saved.reshape(-1, x_saved.shape[-1])
    if not input_side(axis, fan_in_fan_out):
        dy2 = dy2[:, channels]
    a, b = (x2, dy2) if fan_in_fan_out else (dy2, x2)
    dtype = torch.promote_types(a.dtype, b.dtype)  # under autocast dy is half while the saved input may not be
    return (a.t().to(dtype) @ b.to(dtype)).reshape(-1)


def structured_delta_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    axis: int,
    channels: torch.Tensor,
    storage_shape: tuple[int, int],
    fan_in_fan_out: bool,
) -> torch.Tensor:
    """The delta's output alone, computed densely on the selected channels (separate path).

    Plain autograd already does partial backprop here: it keeps ``x[..., channels]`` (input-side slices) and the
    small block, and the values' gradient is the block-sized product.
    """
    block = values.view(block_shape(storage_shape, axis, channels.numel()))
    m = block if fan_in_fan_out else block.t()  # (in_sel, out_sel)
    if input_side(axis, fan_in_fan_out):
        return x[..., channels] @ m
    part = x @ m
    out_features = storage_shape[1] if fan_in_fan_out else storage_shape[0]
    result = part.new_zeros(*part.shape[:-1], out_features)
    return result.index_copy(-1, channels, part)
