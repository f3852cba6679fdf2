"""SoRA tuner layer: LoRA factors plus a soft-thresholded gate."""

from __future__ import annotations

import torch
from torch import nn

from ...proximal import soft_threshold_
from .._lowrank import SparseLowRankLayer


class SoraLayer(SparseLowRankLayer):
    """``y = base(x) + s·sora_B(sora_gate ⊙ sora_A·x)``; the gate takes an L1 proximal step after each update."""

    prefix = "sora_"
    a_name = "sora_A"
    b_name = "sora_B"
    dropout_name = "sora_dropout"
    gate_name = "sora_gate"
    adapter_layer_names = ("sora_A", "sora_B", "sora_gate")
    other_param_names = ("r", "lora_alpha", "scaling", "sora_dropout", "sparse_schedule")
    no_decay_layer_names = ("sora_gate",)
    sparsity_unit = "ranks"

    def proximal_step(self, adapter_name: str, lr: float, lam: float) -> None:
        soft_threshold_(self.sora_gate[adapter_name], lr * lam)

    def penalized_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return [self.sora_gate[adapter_name]]

    def sparsity(self, adapter_name: str) -> tuple[int, int]:
        """Non-zero gates (at init B = 0, yet every rank is live: the gate is what switches a rank off)."""
        return int(torch.count_nonzero(self.sora_gate[adapter_name])), self.r[adapter_name]


class Linear(SoraLayer):
    """The module that wraps ``nn.Linear``, ``Conv1D`` and quantized linear layers."""
