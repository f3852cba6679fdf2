"""Flat index conventions and validation for sparse deltas.

A sparse delta on a ``(R, C)`` weight is a 1-D tensor of sorted, unique, row-major flat indices in
``[0, R*C)`` plus one value per index. Indices are stored as int32 whenever ``R*C`` fits, int64 otherwise.
Everything that accepts indices from outside (adapter files, user masks) goes through :func:`validate_indices`
so a bad file gives an error naming the problem instead of an out-of-bounds write into the base weights.
"""

from __future__ import annotations

import zlib

import torch

INT32_MAX = torch.iinfo(torch.int32).max


class InvalidSparseIndicesError(ValueError):
    """Indices or values of a sparse delta are malformed (range, order, duplicates, dtype, count)."""


class CorruptAdapterFileError(ValueError):
    """An adapter weights file could not be read (truncated, not safetensors, damaged header)."""


def index_dtype(numel: int) -> torch.dtype:
    """Smallest index dtype that addresses ``numel`` entries."""
    return torch.int32 if numel - 1 <= INT32_MAX else torch.int64


def validate_indices(
    indices: torch.Tensor,
    numel: int,
    values: torch.Tensor | None = None,
    where: str = "sparse delta",
    kind: str = "indices",
    unit: str = "entries",
) -> torch.Tensor:
    """Check ``indices`` and return them in the canonical dtype for ``numel``; raise with a clear message if bad.

    ``kind`` names them in the messages (S2FT validates its ``"channel ids"`` against the sliced axis with this
    same check), ``unit`` what ``numel`` counts (block-coded supports are checked as block ids)."""
    if not isinstance(indices, torch.Tensor):
        raise InvalidSparseIndicesError(f"{where}: {kind} must be a tensor, got {type(indices).__name__}.")
    if indices.dtype not in (torch.int32, torch.int64):
        raise InvalidSparseIndicesError(
            f"{where}: {kind} must be int32 or int64, got {indices.dtype} (a float or narrow integer index "
            "file is corrupt or was written by another tool)."
        )
    if indices.dim() != 1:
        raise InvalidSparseIndicesError(f"{where}: {kind} must be 1-D, got shape {tuple(indices.shape)}.")
    if values is not None:
        if not values.is_floating_point():
            raise InvalidSparseIndicesError(f"{where}: values must be floating point, got {values.dtype}.")
        if values.shape != indices.shape:
            raise InvalidSparseIndicesError(
                f"{where}: {indices.numel()} {kind} but values have shape {tuple(values.shape)}."
            )
    if indices.numel() > numel:
        raise InvalidSparseIndicesError(
            f"{where}: {indices.numel()} {kind} for a matrix of only {numel} {unit}."
        )
    if indices.numel():
        increasing = bool((indices[1:] > indices[:-1]).all())  # then the ends are the extremes: no min/max passes
        lo, hi = (int(indices[0]), int(indices[-1])) if increasing else (int(indices.min()), int(indices.max()))
        if lo < 0 or hi >= numel:
            raise InvalidSparseIndicesError(
                f"{where}: {kind} out of range: found [{lo}, {hi}] for a matrix of {numel} {unit}."
            )
        if not increasing:
            if (indices[1:] == indices[:-1]).any():
                raise InvalidSparseIndicesError(f"{where}: {kind} contain duplicates.")
            raise InvalidSparseIndicesError(f"{where}: {kind} are not sorted in increasing order.")
    return indices.to(index_dtype(numel))


def expand_blocks(block_ids: torch.Tensor, block_size: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Flat indices (of ``dtype``) of the aligned blocks ``[b * block_size, (b + 1) * block_size)`` for sorted
    ``block_ids``."""
    offsets = torch.arange(block_size, device=block_ids.device, dtype=dtype)
    return (block_ids.to(dtype)[:, None] * block_size + offsets).reshape(-1)


def rows_cols(indices: torch.Tensor, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each flat index (int64)."""
    idx = indices.long()
    return torch.div(idx, n_cols, rounding_mode="floor"), idx % n_cols


def tensor_crc32(tensor: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes (any dtype, bf16 included): the integrity check of saved adapters."""
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return zlib.crc32(data)  # reads the buffer in place (a ``tobytes()`` copy cost 20x the checksum)


def integrity_header(shape: tuple[int, int], indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """What an adapter file records per module next to its indices: the weight's storage shape the indices address
    and CRC-32s of the indices (as int64) and of the values, so a file made for another matrix size, or damaged
    after it was written, is refused instead of loading at wrong positions."""
    return torch.tensor(
        [shape[0], shape[1], tensor_crc32(indices.to(torch.int64)), tensor_crc32(values)], dtype=torch.int64
    )


def check_header_shape(header: torch.Tensor, shape: tuple[int, int] | None, where: str) -> tuple[int, int]:
    """Raise unless ``header`` (from :func:`integrity_header`) is well-formed and was made for a weight of ``shape``
    (checked before the indices, so an adapter for another model size is named as such). Returns the shape the
    indices address: ``shape``, or the header's own when ``shape`` is None (a file checked on its own)."""
    if not isinstance(header, torch.Tensor) or header.dtype != torch.int64 or header.shape != (4,):
        raise InvalidSparseIndicesError(f"{where}: the integrity header is malformed (the file is damaged).")
    rows, cols = int(header[0]), int(header[1])
    if shape is None:
        return rows, cols
    if (rows, cols) != tuple(shape):
        raise InvalidSparseIndicesError(
            f"{where}: the adapter was made for a {rows}x{cols} weight but this model's weight is "
            f"{shape[0]}x{shape[1]} (an adapter for another model or size?)."
        )
    return rows, cols


def check_checksums(header: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, where: str) -> None:
    """Raise unless the indices and values are the ones whose CRC-32s ``header`` recorded at save time."""
    if int(header[2]) != tensor_crc32(indices.to(torch.int64)):
        raise InvalidSparseIndicesError(
            f"{where}: the indices do not match the checksum recorded when the file was saved (the file is damaged)."
        )
    if int(header[3]) != tensor_crc32(values):
        raise InvalidSparseIndicesError(
            f"{where}: the values do not match the checksum recorded when the file was saved (the file is damaged)."
        )


def check_values(values: torch.Tensor, where: str) -> None:
    """Values must be finite floating-point numbers: NaN/Inf would poison every output that reads the weight."""
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        got = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
        raise InvalidSparseIndicesError(f"{where}: values must be floating point, got {got}.")
    # a finite sum means every value is finite (NaN and inf propagate; overflow only makes inf): one reduction,
    # no mask; only a non-finite sum pays for the exact check
    if not bool(torch.isfinite(values.sum())) and not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise InvalidSparseIndicesError(f"{where}: {bad} of {values.numel()} values are NaN or infinite.")
