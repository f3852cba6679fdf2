"""The S2FT layer: a sparse-delta layer whose support is whole input columns or output rows (a structured slice).

It stores the selected channel ids (a few ints) instead of k flat indices, derives the flat indices from them, and
computes the delta densely on the slice: the fused path saves only ``x[..., channels]`` for input-side slices and
forms a block-sized gradient; the separate path is a small dense matmul. Everything else (merge, bit-exact
unmerge, several adapters, compose, hot-swap) is the sparse-delta core's.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from sparse_peft import triton_ops

from ...indices import validate_indices
from ..sparse_delta.layer import SparseDeltaLinear
from .architecture import ROLE_AXIS


class S2FTLinear(SparseDeltaLinear):
    """Structured sparse delta on one linear-like layer: channels along one storage axis."""

    # The sparse-delta core's containers under S2FT's own prefix (PEFT recognises a method's tensors by it). The flat
    # indices are derived from the channel ids, so only the channels are saved.
    values_name = "s2ft_values"
    indices_name = "s2ft_indices"
    indices_persistent = False
    adapter_layer_names = ("s2ft_values",)
    other_param_names = ("s2ft_indices", "s2ft_channels", "scaling", "fused_mode", "needs_calibration", "sparse_schedule")

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, role: str, fan_in_fan_out: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(base_layer, adapter_name, fan_in_fan_out=fan_in_fan_out, **kwargs)
        self.s2ft_channels = BufferDict({}, persistent=True)
        self.s2ft_role = role
        logical = ROLE_AXIS[role]
        # storage axis the channels index: Linear (out, in) -> in = 1; Conv1D (in, out) -> in = 0
        self.s2ft_axis = (0 if fan_in_fan_out else 1) if logical == "in" else (1 if fan_in_fan_out else 0)

    @property
    def axis_size(self) -> int:
        """Number of channels along the sliced axis."""
        return self.storage_shape[self.s2ft_axis]

    def check_channels(self, channels: torch.Tensor, where: str) -> torch.Tensor:
        """Validate channel ids (integer, 1-D, sorted, unique, in range) before they touch the weight."""
        return validate_indices(channels, self.axis_size, where=where, kind="channel ids").long()

    def set_channels(
        self,
        adapter_name: str,
        channels: torch.Tensor,
        values: torch.Tensor | None = None,
        init_weights: bool = True,
        fused: bool = True,
        needs_calibration: bool = False,
        seed: int = 0,
        inference_mode: bool = False,
    ) -> None:
        """Create or re-select adapter ``adapter_name`` on these channels (values reset unless given)."""
        channels = self.check_channels(channels, f"s2ft adapter '{adapter_name}'")
        indices = triton_ops.slice_flat_indices(self.storage_shape, self.s2ft_axis, channels)
        if adapter_name in self.support_values and adapter_name in self.scaling:
            self.set_adapter_indices(adapter_name, indices, init_weights=init_weights, seed=seed, values=values)
            self.needs_calibration[adapter_name] = needs_calibration
        else:
            self.update_layer(
                adapter_name,
                indices,
                init_weights=init_weights,
                fused=fused,
                needs_calibration=needs_calibration,
                seed=seed,
                inference_mode=inference_mode,
                values=values,
                checked=True,  # the flat indices of checked channels
            )
        self.s2ft_channels[adapter_name] = channels.to(device=indices.device, dtype=torch.int32)

    def channels(self, adapter_name: str) -> torch.Tensor:
        return self.s2ft_channels[adapter_name].long()

    def _structure(self, name: str) -> dict[str, Any]:
        return {"axis": self.s2ft_axis, "channels": self.channels(name)}

    def _delta_forward(self, name: str, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return triton_ops.structured_delta_linear(
            x, values, self.s2ft_axis, self.channels(name), self.storage_shape, self.fan_in_fan_out
        )

    def __repr__(self) -> str:
        return f"s2ft[{self.s2ft_role}]." + super().__repr__()
