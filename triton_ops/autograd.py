"""Autograd functions for sparse-delta layers.

Both save only the layer input (and references to tensors that already exist), never a dense copy of the
weight, and compute the values' gradient with the sampled product (SDDMM) instead of a dense dL/dW.
Weight storage is either ``nn.Linear`` (``(out, in)``, ``fan_in_fan_out=False``) or GPT-2 ``Conv1D``
(``(in, out)``, ``fan_in_fan_out=True``); flat indices always refer to the storage layout.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from types import ModuleType

import torch
import torch.nn.functional as F

from .dispatch import backend
from .structured import input_side, slice_values_grad
from .torch_ops import compute_dtype


def _values_grad(
    ops: ModuleType,
    dy: torch.Tensor,
    x: torch.Tensor,
    indices: torch.Tensor,
    shape: tuple[int, int],
    fan_in_fan_out: bool,
) -> torch.Tensor:
    # Linear: dS[r, c] = sum_t dy[t, r] x[t, c];  Conv1D: dS[r, c] = sum_t x[t, r] dy[t, c]
    return ops.sddmm(x, dy, indices, shape) if fan_in_fan_out else ops.sddmm(dy, x, indices, shape)


class SparseDeltaLinearFn(torch.autograd.Function):
    """``y = x @ S^T`` (Linear storage) for a sparse ``S``; the separate path ``base(x) + sparse(x)``."""

    @staticmethod
    def forward(ctx, x, values, indices, shape, fan_in_fan_out):  # type: ignore[override]
        ctx.save_for_backward(x, values, indices)
        ctx.shape, ctx.fan_in_fan_out = shape, fan_in_fan_out
        ctx.ops = backend(x)  # Triton or torch: decided once for the forward and its backward
        return ctx.ops.spmm(x, values, indices, shape, transpose=not fan_in_fan_out)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, values, indices = ctx.saved_tensors
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.ops.spmm(dy, values, indices, ctx.shape, transpose=ctx.fan_in_fan_out)
        if ctx.needs_input_grad[1]:
            grad_values = _values_grad(ctx.ops, dy, x, indices, ctx.shape, ctx.fan_in_fan_out).to(values.dtype)
        return grad_x, grad_values, None, None, None


class FusedSparseLinearFn(torch.autograd.Function):
    """Dense matmul with the delta written into the weight only while this function runs.

    Forward and backward each write ``W[idx] = W0[idx] + scale * v`` (O(k)), run the base layer's dense matmul
    (``dx = dy @ W`` in the backward, plus the SDDMM for ``v``), and write the k originals back bit-exactly. So the
    speed is the base layer's, nothing weight-sized is copied or saved, and outside these two calls the base weight
    is always exactly ``W0`` (optimizers, EMA, ``state_dict`` and other readers never see the delta). Writes go
    through ``.data`` so they do not bump the version counter other autograd nodes saved.

    With a structured slice (``axis``/``channels``, S2FT) the values' gradient is the block-sized product over the
    selected channels, and for input-side slices only ``x[..., channels]`` is saved (partial backprop).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x, weight, bias, values, indices, scale, fan_in_fan_out, axis=None, channels=None
    ):
        ctx.structured = channels is not None
        ctx.axis = axis
        # dx needs W (the live weight, not a copy); the values' gradient needs only the selected input slice
        slice_input = ctx.structured and input_side(axis, fan_in_fan_out) and not weight.requires_grad
        x_saved = x[..., channels] if slice_input else x
        ctx.input_sliced = slice_input
        ctx.save_for_backward(x_saved, weight, values, indices, channels)
        ctx.scale, ctx.fan_in_fan_out, ctx.has_bias = scale, fan_in_fan_out, bias is not None
        ctx.ops = backend(weight)  # Triton or torch: decided once for the forward and its backward
        with _delta_in(ctx.ops, weight, values, indices, scale) as fused:
            out = _dense_linear(x, fused, bias, fan_in_fan_out)
        ctx.compute_dtype = out.dtype  # differs from weight.dtype under autocast
        return out

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, values, indices, channels = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = grad_values = None
        if ctx.needs_input_grad[0]:
            with _delta_in(ctx.ops, weight, values, indices, ctx.scale) as fused:
                w = fused.to(ctx.compute_dtype)  # a transient cast, as autocast did in the forward
                grad_x = (dy.to(ctx.compute_dtype) @ (w.t() if ctx.fan_in_fan_out else w)).to(x.dtype)
        if ctx.needs_input_grad[1]:  # only when someone also trains the base weight densely
            dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
            grad_weight = x2.t() @ dy2 if ctx.fan_in_fan_out else dy2.t() @ x2
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = dy.reshape(-1, dy.shape[-1]).sum(0)
        if ctx.needs_input_grad[3]:
            if ctx.structured:
                needs_slice = input_side(ctx.axis, ctx.fan_in_fan_out) and not ctx.input_sliced
                xs = x[..., channels] if needs_slice else x
                grad_values = slice_values_grad(dy, xs, ctx.axis, channels, ctx.fan_in_fan_out)
            else:
                grad_values = _values_grad(ctx.ops, dy, x, indices, tuple(weight.shape), ctx.fan_in_fan_out)
            grad_values = (grad_values * ctx.scale).to(values.dtype)
        return grad_x, grad_weight, grad_bias, grad_values, None, None, None, None, None


