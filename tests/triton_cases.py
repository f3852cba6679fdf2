"""Triton kernels vs the torch path: on CUDA tensors with a GPU, else on CPU tensors under the interpreter.

``tests/test_triton_ops.py`` runs this file in a subprocess (``TRITON_INTERPRET=1`` must be set before
``triton`` is imported; the name has no ``test_`` prefix, so a plain ``pytest`` run does not collect it).
Under the interpreter shapes are tiny because every program executes in Python; a few of them still exceed
one block (k > 1024 for scatter, T > 64 for the token loop, rows longer than the spmm nonzero block). On a
GPU the same cases run compiled, plus model-sized shapes with many blocks per grid axis.
"""

from __future__ import annotations

import pytest
import torch
from sparse_peft.triton_ops import autograd, dispatch, ops, torch_ops, triton_kernels

DEVICE = torch.device("cpu" if dispatch.INTERPRET or not torch.cuda.is_available() else "cuda")
if not dispatch.use_triton(torch.zeros(1, device=DEVICE)):
    raise RuntimeError(
        "needs a GPU or TRITON_INTERPRET=1, and an importable triton: the Triton path would not run"
    )
ON_GPU = DEVICE.type == "cuda"

# (R, C, T)
SHAPES = [(1, 1, 1), (5, 7, 3), (33, 17, 8), (3, 40, 70), (33, 40, 2)]
# spmm runs one program per output feature and token block, the slowest op to interpret: shapes are
# (out features, in features, T) so that few outputs still give rows longer than one nonzero block, and
# each dtype runs with one index dtype (the index loads do not depend on the value dtype)
SPMM_SHAPES = [(1, 1, 1), (5, 7, 3), (9, 17, 8), (3, 40, 70)]
if ON_GPU:  # compiled kernels: also a model-sized matrix (many blocks on every grid axis) and a ragged one
    SHAPES += [(1024, 768, 300), (257, 1031, 65)]
    SPMM_SHAPES += [(1024, 768, 300), (257, 1031, 65)]
SPMM_DTYPES = [
    (torch.float32, torch.int32),
    (torch.float32, torch.int64),
    (torch.float16, torch.int64),
    (torch.bfloat16, torch.int32),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDX_DTYPES = [torch.int32, torch.int64]
# Results rounded once to a half type may differ by one unit in the last place (summation order; and
# the interpreter rounds fp32 -> bf16 towards zero where a GPU rounds to nearest even). fp32 sums over long
# rows differ by summation order too (and by TF32 in torch's dense reference on a GPU, which is off here).
torch.backends.cuda.matmul.allow_tf32 = False
TOL = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4} if ON_GPU else {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
}
FP32_SUM_TOL = {"rtol": 1e-4, "atol": 1e-4} if ON_GPU else {"rtol": 1e-5, "atol": 1e-5}


