"""The base layers every sparse_peft tuner adapts, decided in one place: which are supported, and how each stores
its weight (GPT-2's ``Conv1D`` stores ``(in, out)``, everything else ``(out, in)``)."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

SUPPORTED_LAYERS = "torch.nn.Linear, transformers Conv1D, bitsandbytes Linear4bit / Linear8bitLt"


def base_of(module: nn.Module) -> nn.Module:
    """The plain layer under any PEFT wrapping."""
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def stores_in_out(layer: nn.Module) -> bool:
    """Whether the (base) layer stores its weight as ``(in, out)``: PEFT's ``fan_in_fan_out``."""
    return isinstance(base_of(layer), Conv1D)


def is_supported(layer: nn.Module) -> bool:
    """Whether the base layer of ``layer`` is linear-like: Linear, Conv1D or a quantized linear layer."""
    base = base_of(layer)
    if isinstance(base, nn.Linear | Conv1D):
        return True
    backend = resolve_quantization_backend(base)
    return backend is not None and backend.layer_type == "linear"


def check_supported(layer: nn.Module, method: str) -> nn.Module:
    """The base layer of ``layer``, or a ``TypeError`` naming it and the supported kinds."""
    base = base_of(layer)
    if is_supported(base):
        return base
    raise TypeError(
        f"{method} cannot adapt a {type(base).__module__}.{type(base).__name__}; supported layers are "
        f"{SUPPORTED_LAYERS}. Adjust `target_modules` / `exclude_modules`."
    )
