"""Compact on-disk encoding of sorted unique flat indices: gaps in a variable-length byte code (LEB128).

A sparse delta saved as int32 indices + fp32 values is twice the size of a LoRA file with as many parameters.
Sorted indices are small steps apart (about ``1/density``), so each gap fits in one or two 7-bit groups:
at LoRA-equivalent budgets the index part drops from 4 bytes to about 1-1.3 bytes per entry. Encoding and
decoding are vectorised torch ops (O(k), no Python loop over entries). In memory indices stay int32/int64.
"""

from __future__ import annotations

import torch

from .indices import InvalidSparseIndicesError

_MAX_GROUPS = 9  # 63-bit flat indices need at most 9 groups of 7 bits


def encode_indices(indices: torch.Tensor) -> torch.Tensor:
    """uint8 LEB128 code of the gaps of sorted unique ``indices`` (first gap = first index)."""
    idx = indices.detach().to("cpu", torch.int64)
    gaps = torch.diff(idx, prepend=idx.new_zeros(1))
    if idx.numel() and (bool((gaps[1:] <= 0).any()) or int(idx[0]) < 0):
        raise InvalidSparseIndicesError("encode_indices: indices must be sorted, unique and non-negative.")
    n_groups = torch.ones_like(gaps)
    for j in range(1, _MAX_GROUPS):
        n_groups += (gaps >> (7 * j)) > 0
    starts = torch.cumsum(n_groups, 0) - n_groups
    out = torch.empty(int(n_groups.sum()), dtype=torch.uint8)
    for j in range(int(n_groups.max()) if gaps.numel() else 0):
        has = n_groups > j
        byte = (gaps[has] >> (7 * j)) & 0x7F
        byte |= (n_groups[has] - 1 > j).to(torch.int64) << 7  # continuation bit on all but the last group
        out[starts[has] + j] = byte.to(torch.uint8)
    return out


def decode_indices(code: torch.Tensor, where: str = "sparse delta") -> torch.Tensor:
    """int64 indices from :func:`encode_indices`' bytes; a malformed code raises, naming ``where``."""
    if not isinstance(code, torch.Tensor) or code.dtype != torch.uint8 or code.dim() != 1:
        got = f"{code.dtype}, shape {tuple(code.shape)}" if isinstance(code, torch.Tensor) else type(code).__name__
        raise InvalidSparseIndicesError(f"{where}: encoded indices must be a 1-D uint8 tensor, got {got}.")
    if code.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    cont = code >= 0x80  # a continuation byte: its gap goes on in the next byte
    if bool(cont[-1]):
        raise InvalidSparseIndicesError(f"{where}: the encoded indices are truncated (the last gap is unfinished).")
    values = code.to(torch.int64)
    # Most gaps are one byte; only bytes after continuation bytes need work (sparse, not a pass over every byte):
    # a byte's value is shifted by 7 for each continuation byte of its gap before it.
    starts = torch.nonzero(cont).flatten()  # k = 1: each continuation byte starts a run of >= 1 of them
    values[starts] &= 0x7F
    k = 1
    while starts.numel():
        if k >= _MAX_GROUPS:
            raise InvalidSparseIndicesError(f"{where}: an encoded gap is longer than 63 bits (corrupt file).")
        values[starts + k] <<= 7  # the byte after k continuation bytes
        starts = starts[cont[starts + k]]  # runs of >= k + 1 continuation bytes
        k += 1
    # an index is the sum of every gap up to its own: the running sum of the byte values at its gap's last byte
    indices = torch.cumsum(values, 0)[~cont]
    # a zero gap (a duplicate) needs a zero byte past the first; only then compare neighbours
    if bool((code[1:] == 0).any()) and bool((indices[1:] == indices[:-1]).any()):
        raise InvalidSparseIndicesError(f"{where}: the encoded indices contain duplicates (a zero gap).")
    return indices


def encode_blocks(ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """One code for a support of whole aligned blocks: the block size, then the block ids, as the increasing
    sequence ``block_size, block_size + 1 + id_0, block_size + 1 + id_1, ...`` in :func:`encode_indices`' code."""
    return encode_indices(torch.cat([torch.tensor([block_size]), ids.to("cpu", torch.int64) + block_size + 1]))


def decode_blocks(code: torch.Tensor, where: str = "sparse delta") -> tuple[torch.Tensor, int]:
    """(block ids, block size) from :func:`encode_blocks`' bytes; a malformed code raises, naming ``where``."""
    sequence = decode_indices(code, where)
    if sequence.numel() < 2 or int(sequence[0]) < 2:
        raise InvalidSparseIndicesError(f"{where}: the block-coded indices have no block size or no blocks.")
    block_size = int(sequence[0])
    return sequence[1:] - (block_size + 1), block_size
