"""Flat index conventions and validation for sparse deltas.

A sparse delta on a ``(R, C)`` weight is a 1-D tensor of sorted, unique, row-major flat indices in
``[0, R*C)`` plus one value per index. Indices are stored as int32 whenever ``R*C`` fits, int64 otherwise.
Everything that accepts indices from outside (adapter files, user masks) goes through :func:`validate_indices`
so a bad file gives an error naming the problem instead of an out-of-bounds write into the base weights.
"""

from __future__ import annotations

import torch

INT32_MAX = torch.iinfo(torch.int32).max


class InvalidSparseIndicesError(ValueError):
    """Indices or values of a sparse delta are malformed (range, order, duplicates, dtype, count)."""


def index_dtype(numel: int) -> torch.dtype:
    """Smallest index dtype that addresses ``numel`` entries."""
    return torch.int32 if numel - 1 <= INT32_MAX else torch.int64


def validate_indices(
    indices: torch.Tensor,
    numel: int,
    values: torch.Tensor | None = None,
    where: str = "sparse delta",
) -> torch.Tensor:
    """Check ``indices`` and return them in the canonical dtype for ``numel``; raise with a clear message if bad."""
    if not isinstance(indices, torch.Tensor):
        raise InvalidSparseIndicesError(f"{where}: indices must be a tensor, got {type(indices).__name__}.")
    if indices.dtype not in (torch.int32, torch.int64):
        raise InvalidSparseIndicesError(
            f"{where}: indices must be int32 or int64, got {indices.dtype} (a float or narrow integer index "
            "file is corrupt or was written by another tool)."
        )
    if indices.dim() != 1:
        raise InvalidSparseIndicesError(f"{where}: indices must be 1-D, got shape {tuple(indices.shape)}.")
    if values is not None:
        if not values.is_floating_point():
            raise InvalidSparseIndicesError(f"{where}: values must be floating point, got {values.dtype}.")
        if values.shape != indices.shape:
            raise InvalidSparseIndicesError(
                f"{where}: {indices.numel()} indices but values have shape {tuple(values.shape)}."
            )
    if indices.numel() > numel:
        raise InvalidSparseIndicesError(
            f"{where}: {indices.numel()} indices for a matrix of only {numel} entries."
        )
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= numel:
            raise InvalidSparseIndicesError(
                f"{where}: indices out of range: found [{lo}, {hi}] for a matrix of {numel} entries."
            )
        steps = indices[1:] - indices[:-1]
        if (steps == 0).any():
            raise InvalidSparseIndicesError(f"{where}: indices contain duplicates.")
        if (steps < 0).any():
            raise InvalidSparseIndicesError(f"{where}: indices are not sorted in increasing order.")
    return indices.to(index_dtype(numel))


def rows_cols(indices: torch.Tensor, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each flat index (int64)."""
    idx = indices.long()
    return torch.div(idx, n_cols, rounding_mode="floor"), idx % n_cols
