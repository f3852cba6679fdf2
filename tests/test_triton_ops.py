"""Sparse ops: the torch path against dense references, the autograd functions with ``gradcheck``, the
import fallback without Triton, and the Triton kernels under the interpreter (in a subprocess, because
``TRITON_INTERPRET`` is only read when ``triton`` is imported).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sparse_peft.triton_ops import autograd, torch_ops

ROOT = Path(__file__).resolve().parents[1]


def _sparse(n_rows: int, n_cols: int, k: int, idx_dtype: torch.dtype, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n_rows * n_cols, generator=gen)[:k].sort().values.to(idx_dtype)
    return idx, torch.randn(k, generator=gen, dtype=torch.float64).to(dtype)


def _dense(idx: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    out = torch.zeros(shape[0] * shape[1], dtype=torch.float64)
    out[idx.long()] = vals.double()
    return out.view(shape)


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the torch path even when this process was started with ``TRITON_INTERPRET=1``."""
    monkeypatch.setenv("SPARSE_PEFT_DISABLE_TRITON", "1")


SHAPES = [(1, 1), (5, 7), (16, 3)]


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
def test_torch_ops_match_dense(
    shape: tuple[int, int], density: float, dtype: torch.dtype, idx_dtype: torch.dtype
) -> None:
    n_rows, n_cols = shape
    k = round(density * n_rows * n_cols)
    idx, vals = _sparse(n_rows, n_cols, k, idx_dtype, dtype)
    dense = _dense(idx, vals, shape)
    gen = torch.Generator().manual_seed(1)
    tol = {"rtol": 1.6e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}

    target = torch.randn(shape, generator=gen).to(dtype)
    assert torch.equal(torch_ops.gather(target, idx), target.view(-1)[idx.long()])
    restored = torch_ops.scatter_(target.clone(), idx, vals)
    assert torch.equal(restored.view(-1)[idx.long()], vals.to(dtype))
    added = torch_ops.scatter_add_(target.clone(), idx, vals, -0.5)
    torch.testing.assert_close(added.double(), target.double() - 0.5 * dense, **tol)

    x = torch.randn(2, 3, n_cols, generator=gen).to(dtype)
    y = torch_ops.spmm(x, vals, idx, shape, transpose=True)
    assert y.dtype == dtype and y.shape == (2, 3, n_rows)
    torch.testing.assert_close(y.double(), x.double() @ dense.t(), **tol)
    x = torch.randn(4, n_rows, generator=gen).to(dtype)
    y = torch_ops.spmm(x, vals, idx, shape, transpose=False)
    assert y.dtype == dtype and y.shape == (4, n_cols)
    torch.testing.assert_close(y.double(), x.double() @ dense, **tol)

    a, b = (
        torch.randn(2, 3, n_rows, generator=gen).to(dtype),
        torch.randn(2, 3, n_cols, generator=gen).to(dtype),
    )
    g = torch_ops.sddmm(a, b, idx, shape)
    assert g.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and g.shape == (k,)
    full = a.reshape(-1, n_rows).double().t() @ b.reshape(-1, n_cols).double()
    torch.testing.assert_close(g.double(), full.reshape(-1)[idx.long()], rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("torch_path")
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_sparse_delta_linear_gradcheck(fan_in_fan_out: bool) -> None:
    n_rows, n_cols = 5, 4
    idx, vals = _sparse(n_rows, n_cols, 9, torch.int32, torch.float64)
    x = torch.randn(2, 3, n_rows if fan_in_fan_out else n_cols, dtype=torch.float64, requires_grad=True)

    def fn(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return autograd.sparse_delta_linear(x, v, idx, (n_rows, n_cols), fan_in_fan_out)

    assert torch.autograd.gradcheck(fn, (x, vals.requires_grad_()))
    y = fn(x, vals)
    expected = (
        x @ _dense(idx, vals, (n_rows, n_cols))
        if fan_in_fan_out
        else x @ _dense(idx, vals, (n_rows, n_cols)).t()
    )
    torch.testing.assert_close(y, expected)


@pytest.mark.usefixtures("torch_path")
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_fused_sparse_linear_grads(fan_in_fan_out: bool) -> None:
    n_in, n_out, scale = 4, 5, 1.5
    shape = (n_in, n_out) if fan_in_fan_out else (n_out, n_in)
    idx, vals = _sparse(*shape, 8, torch.int64, torch.float64)
    weight = torch.randn(shape, dtype=torch.float64)
    bias = torch.randn(n_out, dtype=torch.float64)
    x = torch.randn(2, 3, n_in, dtype=torch.float64)
    check_fused_sparse_linear(x, weight, bias, vals, idx, scale, fan_in_fan_out)


def check_fused_sparse_linear(x, weight, bias, vals, idx, scale, fan_in_fan_out) -> None:
    """gradcheck in every input, the values' gradient against a dense reference, and the base weight restored."""

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return autograd.fused_sparse_linear(x, w, b, v, idx, scale, fan_in_fan_out)

    assert torch.autograd.gradcheck(fn, tuple(t.clone().requires_grad_() for t in (x, weight, bias, vals)))
    original = weight.clone()
    v = vals.clone().requires_grad_()
    y = autograd.fused_sparse_linear(x, weight, bias, v, idx, scale, fan_in_fan_out)
    assert torch.equal(weight, original)  # the delta lives in the weight only inside the call
    w_dense = weight.clone()
    w_dense.view(-1)[idx] += scale * vals
    w_dense.requires_grad_()
    y_dense = x @ w_dense + bias if fan_in_fan_out else F.linear(x, w_dense, bias)
    torch.testing.assert_close(y, y_dense)
    grad_out = torch.randn(y.shape, dtype=y.dtype).to(y.device)
    y.backward(grad_out)
    y_dense.backward(grad_out)
    assert torch.equal(weight, original)
    torch.testing.assert_close(v.grad, w_dense.grad.reshape(-1)[idx] * scale)


def _run(args: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_import_without_triton(tmp_path: Path) -> None:
    """A broken or missing ``triton`` must leave the package importable and every op on the torch path."""
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('triton is not available on this platform')\n")
    script = textwrap.dedent(
        """
        import torch
        from sparse_peft import triton_ops
        from sparse_peft.triton_ops import torch_ops

        assert not triton_ops.triton_available()
        assert not triton_ops.use_triton(torch.zeros(1))  # even with TRITON_INTERPRET=1
        idx = torch.tensor([1, 4, 5], dtype=torch.int32)
        vals = torch.tensor([1.0, -2.0, 0.5])
        w = torch.zeros(2, 3)
        triton_ops.scatter_add_(w, idx, vals, 2.0)
        assert w.view(-1).tolist() == [0.0, 2.0, 0.0, 0.0, -4.0, 1.0]
        x = torch.randn(3, 3)
        assert torch.allclose(triton_ops.spmm(x, vals, idx, (2, 3), True), x @ w.t() / 2)
        assert torch.equal(triton_ops.sddmm(x[:, :2], x, idx, (2, 3)), torch_ops.sddmm(x[:, :2], x, idx, (2, 3)))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "TRITON_INTERPRET": "1"}
    proc = _run([sys.executable, "-c", script], env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _run_triton_cases(interpret: bool) -> None:
    """Every kernel against the torch path, and gradcheck through them (tests/triton_cases.py)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env["TRITON_INTERPRET"] = "1" if interpret else "0"
    env.pop("SPARSE_PEFT_DISABLE_TRITON", None)
    cases = str(ROOT / "tests" / "triton_cases.py")
    proc = _run([sys.executable, "-m", "pytest", cases, "-q", "-p", "no:cacheprovider"], env, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert " passed" in output and "skipped" not in output, output


NO_TRITON = importlib.util.find_spec("triton") is None


@pytest.mark.slow
@pytest.mark.skipif(NO_TRITON, reason="triton is not installed")
@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="a GPU runs the same cases compiled (below); triton 3.6's interpreter fails under numpy 2.5 there",
)
def test_triton_kernels_under_interpreter() -> None:
    _run_triton_cases(interpret=True)


@pytest.mark.skipif(NO_TRITON or not torch.cuda.is_available(), reason="needs triton and a CUDA GPU")
def test_triton_kernels_compiled_on_cuda() -> None:
    _run_triton_cases(interpret=False)


def test_spmm_structure_cache_follows_in_place_changes_of_the_support():
    """The CSR structure is cached per indices tensor and version: an in-place reselection (dynamic masks) must
    never reuse the old structure."""
    shape = (6, 5)
    indices = torch.tensor([0, 3, 7, 12, 29], dtype=torch.int32)
    values = torch.arange(1.0, 6.0)
    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))

    def dense(idx: torch.Tensor) -> torch.Tensor:
        weight = torch.zeros(30)
        weight[idx.long()] = values
        return x @ weight.view(shape).t()

    torch.testing.assert_close(torch_ops.spmm(x, values, indices, shape, True), dense(indices))
    indices.copy_(torch.tensor([1, 2, 8, 20, 25], dtype=torch.int32))
    torch.testing.assert_close(torch_ops.spmm(x, values, indices, shape, True), dense(indices))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_runs_of_16_take_the_row_path_with_the_same_results(dtype):
    """A support of whole aligned runs of 16 (block-structured deltas) is read and written as rows of a (-1, 16)
    view; results equal the entry-wise ops bit for bit, and a support changed in place is looked at again."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 64, generator=gen).to(dtype)
    runs = torch.tensor([1, 4, 5, 30])
    indices = (runs[:, None] * 16 + torch.arange(16)).reshape(-1).to(torch.int32)
    values = torch.randn(indices.numel(), generator=gen)
    assert torch.equal(torch_ops._whole_runs(indices, weight), runs)
    flat = weight.reshape(-1)
    assert torch.equal(torch_ops.gather(weight, indices), flat[indices.long()])
    expected = flat.clone()
    expected[indices.long()] = (flat[indices.long()].float() + 0.5 * values).to(dtype)
    assert torch.equal(torch_ops.scatter_add_(weight.clone(), indices, values, alpha=0.5).reshape(-1), expected)
    restored = torch_ops.scatter_(weight.clone(), indices, torch.zeros(indices.numel())).reshape(-1)
    assert torch.equal(restored[indices.long()], torch.zeros(indices.numel(), dtype=dtype))
    indices[15] += 1  # still sorted and unique, no longer whole runs: the cached runs must not be reused
    assert torch_ops._whole_runs(indices, weight) is None
    assert torch.equal(torch_ops.gather(weight, indices), flat[indices.long()])
    assert torch_ops._whole_runs(indices[1:17], weight) is None  # not aligned
