"""Sparse kernels for sparse-peft: Triton on CUDA (or under ``TRITON_INTERPRET=1``), plain torch elsewhere."""

from .autograd import FusedSparseLinearFn, SparseDeltaLinearFn, fused_sparse_linear, sparse_delta_linear
from .dispatch import triton_available, use_triton
from .ops import gather, scatter_, scatter_add_, sddmm, spmm

__all__ = [
    "FusedSparseLinearFn",
    "SparseDeltaLinearFn",
    "fused_sparse_linear",
    "gather",
    "scatter_",
    "scatter_add_",
    "sddmm",
    "sparse_delta_linear",
    "spmm",
    "triton_available",
    "use_triton",
]
