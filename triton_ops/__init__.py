"""Sparse kernels for sparse-peft: Triton on CUDA (or under ``TRITON_INTERPRET=1``), plain torch elsewhere."""

from .autograd import FusedSparseLinearFn, SparseDeltaLinearFn, fused_sparse_linear, sparse_delta_linear
from .dispatch import triton_available, use_triton
from .ops import gather, scatter_, scatter_add_, sddmm, spmm
from .structured import slice_flat_indices, slice_values_grad, structured_delta_linear

__all__ = [
    "FusedSparseLinearFn",
    "SparseDeltaLinearFn",
    "fused_sparse_linear",
    "gather",
    "scatter_",
    "scatter_add_",
    "sddmm",
    "slice_flat_indices",
    "slice_values_grad",
    "sparse_delta_linear",
    "spmm",
    "structured_delta_linear",
    "triton_available",
    "use_triton",
]
