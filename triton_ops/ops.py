"""Public sparse ops; each call goes to Triton or torch by :func:`triton_ops.dispatch.use_triton`."""

from __future__ import annotations

import torch

from .dispatch import backend


def gather(target: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``target.flatten()[indices]`` — the k original values saved before a merge."""
    return backend(target).gather(target, indices)


def scatter_(target: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """In place ``target.flatten()[indices] = values`` (bit-exact restore after unmerge)."""
    return backend(target).scatter_(target, indices, values)


def scatter_add_(
    target: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """In place ``target.flatten()[indices] += alpha * values`` (merge, compose). Indices must be unique."""
    return backend(target).scatter_add_(target, indices, values, alpha)


def sddmm(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``g[k] = sum_t a[t, idx_k // C] * b[t, idx_k % C]``: the gradient of k sparse values, no dense R x C."""
    return backend(a).sddmm(a, b, indices, shape)


def spmm(
    x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int], transpose: bool
) -> torch.Tensor:
    """``x @ S^T`` (``transpose=True``) or ``x @ S`` with ``S`` the sparse ``(R, C)`` matrix (values, indices)."""
    return backend(x).spmm(x, values, indices, shape, transpose)