def _dense_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fan_in_fan_out: bool
) -> torch.Tensor:
    """The base layer's own product: ``x @ W`` (+ bias) for Conv1D storage, ``F.linear`` for Linear storage."""
    if fan_in_fan_out:
        out = x @ weight
        return out + bias if bias is not None else out
    return F.linear(x, weight, bias)


_WEIGHT_LOCKS = tuple(threading.Lock() for _ in range(256))
"""Striped by storage address: bounded memory, no registry to clean up; two weights rarely share a stripe, and if
they do their fused sections only take turns."""


def _weight_lock(weight: torch.Tensor) -> threading.Lock:
    """The lock of a weight's storage: the fused write, the matmul and the restore run as one unit, so two threads
    training through the same layer never read each other's delta as the "originals"."""
    return _WEIGHT_LOCKS[hash(weight.untyped_storage().data_ptr()) % len(_WEIGHT_LOCKS)]


def _with_delta(
    ops: ModuleType, data: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, scale: float
) -> torch.Tensor:
    """Write ``W0 + scale * v`` at the indices of ``data`` (in place); return the k originals it replaced."""
    originals = ops.gather(data, indices)  # a copy
    compute = compute_dtype(data.dtype)
    ops.scatter_(data, indices, originals.to(compute) + values.detach().to(compute) * scale)
    return originals


@contextmanager
def _delta_in(ops: ModuleType, weight: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, scale: float):
    """Temporarily hold ``W0 + scale * v`` at the indices of ``weight`` (under the weight's lock); restore the
    originals bit-exactly."""
    data = weight.data
    with _weight_lock(weight):
        originals = _with_delta(ops, data, values, indices, scale)
        try:
            yield data
        finally:
            ops.scatter_(data, indices, originals)


def sparse_delta_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    shape: tuple[int, int],
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """The sparse part alone: ``x @ S^T`` (Linear) or ``x @ S`` (Conv1D); differentiable in ``x`` and ``values``."""
    return SparseDeltaLinearFn.apply(x, values, indices, tuple(shape), fan_in_fan_out)


def fused_sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    values: torch.Tensor,
    indices: torch.Tensor,
    scale: float = 1.0,
    fan_in_fan_out: bool = False,
    axis: int | None = None,
    channels: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ (W + scale * S)^T`` at the base layer's speed, for one sparse delta ``S`` on the base ``weight``.

    Pass ``axis``/``channels`` when ``S`` is a structured row/column slice (see ``triton_ops.structured``).

    Without autograd (``torch.no_grad`` / ``inference_mode``: evaluation, serving, generation, usually on threads)
    the shared weight is never written: the product runs on a transient copy holding the same ``W0 + scale * S``
    (bit-identical outputs), so concurrent forwards and anyone else reading the weight always see ``W0``. With
    autograd the delta is written in place under the weight's lock (no weight-sized copy during training).
    """
    if not torch.is_grad_enabled():
        fused = weight.detach().clone()
        _with_delta(backend(weight), fused, values, indices, scale)
        return _dense_linear(x, fused, bias, fan_in_fan_out)
    return FusedSparseLinearFn.apply(
        x, weight, bias, values, indices, float(scale), fan_in_fan_out, axis, channels
    )
