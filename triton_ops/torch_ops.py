"""Plain-torch reference implementations of the sparse ops (CPU, and any device without Triton).

Conventions shared with the Triton kernels: a sparse matrix ``S`` of storage shape ``(R, C)`` is given by
sorted unique flat indices ``idx`` (row-major, int32 or int64) and ``values`` of the same length.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch

_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The one accumulation rule of every sparse op (torch and Triton): fp16/bf16 in fp32 (sparse CPU kernels have
    no half support, and sums of many half products lose precision), every other dtype as it is."""
    return torch.float32 if dtype in _HALF else dtype


RUN = 16
"""A support made only of whole aligned runs of this many entries (16 fp32: one 64-byte cache line; block-structured
sparse deltas) is read and written as rows of a ``(-1, RUN)`` view: one index per run, only the lines it
changes."""

_CACHE: dict[tuple[int, str], tuple[weakref.ref, int, Any, Any]] = {}
"""(id(indices), kind) -> (the indices, their version, key, what was derived from them). A support changes far less
often than its values (never while serving; at a reselection during dynamic training), so what is derived from it
(the CSR structure of a product, its runs) is made once per indices tensor and version."""


def _derived(indices: torch.Tensor, kind: str, key: Any, make: Callable[[], Any]) -> Any:
    """``make()``, cached for this indices tensor, its version and ``key``."""
    try:
        version = indices._version
    except RuntimeError:  # inference-mode tensors have no version counter: nothing safe to cache on
        return make()
    hit = _CACHE.get((id(indices), kind))
    if hit is not None and hit[0]() is indices and hit[1:3] == (version, key):
        return hit[3]
    value = make()
    if len(_CACHE) > 4096:  # drop the entries of freed index tensors
        for stale in [k for k, entry in _CACHE.items() if entry[0]() is None]:
            del _CACHE[stale]
    _CACHE[(id(indices), kind)] = (weakref.ref(indices), version, key, value)
    return value


def aligned_run_ids(indices: torch.Tensor, width: int) -> torch.Tensor | None:
    """The ids ``b`` of the aligned runs ``[b * width, (b + 1) * width)`` that sorted unique ``indices`` (every
    support) consist of exactly, or None when they are not whole aligned runs."""
    if width < 2 or not indices.numel() or indices.numel() % width:
        return None
    rows = indices.view(-1, width)
    starts = rows[:, 0]  # sorted unique: a row spanning width - 1 from an aligned start is a whole run
    if bool((starts % width).any()) or bool((rows[:, -1] - starts != width - 1).any()):
        return None
    return starts.div(width, rounding_mode="floor").long()


def _whole_runs(indices: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """:func:`aligned_run_ids` of ``RUN`` for ``indices``, derived once per tensor and version; None also when
    ``target`` has no ``(-1, RUN)`` view."""
    if target.numel() % RUN or not target.is_contiguous():
        return None
    return _derived(indices, "runs", None, lambda: aligned_run_ids(indices, RUN))


def gather(target: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Return ``target.flatten()[indices]`` (a copy of k entries); ``index_select`` is ~3x faster than indexing."""
    runs = _whole_runs(indices, target)
    if runs is not None:
        return target.view(-1, RUN).index_select(0, runs).view(-1)
    return target.reshape(-1).index_select(0, indices)


def scatter_(target: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """In place ``target.flatten()[indices] = values``; used for bit-exact restores."""
    runs = _whole_runs(indices, target)
    if runs is not None:
        target.view(-1, RUN).index_copy_(0, runs, values.to(target.dtype).view(-1, RUN))
        return target
    flat = target.view(-1) if target.is_contiguous() else target.flatten()
    flat.index_copy_(0, indices.long(), values.to(target.dtype))
    if not target.is_contiguous():
        target.copy_(flat.view(target.shape))
    return target


def scatter_add_(
    target: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """In place ``target.flatten()[indices] += alpha * values``, summed in fp32 and rounded once.

    Indices are unique (validated on the way in), so fp32/fp64 targets take one ``index_add_``.
    """
    compute = compute_dtype(target.dtype)
    if compute == target.dtype and target.is_contiguous():
        runs = _whole_runs(indices, target)
        if runs is not None:
            target.view(-1, RUN).index_add_(0, runs, values.to(compute).view(-1, RUN), alpha=alpha)
        else:
            target.view(-1).index_add_(0, indices, values.to(compute), alpha=alpha)
        return target
    acc = gather(target, indices).to(compute) + values.to(compute) * alpha
    return scatter_(target, indices, acc)


def _csr_structure(indices: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    def make() -> tuple[torch.Tensor, torch.Tensor]:
        n_rows, n_cols = shape
        idx = indices.long()
        rows = torch.div(idx, n_cols, rounding_mode="floor")
        return torch.searchsorted(rows, torch.arange(n_rows + 1, device=idx.device)), idx % n_cols

    return _derived(indices, "csr", tuple(shape), make)


def _csr(indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    crow, col = _csr_structure(indices, tuple(shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # contiguous values: unchecked CSR on CUDA reads them as dense memory (a strided view gave wrong sums)
        return torch.sparse_csr_tensor(crow, col, values.contiguous(), shape, check_invariants=False)


def sddmm(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Sampled product ``g[k] = sum_t a[t, r_k] * b[t, c_k]`` with ``(r_k, c_k)`` the row/col of ``indices[k]``.

    ``a`` is ``(T, R)``, ``b`` is ``(T, C)``. This is ``(a^T b)[idx]`` without the dense ``R x C`` product.
    """
    dtype = compute_dtype(torch.promote_types(a.dtype, b.dtype))
    a2 = a.reshape(-1, a.shape[-1]).to(dtype)
    b2 = b.reshape(-1, b.shape[-1]).to(dtype)
    mask = _csr(indices, torch.zeros(indices.numel(), dtype=dtype, device=a.device), shape)
    with warnings.catch_warnings(), torch.autocast(a.device.type, enabled=False):
        warnings.simplefilter("ignore")
        out = torch.sparse.sampled_addmm(mask, a2.t().contiguous(), b2.contiguous(), beta=0.0)
    return out.values()


def spmm(
    x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int], transpose: bool
) -> torch.Tensor:
    """Dense-times-sparse product over the last dim of ``x``.

    ``transpose=True``: ``x @ S^T`` (``x`` has ``C`` features, result ``R``) — an ``nn.Linear`` storage.
    ``transpose=False``: ``x @ S`` (``x`` has ``R`` features, result ``C``) — a GPT-2 ``Conv1D`` storage.
    """
    dtype = compute_dtype(torch.promote_types(x.dtype, values.dtype))
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    sparse = _csr(indices, values.to(dtype), shape)
    with torch.autocast(x.device.type, enabled=False):  # sparse kernels have no autocast (bf16) variants
        if not transpose:
            sparse = sparse.t().to_sparse_csr()  # x @ S == (S^T x^T)^T
        # contiguous in and out: a strided result makes the following ``base + delta`` add slow
        out = (sparse @ x2.t().contiguous()).t().contiguous()
    return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)
