"""Sparse mask algebra (LT-SFT): the supports of sparse adapters as sets of flat indices per module.

A :class:`SparseMask` maps module names (as in ``base_model.named_modules()``, e.g.
``model.layers.0.self_attn.q_proj``) to sorted unique int64 flat indices into that module's weight storage, plus
the storage shape. Masks combine with ``|`` (union), ``&`` (intersection) and ``-`` (difference) and report
density and per-module overlap, so one can check how much two task adapters interfere before composing them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .indices import validate_indices
from .tuners.sparse_delta.layer import sparse_delta_layers


@dataclass(frozen=True)
class SparseMask:
    """Per-module sorted flat indices and storage shapes of a sparse support."""

    supports: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, idx in self.supports.items():
            if name not in self.shapes:
                raise ValueError(f"SparseMask: no shape given for module {name!r}.")
            rows, cols = self.shapes[name]
            self.supports[name] = validate_indices(
                idx, rows * cols, where=f"SparseMask module {name!r}"
            ).long()

    @classmethod
    def from_model(cls, model: nn.Module, adapter_name: str = "default") -> SparseMask:
        """The support of one sparse-delta adapter of ``model``."""
        layers = sparse_delta_layers(model, adapter_name)
        if not layers:
            raise ValueError(
                f"SparseMask.from_model: no sparse_delta adapter named {adapter_name!r} in the model."
            )
        return cls(
            {n: m.support_indices[adapter_name].detach().cpu().long() for n, m in layers.items()},
            {n: m.storage_shape for n, m in layers.items()},
        )

    # ------------------------------------------------------------------ algebra
    def _combine(self, other: SparseMask, op: str) -> SparseMask:
        for name in self.shapes.keys() & other.shapes.keys():
            if self.shapes[name] != other.shapes[name]:
                raise ValueError(
                    f"SparseMask: module {name!r} has shape {self.shapes[name]} vs {other.shapes[name]}."
                )
        shapes = {**other.shapes, **self.shapes}
        empty = torch.empty(0, dtype=torch.long)
        supports = {}
        names = self.supports.keys() | other.supports.keys() if op == "or" else self.supports.keys()
        for name in sorted(names):
            a, b = self.supports.get(name, empty), other.supports.get(name, empty)
            if op == "or":
                result = torch.unique(torch.cat([a, b]))
            elif op == "and":
                result = a[torch.isin(a, b)]
            else:
                result = a[~torch.isin(a, b)]
            if result.numel() or op == "or":
                supports[name] = result
        return SparseMask(supports, {n: shapes[n] for n in supports})

    def __or__(self, other: SparseMask) -> SparseMask:
        return self._combine(other, "or")

    def __and__(self, other: SparseMask) -> SparseMask:
        return self._combine(other, "and")

    def __sub__(self, other: SparseMask) -> SparseMask:
        return self._combine(other, "sub")

    union, intersection, difference = __or__, __and__, __sub__

    # ------------------------------------------------------------------ statistics
    @property
    def nnz(self) -> int:
        return sum(idx.numel() for idx in self.supports.values())

    def density(self) -> float:
        """Fraction of entries selected over all modules in the mask."""
        total = sum(r * c for r, c in self.shapes.values())
        return self.nnz / total if total else 0.0

    def density_per_module(self) -> dict[str, float]:
        return {n: idx.numel() / (self.shapes[n][0] * self.shapes[n][1]) for n, idx in self.supports.items()}

    def jaccard(self, other: SparseMask) -> dict[str, float]:
        """Per-module Jaccard overlap |A∩B| / |A∪B| (1.0 where both are empty)."""
        inter, union = self & other, self | other
        return {
            name: (inter.supports[name].numel() / idx.numel() if name in inter.supports else 0.0)
            if idx.numel()
            else 1.0
            for name, idx in union.supports.items()
        }

    def overlap(self, other: SparseMask) -> dict[str, float]:
        """Summary statistics of how two supports overlap."""
        inter, union = (self & other).nnz, (self | other).nnz
        return {
            "nnz_a": float(self.nnz),
            "nnz_b": float(other.nnz),
            "intersection": float(inter),
            "union": float(union),
            "jaccard": inter / union if union else 1.0,
            "fraction_of_a_shared": inter / self.nnz if self.nnz else 0.0,
            "fraction_of_b_shared": inter / other.nnz if other.nnz else 0.0,
        }

    # ------------------------------------------------------------------ use
    def apply(self, model: nn.Module, adapter_name: str) -> None:
        """Put adapter ``adapter_name`` on exactly this support (values reset to zero), e.g. to train a new
        adapter restricted to a given mask. Modules of the adapter absent from the mask are an error."""
        layers = sparse_delta_layers(model, adapter_name)
        missing = sorted(layers.keys() - self.supports.keys())
        if missing:
            raise ValueError(f"SparseMask.apply: the mask has no support for modules {missing}.")
        for name, layer in layers.items():
            if layer.storage_shape != self.shapes[name]:
                raise ValueError(
                    f"SparseMask.apply: module {name!r} is {layer.storage_shape}, mask says "
                    f"{self.shapes[name]}."
                )
            layer.set_adapter_indices(adapter_name, self.supports[name].to(layer._weight_device()))
            layer.needs_calibration[adapter_name] = False
