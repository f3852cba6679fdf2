"""Budgeting and head/channel choice per transformer block, shared by adapter creation and calibration."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .._base_layers import base_of, stores_in_out
from .._quantized import dequantized
from .._support import module_seed
from .architecture import CHANNEL_ROLES, HEAD_ROLES, Architecture
from .config import S2FTConfig


@dataclass
class Block:
    """One transformer block's role modules (name in the base model -> role) and its all-linear LoRA cost."""

    name: str
    modules: dict[str, str] = field(default_factory=dict)
    lora_cost_per_rank: int = 0  # sum of (in + out) over every linear layer of the block

    def module(self, role: str) -> str | None:
        return next((name for name, r in self.modules.items() if r == role), None)


@dataclass(frozen=True)
class BlockBudget:
    n_heads: int
    n_channels: int


def _weight_2d(module: nn.Module) -> torch.Tensor:
    """Logical (out, in) weight of a linear-like module (a view; dequantized copy for quantized bases)."""
    layer = base_of(module)
    weight = layer.weight if layer.weight.is_floating_point() else dequantized(layer)
    return weight.t() if stores_in_out(layer) else weight


def channel_count(block: Block, get: Callable[[str], nn.Module]) -> int:
    """FFN channels of a block: input features of ``down`` (or output features of ``up``/``gate``)."""
    down = block.module("down")
    if down is not None:
        return _weight_2d(get(down)).shape[1]
    for role in ("up", "gate"):
        name = block.module(role)
        if name is not None:
            return _weight_2d(get(name)).shape[0]
    return 0


def budget(block: Block, arch: Architecture, config: S2FTConfig, get: Callable[[str], nn.Module]) -> BlockBudget:
    """How many heads and channels this block trains under the config's budget."""
    has_heads = any(block.module(r) is not None for r in HEAD_ROLES) and arch.num_heads > 0
    n_total_channels = channel_count(block, get)
    if config.r is None:
        heads = round((config.heads_ratio or 0.0) * arch.num_heads) if has_heads else 0
        channels = round((config.channels_ratio or 0.0) * n_total_channels)
        return BlockBudget(heads, channels)
    head_cost = _head_cost(block, arch, config, get) if has_heads else 0
    channel_cost = _channel_cost(block, config, get) if n_total_channels else 0
    total = config.r * block.lora_cost_per_rank
    heads = 0
    if head_cost:
        share = total if not channel_cost else config.attention_fraction * total
        heads = min(arch.num_heads, max(0, round(share / head_cost)), total // head_cost)
    channels = min(n_total_channels, (total - heads * head_cost) // channel_cost) if channel_cost else 0
    if head_cost and channels == n_total_channels:  # FFN saturated: give what is left to heads
        heads = min(arch.num_heads, (total - channels * channel_cost) // head_cost)
    return BlockBudget(int(heads), int(channels))


def _head_cost(block: Block, arch: Architecture, config: S2FTConfig, get: Callable[[str], nn.Module]) -> int:
    cost = 0
    o = block.module("o")
    if o is not None:
        cost += _weight_2d(get(o)).shape[0] * arch.head_dim
    v = block.module("v")
    if v is not None and config.value_rows:  # upper bound: a KV head of its own; shared ones are refunded later
        cost += arch.head_dim * _weight_2d(get(v)).shape[1]
    return cost


def _channel_cost(block: Block, config: S2FTConfig, get: Callable[[str], nn.Module]) -> int:
    cost = 0
    down = block.module("down")
    if down is not None:
        cost += _weight_2d(get(down)).shape[0]
    if config.up_gate_rows:
        for role in ("up", "gate"):
            name = block.module(role)
            if name is not None:
                cost += _weight_2d(get(name)).shape[1]
    return cost


def top(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Sorted ids of the ``n`` largest scores (ties broken by position, deterministically)."""
    if n <= 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.sort(torch.topk(scores.float().cpu(), n, sorted=True).indices).values


def random_scores(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


def weight_scores(
    block: Block, arch: Architecture, get: Callable[[str], nn.Module], n_channels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head and channel scores by the norm of the slices they would train."""
    heads = torch.zeros(arch.num_heads)
    o = block.module("o")
    if o is not None and arch.num_heads:
        cols = _weight_2d(get(o)).detach().float().pow(2).sum(0)
        heads += cols.view(arch.num_heads, arch.head_dim).sum(1).sqrt().cpu()
    channels = torch.zeros(n_channels)
    down = block.module("down")
    if down is not None:
        channels += _weight_2d(get(down)).detach().float().pow(2).sum(0).sqrt().cpu()
    else:
        for role in ("up", "gate"):
            name = block.module(role)
            if name is not None:
                channels += _weight_2d(get(name)).detach().float().pow(2).sum(1).sqrt().cpu()
    return heads, channels


def block_channels(
    block: Block, arch: Architecture, config: S2FTConfig, heads: torch.Tensor, channels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per role module, the logical channel ids it trains for the chosen heads and FFN channels."""
    result: dict[str, torch.Tensor] = {}
    d = arch.head_dim
    head_cols = (heads[:, None] * d + torch.arange(d)[None, :]).reshape(-1) if heads.numel() else heads
    kv = torch.unique(torch.tensor([arch.kv_head(int(h)) for h in heads], dtype=torch.long))
    v_rows = (arch.value_offset + kv[:, None] * d + torch.arange(d)[None, :]).reshape(-1) if kv.numel() else kv
    for name, role in block.modules.items():
        if role == "o":
            result[name] = head_cols
        elif role == "v":
            result[name] = v_rows if config.value_rows else torch.zeros(0, dtype=torch.long)
        elif role == "down":
            result[name] = channels
        elif role in CHANNEL_ROLES:
            result[name] = channels if config.up_gate_rows else torch.zeros(0, dtype=torch.long)
    return result


def choose(
    block: Block,
    arch: Architecture,
    config: S2FTConfig,
    get: Callable[[str], nn.Module],
    scores: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Channels per role module of one block: by the given scores, else by the config's static selection."""
    plan = budget(block, arch, config, get)
    n_channels = channel_count(block, get)
    if scores is None:
        if config.selection == "weight":
            scores = weight_scores(block, arch, get, n_channels)
        else:  # random, and the placeholder before calibration for activation/gradient
            seed = module_seed(config.seed, block.name)
            scores = (random_scores(arch.num_heads, seed), random_scores(n_channels, seed + 1))
    heads = top(scores[0], min(plan.n_heads, arch.num_heads))
    n_chosen = min(plan.n_channels, n_channels)
    v = block.module("v")
    if config.r is not None and config.value_rows and v is not None and heads.numel():
        # query heads sharing a KV head share its v rows: spend what that saves on FFN channels
        shared = heads.numel() - len({arch.kv_head(int(h)) for h in heads})
        refund = shared * arch.head_dim * _weight_2d(get(v)).shape[1]
        channel_cost = _channel_cost(block, config, get)
        if channel_cost:
            n_chosen = min(n_channels, n_chosen + refund // channel_cost)
    channels = top(scores[1], n_chosen)
    return block_channels(block, arch, config, heads, channels)
