"""Activation- and gradient-based head/channel choice for S2FT from calibration batches."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from .._support import batch_loss, dense_grad_hooks
from ..sparse_delta.layer import sparse_delta_layers
from .layer import S2FTLinear
from .plan import channel_count


def _input_score_hooks(layer: S2FTLinear, score: torch.Tensor, by: str) -> list[Any]:
    """Accumulate a per-input-feature score: mean |x| (``activation``) or the column norm of dL/dW (``gradient``)."""
    if by == "activation":

        def on_forward(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, layer.in_features).float()
            score.add_(x.abs().mean(0))

        return [layer.register_forward_hook(on_forward)]

    def consume(dense_grad: torch.Tensor) -> None:  # storage layout; input features are Linear's columns
        score.add_(dense_grad.abs().sum(1 if layer.fan_in_fan_out else 0))

    return dense_grad_hooks(layer, consume)


def select_s2ft(
    model: nn.Module,
    batches: Iterable[Any],
    adapter_name: str = "default",
    selection: str | None = None,
    loss_fn: Any = None,
) -> dict[str, int]:
    """Choose each block's heads/channels by ``activation`` or ``gradient`` scores on calibration batches.

    Scores are read on the input features of the ``o`` (heads) and ``down`` (channels) projections; the
    matching v / up / gate rows follow. Values are reset to zero. Returns ``{module_name: trainable entries}``.
    """
    peft_model = model
    config = peft_model.peft_config[adapter_name]
    selection = selection or config.selection
    if selection not in ("activation", "gradient"):
        raise ValueError(f"select_masks(s2ft): selection must be 'activation' or 'gradient', got {selection!r}.")
    tuner = peft_model.base_model
    arch = tuner.architecture(config)
    layers = sparse_delta_layers(peft_model, adapter_name, kind=S2FTLinear)
    batches = list(batches) if not isinstance(batches, list | tuple) else batches
    if not batches:
        raise ValueError("select_masks: at least one calibration batch is needed.")
    scored = {n: m for n, m in layers.items() if m.s2ft_role in ("o", "down")}
    scores = {n: torch.zeros(m.in_features, device=m._weight_device()) for n, m in scored.items()}
    was_training = model.training
    model.train()
    grad_state = {n: p.requires_grad for n, p in model.named_parameters()}
    for layer in layers.values():
        layer.needs_calibration[adapter_name] = False
        layer.support_values[adapter_name].requires_grad_(True)
    try:
        with ExitStack() as stack:
            for n, layer in scored.items():
                for handle in _input_score_hooks(layer, scores[n], selection):
                    stack.callback(handle.remove)
            for batch in batches:
                if selection == "activation":
                    with torch.no_grad():
                        (loss_fn or batch_loss)(model, batch)
                else:
                    (loss_fn or batch_loss)(model, batch).backward()
    finally:
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(grad_state.get(n, p.requires_grad))
        model.train(was_training)
    block_scores: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for n, layer in scored.items():
        block = arch.block_of(n, layer.s2ft_role)
        heads, channels = block_scores.get(block, (torch.zeros(arch.num_heads), None))
        if layer.s2ft_role == "o":
            heads = scores[n].cpu().view(arch.num_heads, arch.head_dim).sum(1)
        else:
            channels = scores[n].cpu()
        block_scores[block] = (heads, channels)
    for block, (heads, channels) in block_scores.items():
        if channels is None:
            block_scores[block] = (heads, torch.zeros(0))
    plan = tuner.plan(config, adapter_name, scores=_complete(block_scores, tuner, config, adapter_name))
    for name, channels in plan.items():
        layers[name].set_channels(adapter_name, channels)
    return {name: layers[name].support_values[adapter_name].numel() for name in plan}


def _complete(
    block_scores: dict[str, tuple[torch.Tensor, torch.Tensor]], tuner: Any, config: Any, adapter_name: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Blocks whose o/down was not scored (e.g. only up rows targeted) fall back to zero scores of the right size."""
    modules = dict(tuner.model.named_modules())
    arch = tuner.architecture(config)
    result = {}
    for name, block in tuner.blocks(config, adapter_name).items():
        heads, channels = block_scores.get(name, (torch.zeros(arch.num_heads), torch.zeros(0)))
        n_channels = channel_count(block, modules.__getitem__)
        if channels.numel() != n_channels:
            channels = torch.zeros(n_channels)
        result[name] = (heads, channels)
    return result
