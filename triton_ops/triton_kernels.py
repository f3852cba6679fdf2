"""Triton kernels for the sparse ops, with the same names, signatures and dtypes as :mod:`triton_ops.torch_ops`.

Conventions: a sparse ``S`` of storage shape ``(R, C)`` is given by sorted unique flat row-major indices
(int32 or int64) and values. Validation happens in the callers; the wrappers only make inputs contiguous.

Layout choices (for coalesced loads on a GPU):

- ``gather``/``scatter_``/``scatter_add_``: one program per ``BLOCK`` indices. Indices are sorted, so
  neighbouring lanes touch neighbouring addresses of the target; unique indices mean no atomics.
- ``sddmm`` and ``spmm`` read the dense operand *feature-major* (``(features, T)``, a transposed copy made
  once in the wrapper): every nonzero then reads a contiguous run of tokens instead of one element per
  token row. The copy costs ``O(T * features)``, the kernel reads ``O(T * k)``.
- ``spmm(transpose=False)`` is ``spmm(transpose=True)`` on ``S^T``: the nonzeros are re-sorted by column
  once, so each output feature is a contiguous segment reduced by a single program. Deterministic and
  atomic-free (the Triton interpreter has no bf16 atomics either).
- Accumulation is fp32 (fp64 for fp64 inputs, so ``gradcheck`` can run on the kernels), rounded once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from .torch_ops import compute_dtype

_SCATTER_BLOCK = 1024  # indices per program for gather/scatter: memory bound, wide blocks
_TILE = 2048  # elements of the (nonzeros x tokens) tile one spmm program holds per step
_SDDMM_BLOCK_K = 64  # nonzeros per sddmm program


def _acc(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on the tensor's GPU (``device_map="auto"`` spreads layers over devices)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _token_block(n_tokens: int) -> int:
    """Tokens per tile: a full 128-byte row for long inputs, narrower for decode-sized ones."""
    return min(64, max(16, triton.next_power_of_2(n_tokens)))


@triton.jit
def _gather_kernel(src_ptr, idx_ptr, out_ptr, k, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < k
    idx = tl.load(idx_ptr + offs, mask=mask, other=0).to(tl.int64)
    tl.store(out_ptr + offs, tl.load(src_ptr + idx, mask=mask), mask=mask)


@triton.jit
def _scatter_kernel(dst_ptr, idx_ptr, val_ptr, k, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < k
    idx = tl.load(idx_ptr + offs, mask=mask, other=0).to(tl.int64)
    tl.store(dst_ptr + idx, tl.load(val_ptr + offs, mask=mask), mask=mask)


@triton.jit
def _scatter_add_kernel(dst_ptr, idx_ptr, val_ptr, k, alpha, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < k
    idx = tl.load(idx_ptr + offs, mask=mask, other=0).to(tl.int64)
    old = tl.load(dst_ptr + idx, mask=mask, other=0.0).to(ACC)
    val = tl.load(val_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(dst_ptr + idx, (old + val * alpha).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sddmm_kernel(
    at_ptr,  # (R, T) feature-major, unit stride over T
    bt_ptr,  # (C, T) feature-major, unit stride over T
    idx_ptr,
    out_ptr,
    k,
    n_tokens,
    n_cols,
    ACC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    offs_k = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < k
    idx = tl.load(idx_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
    rows = idx // n_cols
    cols = idx - rows * n_cols
    # Sorted indices: consecutive nonzeros mostly share a row, so the `a` rows hit cache.
    a_rows = at_ptr + rows[:, None] * n_tokens
    b_rows = bt_ptr + cols[:, None] * n_tokens
    acc = tl.zeros((BLOCK_K, BLOCK_T), dtype=ACC)
    for t0 in range(0, n_tokens, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = mask_k[:, None] & (t < n_tokens)[None, :]
        a = tl.load(a_rows + t[None, :], mask=mask, other=0.0).to(ACC)
        b = tl.load(b_rows + t[None, :], mask=mask, other=0.0).to(ACC)
        acc += a * b
    tl.store(out_ptr + offs_k, tl.sum(acc, axis=1), mask=mask_k)


@triton.jit
def _spmm_kernel(
    xt_ptr,  # (in_features, T) feature-major, unit stride over T
    val_ptr,
    idx_ptr,  # sorted flat indices of the (out_features, in_features) matrix
    rowptr_ptr,  # (out_features + 1,) segment bounds of each output feature in idx
    out_ptr,
    n_tokens,
    n_in,
    stride_out_t,
    stride_out_f,
    ACC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = t < n_tokens
    start = tl.load(rowptr_ptr + row)
    end = tl.load(rowptr_ptr + row + 1)
    acc = tl.zeros((BLOCK_K, BLOCK_T), dtype=ACC)
    for k0 in range(start, end, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs < end
        cols = tl.load(idx_ptr + offs, mask=mask_k, other=0).to(tl.int64) - row * n_in
        v = tl.load(val_ptr + offs, mask=mask_k, other=0.0).to(ACC)
        x = tl.load(
            xt_ptr + cols[:, None] * n_tokens + t[None, :],
            mask=mask_k[:, None] & mask_t[None, :],
            other=0.0,
        ).to(ACC)
        acc += v[:, None] * x
    y = tl.sum(acc, axis=0)
    tl.store(
        out_ptr + t.to(tl.int64) * stride_out_t + row * stride_out_f,
        y.to(out_ptr.dtype.element_ty),
        mask=mask_t,
    )


def gather(target: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Return ``target.flatten()[indices]`` (a copy of k entries)."""
    out = torch.empty(indices.shape, dtype=target.dtype, device=target.device)
    k = indices.numel()
    if k == 0:
        return out
    src, idx = target.contiguous(), indices.contiguous()
    with _device(target):
        _gather_kernel[(triton.cdiv(k, _SCATTER_BLOCK),)](src, idx, out, k, BLOCK=_SCATTER_BLOCK)
    return out