def _cases(idx_dtype: torch.dtype, dtype: torch.dtype, shapes: list[tuple[int, int, int]] = SHAPES):
    """Yield ``(R, C, T, indices, values)`` for every shape with k = 0, about 40 % and all of R * C."""
    gen = torch.Generator().manual_seed(0)
    for n_rows, n_cols, n_tokens in shapes:
        numel = n_rows * n_cols
        for k in sorted({0, max(1, numel * 2 // 5), numel}):
            idx = torch.randperm(numel, generator=gen)[:k].sort().values.to(DEVICE, idx_dtype)
            yield n_rows, n_cols, n_tokens, idx, torch.randn(k, generator=gen).to(DEVICE, dtype)


def _randn(*shape: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _on(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Move CPU-generated tensors (seeded generators live on the CPU) to the device under test, keeping
    autograd leaves leaves."""
    return tuple(t.detach().to(DEVICE).requires_grad_(t.requires_grad) for t in tensors)


def test_dispatch_picks_triton() -> None:
    assert dispatch.triton_available()
    assert dispatch.use_triton(torch.zeros(1, device=DEVICE))
    assert dispatch.backend(torch.zeros(1, device=DEVICE)) is triton_kernels


@pytest.mark.parametrize("idx_dtype", IDX_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_scatter(dtype: torch.dtype, idx_dtype: torch.dtype) -> None:
    for n_rows, n_cols, _, idx, vals in _cases(idx_dtype, dtype):
        target = _randn(n_rows, n_cols, dtype=dtype)
        got = triton_kernels.gather(target, idx)
        assert got.dtype == dtype and got.shape == idx.shape
        assert torch.equal(got, torch_ops.gather(target, idx))

        expected = torch_ops.scatter_(target.clone(), idx, vals.float())  # cast to the target dtype
        out = target.clone()
        assert triton_kernels.scatter_(out, idx, vals.float()) is out
        assert torch.equal(out, expected)


@pytest.mark.parametrize("idx_dtype", IDX_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_add(dtype: torch.dtype, idx_dtype: torch.dtype) -> None:
    for n_rows, n_cols, _, idx, vals in _cases(idx_dtype, dtype):
        for values, alpha in ((vals, 1.0), (vals.float(), -0.37)):
            target = _randn(n_rows, n_cols, dtype=dtype)
            expected = torch_ops.scatter_add_(target.clone(), idx, values, alpha)
            out = target.clone()
            assert triton_kernels.scatter_add_(out, idx, values, alpha) is out
            if dtype == torch.bfloat16:  # interpreter-only rounding difference, see TOL
                torch.testing.assert_close(out, expected, **TOL[dtype])
            elif (
                ON_GPU
            ):  # compiled, `dst + alpha * v` is one fused multiply-add: one rounding where torch has two
                eps = torch.finfo(dtype).eps  # operands are O(1): one rounding of them, whatever the sum
                torch.testing.assert_close(out, expected, rtol=2 * eps, atol=8 * eps)
            else:
                torch.testing.assert_close(out, expected, rtol=0, atol=0)
            untouched = torch.ones(n_rows * n_cols, dtype=torch.bool, device=DEVICE)
            untouched[idx.long()] = False
            assert torch.equal(out.view(-1)[untouched], target.view(-1)[untouched])


@pytest.mark.parametrize("idx_dtype", IDX_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sddmm(dtype: torch.dtype, idx_dtype: torch.dtype) -> None:
    for n_rows, n_cols, n_tokens, idx, _ in _cases(idx_dtype, dtype):
        a, b = _randn(n_tokens, n_rows, dtype=dtype, seed=2), _randn(n_tokens, n_cols, dtype=dtype, seed=3)
        got = triton_kernels.sddmm(a, b, idx, (n_rows, n_cols))
        expected = torch_ops.sddmm(a, b, idx, (n_rows, n_cols))
        assert got.dtype == expected.dtype == torch.float32 and got.shape == (idx.numel(),)
        torch.testing.assert_close(got, expected, **FP32_SUM_TOL)  # half products are exact in fp32


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize(("dtype", "idx_dtype"), SPMM_DTYPES)
def test_spmm(dtype: torch.dtype, idx_dtype: torch.dtype, transpose: bool) -> None:
    shapes = [(n_out, n_in, t) if transpose else (n_in, n_out, t) for n_out, n_in, t in SPMM_SHAPES]
    for n_rows, n_cols, n_tokens, idx, vals in _cases(idx_dtype, dtype, shapes):
        n_in, n_out = (n_cols, n_rows) if transpose else (n_rows, n_cols)
        x = _randn(n_tokens, n_in, dtype=dtype, seed=4)
        got = triton_kernels.spmm(x, vals, idx, (n_rows, n_cols), transpose)
        expected = torch_ops.spmm(x, vals, idx, (n_rows, n_cols), transpose)
        assert got.dtype == dtype and got.shape == (n_tokens, n_out) and got.is_contiguous()
        torch.testing.assert_close(got, expected, **TOL[dtype])


def test_leading_dims_and_non_contiguous_inputs() -> None:
    n_rows, n_cols, k = 6, 5, 13
    gen = torch.Generator().manual_seed(5)
    idx = torch.randperm(n_rows * n_cols, generator=gen)[: 2 * k].sort().values[::2]  # strided, still sorted
    vals = torch.randn(2 * k, generator=gen)[::2]
    idx, vals = idx.to(DEVICE), vals.to(DEVICE)
    if ON_GPU:  # moving to the GPU made them contiguous: make strided views again
        idx, vals = idx.repeat_interleave(2)[::2], vals.repeat_interleave(2)[::2]
    assert not idx.is_contiguous() and not vals.is_contiguous()
    for transpose in (True, False):
        n_in = n_cols if transpose else n_rows
        x = torch.randn(2, 3, 2 * n_in, generator=gen).to(DEVICE)[..., ::2]
        got = triton_kernels.spmm(x, vals, idx, (n_rows, n_cols), transpose)
        torch.testing.assert_close(
            got, torch_ops.spmm(x.contiguous(), vals, idx, (n_rows, n_cols), transpose)
        )
        assert got.shape == (2, 3, n_rows if transpose else n_cols)
    a = torch.randn(2, 3, n_rows, generator=gen).to(DEVICE)
    b = torch.randn(2, 2 * n_cols, 3, generator=gen).to(DEVICE)[:, ::2].transpose(1, 2)
    torch.testing.assert_close(
        triton_kernels.sddmm(a, b, idx, (n_rows, n_cols)),
        torch_ops.sddmm(a, b.contiguous(), idx, (n_rows, n_cols)),
    )

    storage = torch.randn(n_cols, n_rows, generator=gen).to(DEVICE)
    weight = storage.t()  # non-contiguous (R, C) view: updates must land in `storage`
    flat = weight.contiguous().view(-1)
    assert torch.equal(triton_kernels.gather(weight, idx), flat[idx])
    expected = flat.clone()
    expected[idx] += 0.5 * vals
    assert triton_kernels.scatter_add_(weight, idx, vals, 0.5) is weight
    torch.testing.assert_close(storage.t().reshape(-1), expected)
    expected[idx] = vals
    triton_kernels.scatter_(weight, idx, vals)
    assert torch.equal(storage.t().reshape(-1), expected)


def test_fp64_alpha_is_not_truncated_to_fp32() -> None:
    target = torch.zeros(4, dtype=torch.float64, device=DEVICE)
    idx = torch.tensor([1, 3], device=DEVICE)
    triton_kernels.scatter_add_(target, idx, torch.ones(2, dtype=torch.float64, device=DEVICE), 0.1)
    assert target[1].item() == 0.1 and target[0].item() == 0.0


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_sparse_delta_linear_gradcheck(fan_in_fan_out: bool) -> None:
    n_rows, n_cols = 4, 3
    gen = torch.Generator().manual_seed(6)
    idx = torch.randperm(n_rows * n_cols, generator=gen)[:7].sort().values.int()
    vals = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(
        2, n_rows if fan_in_fan_out else n_cols, generator=gen, dtype=torch.float64, requires_grad=True
    )
    idx, vals, x = _on(idx, vals, x)

    def fn(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return autograd.sparse_delta_linear(x, v, idx, (n_rows, n_cols), fan_in_fan_out)

    assert torch.autograd.gradcheck(fn, (x, vals))


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_fused_sparse_linear_grads(fan_in_fan_out: bool) -> None:
    from tests.test_triton_ops import check_fused_sparse_linear

    n_in, n_out, k, scale = 3, 4, 6, 0.7
    shape = (n_in, n_out) if fan_in_fan_out else (n_out, n_in)
    gen = torch.Generator().manual_seed(7)
    idx = torch.randperm(n_in * n_out, generator=gen)[:k].sort().values
    vals = torch.randn(k, generator=gen, dtype=torch.float64)
    weight = torch.randn(*shape, generator=gen, dtype=torch.float64)
    bias = torch.randn(n_out, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 2, n_in, generator=gen, dtype=torch.float64)
    x, weight, bias, vals, idx = _on(x, weight, bias, vals, idx)
    check_fused_sparse_linear(x, weight, bias, vals, idx, scale, fan_in_fan_out)


def test_public_ops_route_here() -> None:
    idx = torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE)
    vals = torch.tensor([1.0, -2.0, 3.0], device=DEVICE)
    x = torch.randn(4, 3, device=DEVICE)
    torch.testing.assert_close(
        ops.spmm(x, vals, idx, (2, 3), True), torch_ops.spmm(x, vals, idx, (2, 3), True)
    )
    target = torch.zeros(2, 3, device=DEVICE)
    ops.scatter_add_(target, idx, vals, 2.0)
    assert target.view(-1).tolist() == [2.0, 0.0, -4.0, 0.0, 0.0, 6.0]
