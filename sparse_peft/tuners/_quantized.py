"""Dequantizing a bitsandbytes base weight correctly on every CPU.

On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight into a kernel-specific layout at its first
inference forward (``quant_state.packing_format_for_cpu``). Dequantizing that layout as if it were the standard
one gives wrong values, so merging, magnitude selection or S2FT's weight scores computed from it would be silently
wrong (a merge error as large as the adapter's own change was measured). We dequantize from an unpacked *copy*
(bitsandbytes' own inverse of the packing), leaving the layer's packed weight untouched so that an unmerge still
restores it bit-exactly.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _packed_for_cpu(weight: torch.Tensor | None) -> bool:
    state = getattr(weight, "quant_state", None)
    return state is not None and bool(getattr(state, "packing_format_for_cpu", False))


def dequantized(base_layer: nn.Module) -> torch.Tensor:
    """The dequantized weight of a bitsandbytes layer (a new tensor), whatever layout it is in."""
    from peft.utils.integrations import dequantize_module_weight

    weight = base_layer.weight
    if not _packed_for_cpu(weight):
        return dequantize_module_weight(base_layer)
    import bitsandbytes as bnb
    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

    data, state = _convert_weight_packed_for_cpu_inverse(weight.data.clone(), copy.deepcopy(weight.quant_state))
    return bnb.functional.dequantize_4bit(data, state)


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight of a PEFT tuner layer: the live tensor for float bases, a dequantized copy for quantized
    ones (CPU-packed 4-bit included)."""
    if _packed_for_cpu(getattr(layer.get_base_layer(), "weight", None)):
        return dequantized(layer.get_base_layer())
    return layer.get_base_weight()
