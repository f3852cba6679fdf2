"""One dispatch rule for every sparse op: Triton on CUDA tensors (or anywhere under ``TRITON_INTERPRET=1``),
the plain-torch path otherwise. Importing never fails when Triton is missing (macOS, Windows, minimal installs).
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from . import torch_ops

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load_kernels() -> ModuleType | None:
    try:
        from . import triton_kernels
    except ImportError:  # triton not installed, or a platform without wheels
        return None
    return triton_kernels


_kernels = _load_kernels()


def triton_available() -> bool:
    """Whether the Triton kernels could be imported at all."""
    return _kernels is not None


def use_triton(tensor: torch.Tensor) -> bool:
    """The dispatch rule: Triton for CUDA tensors, or for any tensor when the interpreter is on."""
    if _kernels is None or os.environ.get("SPARSE_PEFT_DISABLE_TRITON", "0") == "1":
        return False
    return tensor.is_cuda or INTERPRET


def backend(tensor: torch.Tensor) -> ModuleType:
    """The module implementing the ops for ``tensor``: ``triton_kernels`` or ``torch_ops``."""
    return _kernels if use_triton(tensor) else torch_ops  # type: ignore[return-value]