def _in_place(
    target: torch.Tensor, indices: torch.Tensor, launch: Callable[[torch.Tensor, torch.Tensor], None]
) -> torch.Tensor:
    """Run ``launch(dst, idx)`` on ``target``'s memory, via a contiguous copy when ``target`` has none."""
    if indices.numel() == 0:
        return target
    dst = target if target.is_contiguous() else target.contiguous()
    with _device(target):
        launch(dst, indices.contiguous())
    if dst is not target:
        target.copy_(dst)
    return target


def scatter_(target: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """In place ``target.flatten()[indices] = values``; the cast happens in torch so restores are bit-exact."""
    vals = values.to(target.dtype).contiguous()

    def launch(dst: torch.Tensor, idx: torch.Tensor) -> None:
        k = idx.numel()
        _scatter_kernel[(triton.cdiv(k, _SCATTER_BLOCK),)](dst, idx, vals, k, BLOCK=_SCATTER_BLOCK)

    return _in_place(target, indices, launch)


def scatter_add_(
    target: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """In place ``target.flatten()[indices] += alpha * values``, summed in fp32 and rounded once."""
    cdtype = compute_dtype(target.dtype)
    vals = values.contiguous()
    if cdtype == torch.float64:  # a Python float reaches the kernel as fp32: scale in fp64 here instead
        vals, alpha = vals.to(torch.float64) * alpha, 1.0

    def launch(dst: torch.Tensor, idx: torch.Tensor) -> None:
        k = idx.numel()
        grid = (triton.cdiv(k, _SCATTER_BLOCK),)
        _scatter_add_kernel[grid](dst, idx, vals, k, float(alpha), ACC=_acc(cdtype), BLOCK=_SCATTER_BLOCK)

    return _in_place(target, indices, launch)


def sddmm(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Sampled product ``g[k] = sum_t a[t, r_k] * b[t, c_k]``; fp32 for half inputs, like the torch path."""
    out_dtype = compute_dtype(torch.promote_types(a.dtype, b.dtype))
    k = indices.numel()
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    n_tokens = a2.shape[0]
    if k == 0 or n_tokens == 0:
        return torch.zeros(k, dtype=out_dtype, device=a.device)
    out = torch.empty(k, dtype=out_dtype, device=a.device)
    at, bt = a2.t().contiguous(), b2.t().contiguous()
    block_t = _token_block(n_tokens)
    with _device(a):
        _sddmm_kernel[(triton.cdiv(k, _SDDMM_BLOCK_K),)](
            at,
            bt,
            indices.contiguous(),
            out,
            k,
            n_tokens,
            shape[1],
            ACC=_acc(out_dtype),
            BLOCK_K=_SDDMM_BLOCK_K,
            BLOCK_T=block_t,
        )
    return out


def _row_ptr(flat: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """Segment bounds of each row in sorted flat indices (int64, length ``n_rows + 1``)."""
    bounds = torch.arange(n_rows + 1, device=flat.device, dtype=torch.int64) * n_cols
    if flat.dtype != torch.int64:
        if n_rows * n_cols <= torch.iinfo(flat.dtype).max:
            bounds = bounds.to(flat.dtype)
        else:
            flat = flat.long()
    return torch.searchsorted(flat, bounds)


def spmm(
    x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int], transpose: bool
) -> torch.Tensor:
    """``x @ S^T`` (``transpose=True``, ``nn.Linear`` storage) or ``x @ S`` (GPT-2 ``Conv1D`` storage)."""
    n_rows, n_cols = shape
    n_out, n_in = (n_rows, n_cols) if transpose else (n_cols, n_rows)
    x2 = x.reshape(-1, x.shape[-1])
    n_tokens = x2.shape[0]
    out = torch.empty(n_tokens, n_out, dtype=x.dtype, device=x.device)
    if indices.numel() == 0 or n_tokens == 0:
        return out.zero_().view(*x.shape[:-1], n_out)
    acc = _acc(compute_dtype(torch.promote_types(x.dtype, values.dtype)))
    if transpose:
        idx, vals = indices.contiguous(), values.contiguous()
    else:  # x @ S == x @ (S^T)^T: re-sort the nonzeros by column, i.e. row-major in S^T
        flat = indices.long()
        rows = torch.div(flat, n_cols, rounding_mode="floor")
        idx, perm = torch.sort((flat - rows * n_cols) * n_rows + rows)
        vals = values[perm]
    rowptr = _row_ptr(idx, n_out, n_in)
    xt = x2.t().contiguous()
    block_t = _token_block(n_tokens)
    block_k = min(128, _TILE // block_t)
    with _device(x):
        grid = (n_out, triton.cdiv(n_tokens, block_t))  # rows on axis 0: up to 2**31 - 1 of them
        _spmm_kernel[grid](
            xt,
            vals,
            idx,
            rowptr,
            out,
            n_tokens,
            n_in,
            out.stride(0),
            out.stride(1),
            ACC=acc,
            BLOCK_K=block_k,
            BLOCK_T=block_t,
        )
    return out.view(*x.shape[:-1], n_out)
