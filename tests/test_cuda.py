"""The adapters on a GPU, through the compiled Triton kernels: the same model on the Triton and the torch path
gives the same outputs and gradients, merge/unmerge/disable hold on CUDA in fp32, fp16 and bf16, and the sparse
backward allocates no dense weight-sized gradient. Skipped without CUDA (CI has none); run on a GPU machine with
``python -m pytest tests/test_cuda.py tests/test_triton_ops.py``.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from sparse_peft import S2FTConfig, SparseDeltaConfig, compose, triton_ops
from sparse_peft.embedded.toy import VOCAB, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
TOL = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float16: {"rtol": 1e-2, "atol": 1e-2},
    torch.bfloat16: {"rtol": 5e-2, "atol": 5e-2},
}
CONFIGS = {
    "sparse_delta fused": lambda: SparseDeltaConfig(r=4, target_modules="all-linear", init_weights=False),
    "sparse_delta separate": lambda: SparseDeltaConfig(
        r=4, target_modules="all-linear", init_weights=False, fused=False
    ),
    "s2ft": lambda: S2FTConfig(r=4),
}


@pytest.fixture(autouse=True)
def no_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(seed)).to(CUDA)
    return {"input_ids": ids, "labels": ids}


def _model(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    model = get_peft_model(tiny_llama(0), CONFIGS[name]()).to(CUDA, dtype)
    with torch.no_grad():  # S2FT starts at zero: give every adapter a non-zero delta
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.02)
    return model


def _loss_and_grads(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_triton_path_matches_torch_path(
    name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(name, dtype)
    batch = _batch()
    assert triton_ops.use_triton(next(model.parameters()))
    logits, grads = _loss_and_grads(model, batch)
    monkeypatch.setenv("SPARSE_PEFT_DISABLE_TRITON", "1")
    ref_logits, ref_grads = _loss_and_grads(model, batch)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, ref_logits, **TOL[dtype])
    assert grads.keys() == ref_grads.keys() and grads
    for key in grads:
        torch.testing.assert_close(grads[key].float(), ref_grads[key].float(), **TOL[dtype], msg=key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_merge_unmerge_disable_on_cuda(name: str, dtype: torch.dtype) -> None:
    model = _model(name, dtype)
    ids = _batch()["input_ids"]
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        assert not torch.allclose(adapted, base)
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, **TOL[dtype])
        model.unmerge_adapter()
        for n, p in model.named_parameters():
            if not p.requires_grad:  # unmerge subtracts exactly what merge added (sparse_delta) or restores
                torch.testing.assert_close(p, base_weights[n], **TOL[dtype], msg=n)
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, **TOL[dtype])
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, base, **TOL[dtype])


def test_training_steps_lower_the_loss_in_bf16() -> None:
    model = _model("sparse_delta fused", torch.bfloat16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(1)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses  # 4.20 -> 3.24 on an H100


def test_composition_on_cuda() -> None:
    model = get_peft_model(tiny_llama(0), CONFIGS["sparse_delta separate"]()).to(CUDA)
    second = SparseDeltaConfig(r=4, target_modules="all-linear", init_weights=False, fused=False, seed=1)
    model.add_adapter("second", second)
    model.to(CUDA)
    ids = _batch()["input_ids"]
    name = compose(model, ["default", "second"], [1.0, 0.0])
    with torch.no_grad():
        model.set_adapter("default")
        first = model(input_ids=ids).logits
        model.set_adapter(name)
        torch.testing.assert_close(model(input_ids=ids).logits, first, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_sparse_backward_allocates_no_dense_gradient(fused: bool) -> None:
    """A 4096 x 4096 fp32 layer (64 MiB) with 0.5 % trainable entries: one forward + backward must not allocate
    anything near the weight's size (a dense delta or dense gradient would)."""
    layer = nn.Sequential(nn.Linear(4096, 4096, bias=False))
    model = get_peft_model(layer, SparseDeltaConfig(density=0.005, target_modules=["0"], fused=fused)).to(
        CUDA
    )
    x = torch.randn(8, 4096, device=CUDA)
    model(x).sum().backward()  # warm-up: kernels compiled, autograd buffers allocated once
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model(x).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    weight_bytes = 4096 * 4096 * 4
    assert extra < weight_bytes / 4, (
        f"{extra / 2**20:.1f} MiB extra for a {weight_bytes / 2**20:.0f} MiB weight"
    )
