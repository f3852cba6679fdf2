"""Export a SoRA / group-sparse LoRA adapter as a plain PEFT LoRA adapter, dropping the switched-off ranks.

This is the single pruning path of both methods: rank ``i`` of a module survives iff its gate is non-zero and
row ``i`` of A and column ``i`` of B are non-zero. The gate is folded into B (``B' = B·diag(g)``), the scaling is
kept (``lora_alpha' = s·r'``, so continued training behaves as before) and every module gets its own rank through
``rank_pattern``/``alpha_pattern``. The result is an ordinary ``LoraConfig`` checkpoint: vanilla PEFT loads it with
``PeftModel.from_pretrained`` without importing sparse_peft, and its outputs equal the gated model's up to float
rounding (fp32: ~1e-6).
"""

from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from .tuners._lowrank import SparseLowRankConfig, SparseLowRankLayer
from .tuners.sparse_delta.layer import PEFT_PREFIX

__all__ = ["LoraExport", "export_to_lora", "to_lora_state_dict"]


@dataclass
class LoraExport:
    """What :func:`export_to_lora` wrote."""

    config: LoraConfig
    ranks: dict[str, int] = field(
        default_factory=dict
    )  # exported rank per module (names relative to the base model)
    original_ranks: dict[str, int] = field(default_factory=dict)
    dropped_modules: list[str] = field(default_factory=list)  # modules whose every rank was switched off

    @property
    def kept_fraction(self) -> float:
        """Exported ranks over starting ranks, summed over modules."""
        total = sum(self.original_ranks.values())
        return sum(self.ranks.values()) / total if total else 0.0


def _target_modules(model: nn.Module, names: list[str]) -> set[str] | str:
    """The exported module names; an anchored regex instead if a plain name would also suffix-match another module."""
    wanted = set(names)
    suffixes = tuple("." + n for n in wanted)
    all_names = [n.removeprefix(PEFT_PREFIX) for n, _ in model.named_modules()]
    if any(n not in wanted and n.endswith(suffixes) for n in all_names):
        return "^(?:" + "|".join(re.escape(n) for n in sorted(wanted)) + ")$"
    return wanted


@torch.no_grad()
def to_lora_state_dict(
    model: nn.Module, adapter_name: str = "default"
) -> tuple[LoraExport, dict[str, torch.Tensor]]:
    """The LoRA config and checkpoint state dict equivalent to one SoRA / group-sparse LoRA adapter (nothing written)."""
    peft_config = getattr(model, "peft_config", {}).get(adapter_name)
    if not isinstance(peft_config, SparseLowRankConfig):
        raise TypeError(
            f"export_to_lora needs a SORA or GROUP_SPARSE_LORA adapter named {adapter_name!r}; "
            f"found {type(peft_config).__name__}."
        )
    if getattr(peft_config, "group_by", "rank") in ("row", "column"):
        warnings.warn(
            f"group_by={peft_config.group_by!r}: the LoRA export is exact, but LoRA cannot drop channels, so the "
            "zeroed rows/columns are stored as zeros (only switched-off ranks are removed).",
            stacklevel=2,
        )
    lora_weights: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    original_ranks: dict[str, int] = {}
    dropped: list[str] = []
    scalings: dict[str, float] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, SparseLowRankLayer) or adapter_name not in layer.r:
            continue
        rel = name.removeprefix(PEFT_PREFIX)
        key = name if name.startswith(PEFT_PREFIX) else PEFT_PREFIX + name
        original_ranks[rel] = layer.r[adapter_name]
        keep = layer.active_ranks(adapter_name)
        if keep.numel() == 0:
            dropped.append(rel)
            continue
        a, b = layer.effective_factors(adapter_name)
        lora_weights[f"{key}.lora_A.weight"] = a.detach()[keep].contiguous()
        lora_weights[f"{key}.lora_B.weight"] = b.detach()[:, keep].contiguous()
        ranks[rel] = int(keep.numel())
        scalings[rel] = layer.scaling[adapter_name]
    if not ranks:
        raise ValueError(
            f"Every rank of adapter {adapter_name!r} is switched off ({len(dropped)} modules): "
            "there is no LoRA to export (lower sparse_lambda?)."
        )

    default_rank = Counter(ranks.values()).most_common(1)[0][0]
    default_scaling = Counter(scalings.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(n): r for n, r in ranks.items() if r != default_rank}
    alpha_pattern = {
        re.escape(n): scalings[n] * r
        for n, r in ranks.items()
        if r != default_rank or scalings[n] != default_scaling
    }
    bias = peft_config.bias if peft_config.bias in ("none", "all") else "lora_only"
    config = LoraConfig(
        r=default_rank,
        lora_alpha=default_scaling * default_rank,
        target_modules=_target_modules(model, list(ranks)),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        lora_dropout=peft_config.lora_dropout,
        fan_in_fan_out=peft_config.fan_in_fan_out,
        bias=bias,
        modules_to_save=peft_config.modules_to_save,
        task_type=peft_config.task_type,
        base_model_name_or_path=peft_config.base_model_name_or_path,
        revision=peft_config.revision,
        inference_mode=True,
    )

    # everything that is not a factor of our layers (modules_to_save, trained biases) is copied as PEFT saves it
    own = tuple({f".{m.prefix}" for m in model.modules() if isinstance(m, SparseLowRankLayer)})
    saved = get_peft_model_state_dict(model, adapter_name=adapter_name)
    rest = {k: v for k, v in saved.items() if not any(p in k for p in own)}
    report = LoraExport(config=config, ranks=ranks, original_ranks=original_ranks, dropped_modules=dropped)
    return report, {**rest, **lora_weights}


def export_to_lora(
    model: nn.Module, save_directory: str | os.PathLike, adapter_name: str = "default"
) -> LoraExport:
    """Write ``adapter_name`` of a SoRA / group-sparse LoRA ``PeftModel`` as a plain LoRA adapter to ``save_directory``.

    Ranks whose gate (or whose whole rank group) is exactly zero are dropped, the gate is folded into B and each
    module keeps its own rank via ``rank_pattern``. Load the result with vanilla PEFT:
    ``PeftModel.from_pretrained(base, save_directory)`` (no ``import sparse_peft`` needed).
    """
    report, state_dict = to_lora_state_dict(model, adapter_name)
    path = Path(save_directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(path / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    report.config.save_pretrained(str(path))
    return report
