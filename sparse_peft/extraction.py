"""Turn a full fine-tune into a sparse adapter: keep the largest ``|θ − θ₀|`` entries (LT-SFT; RL fine-tunes
change small subnetworks, so their updates compress well).

Streams module by module: at most one extra dense difference matrix exists at a time. With
``budget="global"`` a first pass keeps only a running top-K of ``|θ − θ₀|`` over all modules (O(K) memory) to
find the global threshold, and a second pass extracts each module's entries above it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from .masks import sparse_delta_layers
from .tuners._support import top_k_indices
from .tuners.sparse_delta.config import SparseDeltaConfig, entries_for_density


@dataclass
class ExtractionReport:
    """How well the sparse adapter reproduces the fine-tune's weight change."""

    relative_error: float  # ‖Δ − Δ_sparse‖_F / ‖Δ‖_F over all targeted modules
    per_module_relative_error: dict[str, float] = field(default_factory=dict)
    nnz: int = 0
    density: float = 0.0
    untargeted_changed_params: list[str] = field(default_factory=list)  # changed weights outside the adapter


def _storage_weight(module: nn.Module) -> torch.Tensor:
    return module.weight.detach()


def extract_sparse_delta(
    base_model: nn.Module,
    finetuned_model: nn.Module,
    density: float = 0.01,
    target_modules: list[str] | str | None = "all-linear",
    budget: Literal["per_layer", "global"] = "per_layer",
    adapter_name: str = "default",
) -> PeftModel:
    """Return ``base_model`` wrapped as a PeftModel whose SPARSE_DELTA adapter holds the top ``|θ − θ₀|`` entries.

    Args:
        base_model (`nn.Module`): the model before fine-tuning; it is wrapped (not copied).
        finetuned_model (`nn.Module`): the fully fine-tuned model of the same architecture.
        density (`float`, *optional*, defaults to `0.01`): fraction of each targeted matrix (``per_layer``) or of
            all targeted entries together (``global``).
        target_modules (`list[str] | str | None`, *optional*, defaults to `"all-linear"`): modules to extract.
        budget (`str`, *optional*, defaults to `"per_layer"`): ``per_layer``, or ``global``, which spends the budget
            where the fine-tune changed most.
        adapter_name (`str`, *optional*, defaults to `"default"`): name of the extracted adapter.

    Returns:
        `PeftModel`: with ``model.extraction_report`` (an :class:`ExtractionReport`: relative error, nnz, changed
        parameters outside the targets).
    """
    if budget not in ("per_layer", "global"):
        raise ValueError(f"extract_sparse_delta: budget must be 'per_layer' or 'global', got {budget!r}.")
    finetuned = dict(finetuned_model.named_modules())
    ft_params = dict(finetuned_model.named_parameters())
    changed = [  # compared before wrapping, without copying anything
        n
        for n, p in base_model.named_parameters()
        if n in ft_params
        and (p.shape != ft_params[n].shape or not torch.equal(p.detach(), ft_params[n].detach().to(p.device)))
    ]
    config = SparseDeltaConfig(target_modules=target_modules, density=density, init_weights=True)
    model = get_peft_model(base_model, config, adapter_name=adapter_name)
    layers = sparse_delta_layers(model)
    for name in layers:
        other = finetuned.get(name)
        if other is None or _storage_weight(other).shape != layers[name].get_base_layer().weight.shape:
            raise ValueError(f"extract_sparse_delta: the fine-tuned model has no matching module {name!r}.")

    def difference(name: str) -> torch.Tensor:
        base_weight = layers[name].get_base_layer().weight.detach()
        return _storage_weight(finetuned[name]).to(base_weight.device, torch.float32) - base_weight.float()

    threshold = None
    if budget == "global":
        total = sum(layer.numel for layer in layers.values())
        keep = entries_for_density(density, total)
        running = torch.empty(0)
        for name in layers:  # pass 1: running global top-K of |Δ|
            running = torch.topk(
                torch.cat([running, difference(name).abs().flatten().cpu()]),
                min(keep, running.numel() + layers[name].numel),
            ).values
        threshold = running[-1].item()

    sq_err_total = sq_norm_total = 0.0
    per_module = {}
    nnz = 0
    with torch.no_grad():
        for name, layer in layers.items():  # pass 2: one dense difference at a time
            delta = difference(name)
            if threshold is None:
                indices = top_k_indices(delta.abs(), layer.support_values[adapter_name].numel())
            else:
                indices = torch.nonzero(delta.abs().flatten() >= threshold).flatten()
                if indices.numel() == 0:
                    indices = top_k_indices(delta.abs(), 1)
            values = delta.flatten()[indices]
            layer.set_adapter_indices(adapter_name, indices, values=values)
            layer.needs_calibration[adapter_name] = False
            sq_norm = delta.pow(2).sum().item()
            delta.view(-1)[indices] = 0.0  # what the adapter leaves out
            sq_err = delta.pow(2).sum().item()
            per_module[name] = math.sqrt(max(sq_err, 0.0) / sq_norm) if sq_norm > 0 else 0.0
            sq_err_total += max(sq_err, 0.0)
            sq_norm_total += sq_norm
            nnz += indices.numel()

    adapted_weights = {f"{name}.weight" for name in layers}
    untargeted = [n for n in changed if n not in adapted_weights]
    model.extraction_report = ExtractionReport(
        relative_error=math.sqrt(sq_err_total / sq_norm_total) if sq_norm_total > 0 else 0.0,
        per_module_relative_error=per_module,
        nnz=nnz,
        density=nnz / sum(layer.numel for layer in layers.values()),
        untargeted_changed_params=untargeted,
    )
    return model
