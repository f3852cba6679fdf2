"""Sparse kernels for sparse-peft: Triton on CUDA (or under ``TRITON_INTERPRET=1``), plain torch elsewhere."""

if __name__ == "sparse_peft.triton_ops":
    from .autograd import FusedSparseLinearFn, SparseDeltaLinearFn, fused_sparse_linear, sparse_delta_linear
    from .dispatch import triton_available, use_triton
    from .ops import gather, scatter_, scatter_add_, sddmm, spmm
    from .structured import slice_flat_indices, slice_values_grad, structured_delta_linear
else:  # `import triton_ops` from a source checkout: the deprecated pre-0.2 name
    from sparse_peft._renamed import redirect

    redirect(__name__, "sparse_peft.triton_ops")

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
