"""Fast adapter switching in fused form: the active adapter lives merged in the base weights.

For sparse adapters (SPARSE_DELTA, S2FT) a switch is an O(nnz) scatter that writes the saved originals back
(bit-exact) and the next adapter's merged entries in. A per-adapter switch plan (the base entries under the
adapter and those entries with the delta added, computed once with the merge's own arithmetic) turns each switch into
two index copies per weight, with no per-module PEFT bookkeeping: memory speed. Entries that fill aligned runs of
16 (``SparseDeltaConfig(block_size=16)``, S2FT's head columns) are copied as whole rows of a ``(-1, 16)`` view of
the weight, one index per run, so a switch touches only the cache lines it changes. The weight tensors are updated
in place, so the :meth:`AdapterSwitcher.serving_model` (the bare architecture sharing those tensors) can be
``torch.compile``d once and never recompiles on a switch. The same calls work for any PEFT adapter that can merge
(LoRA, SoRA, group-sparse LoRA), at their own cost. One lock serialises every state change and
the forward passes that depend on it, so concurrent callers never run on another caller's adapter.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from . import triton_ops
from .triton_ops.torch_ops import RUN
from .tuners.sparse_delta.layer import SparseDeltaLayer

BASE = "base"
"""Name that selects the bare base model (no adapter)."""


@dataclass(frozen=True)
class _Write:
    """One index copy of a switch: ``target.index_copy_(0, index, merged or originals)``."""

    target: torch.Tensor
    index: torch.Tensor
    originals: torch.Tensor
    merged: torch.Tensor


@dataclass(frozen=True)
class _Entry:
    layer: SparseDeltaLayer
    flat_weight: torch.Tensor  # a flat view of the live base weight
    indices: torch.Tensor  # int64, sorted
    originals: torch.Tensor  # the base entries under the adapter (in index order: the layer's own unmerge reads it)
    writes: tuple[_Write, ...]  # whole aligned runs, then the remaining single entries
    version: int  # of the adapter's values when the plan was made: a trained adapter gets a new plan

    def on_live_weight(self) -> bool:
        """The layer still holds the weight storage this entry writes into (moving the model replaces it)."""
        return self.layer.get_base_layer().weight.data_ptr() == self.flat_weight.data_ptr()


def _writes(flat: torch.Tensor, indices: torch.Tensor, originals: torch.Tensor,
            merged: torch.Tensor) -> tuple[_Write, ...]:  # fmt: skip
    """Split a weight's entries into whole aligned runs of ``RUN`` (one row of the ``(-1, RUN)`` view each) and
    the rest. A support made only of runs (or only of single entries) is written from views of the plan's tensors;
    a mixed one keeps each part as its own copy."""
    if flat.numel() % RUN or indices.numel() < RUN:
        return (_Write(flat, indices, originals, merged),)
    run_ids, counts = torch.unique_consecutive(indices // RUN, return_counts=True)
    whole = counts == RUN  # sorted unique indices: a run with RUN entries is the whole aligned run
    if not bool(whole.any()):
        return (_Write(flat, indices, originals, merged),)
    rows = flat.view(-1, RUN)
    if bool(whole.all()):
        return (_Write(rows, run_ids, originals.view(-1, RUN), merged.view(-1, RUN)),)
    in_run = torch.repeat_interleave(whole, counts)
    rest = ~in_run
    return (
        _Write(rows, run_ids[whole], originals[in_run].view(-1, RUN), merged[in_run].view(-1, RUN)),
        _Write(flat, indices[rest], originals[rest], merged[rest]),
    )


def _switch_plan(model: PeftModel, name: str) -> list[_Entry] | None:
    """Per weight, what activating sparse adapter ``name`` writes; None when the fast path does not apply (other
    adapter types, quantized or non-float bases)."""
    entries = []
    for module in model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if not isinstance(module, SparseDeltaLayer) or module.is_quantized:
            return None
        if name not in module.support_values:
            continue
        weight = module.get_base_layer().weight
        if not weight.is_floating_point() or not weight.is_contiguous():
            return None
        flat = weight.data.view(-1)
        indices = module.support_indices[name].long()
        originals = triton_ops.gather(flat, indices)
        merged = originals.clone()
        triton_ops.scatter_add_(merged, torch.arange(merged.numel(), device=merged.device),
                                module.delta_values(name).detach())
        writes = _writes(flat, indices, originals, merged)
        entries.append(_Entry(module, flat, indices, originals, writes, module.support_values[name]._version))
    return entries


class AdapterSwitcher:
    """Keeps at most one adapter of ``model`` merged, and switches between them under a lock."""

    def __init__(self, model: PeftModel) -> None:
        if not isinstance(model, PeftModel):
            raise TypeError(f"AdapterSwitcher needs a peft.PeftModel, got {type(model).__name__}.")
        self.model = model
        self.lock = threading.RLock()
        self.active: str = BASE
        self.last_switch_s: float = 0.0
        self._plans: dict[str, list[_Entry] | None] = {}
        if any(getattr(m, "merged", False) for m in model.modules()):
            model.unmerge_adapter()

    @property
    def adapters(self) -> list[str]:
        return list(self.model.peft_config)

    def activate(self, name: str) -> float:
        """Make ``name`` (an adapter, or :data:`BASE`) the merged one; return the switch time in seconds."""
        with self.lock:
            if name != BASE and name not in self.model.peft_config:
                raise KeyError(f"No adapter named {name!r}; available: {self.adapters}.")
            if name == self.active:
                return 0.0
            tick = time.perf_counter()
            if self.active != BASE:
                leaving = self._plan(self.active)
                if leaving is not None and self._plan_is_merged(self.active, leaving):
                    self._write(self.active, leaving, merge=False)
                else:
                    self.model.unmerge_adapter()
            if name != BASE:
                entering = self._plan(name)  # made (or refreshed) on the base weights: nothing is merged now
                if entering is not None:
                    self._write(name, entering, merge=True)
                else:
                    self.model.set_adapter(name)
                    self.model.merge_adapter()
            self.active = name
            self.last_switch_s = time.perf_counter() - tick
            return self.last_switch_s

    def _plan(self, name: str) -> list[_Entry] | None:
        """The cached switch plan of ``name`` (rebuilt while it is not merged, if its values changed since)."""
        if name == BASE:
            return None
        plan = self._plans.get(name)
        stale = plan is not None and not all(self._current(name, e) for e in plan)
        if name not in self._plans or (stale and name != self.active):
            plan = self._plans[name] = _switch_plan(self.model, name)
        return plan

    @staticmethod
    def _current(name: str, entry: _Entry) -> bool:
        """The plan entry still describes the layer: same weight storage, same adapter values."""
        return entry.on_live_weight() and entry.layer.support_values[name]._version == entry.version

    def _plan_is_merged(self, name: str, plan: list[_Entry]) -> bool:
        """Whether ``name`` is merged exactly as its plan wrote it (nobody merged, unmerged or moved the weights
        behind our back); otherwise the layers' own unmerge restores it."""
        return all(
            e.layer.merged_adapters == [name] and e.on_live_weight() for e in plan
        )

    def _write(self, name: str, plan: list[_Entry], merge: bool) -> None:
        """One or two index copies per weight, and the layers' own merge bookkeeping kept exact, so PEFT's
        ``unmerge_adapter`` / ``merge_and_unload`` and the layers' forwards see a normal merged adapter."""
        for entry in plan:
            layer = entry.layer
            for write in entry.writes:
                write.target.index_copy_(0, write.index, write.merged if merge else write.originals)
            if merge:
                layer.merged_adapters.append(name)
                layer._merge_originals[name] = entry.originals  # only read (by an unmerge)
                layer._active_adapter = name
            else:
                layer.merged_adapters.remove(name)
                layer._merge_originals.pop(name, None)
        if merge:
            self.model.base_model.active_adapter = name

    @contextmanager
    def using(self, name: str) -> Iterator[PeftModel]:
        """Hold the lock with ``name`` active: everything run inside sees exactly that adapter (or the base)."""
        with self.lock:
            self.activate(name)
            if name == BASE:  # nothing merged; make sure no unmerged adapter runs either
                with self.model.disable_adapter():
                    yield self.model
            else:
                yield self.model

    def remove(self, name: str) -> None:
        """Delete adapter ``name`` (unmerging it first if it is the active one)."""
        with self.lock:
            if self.active == name:
                self.activate(BASE)
            self.model.delete_adapter(name)

    def serving_model(self) -> nn.Module:
        """The base architecture without adapter wrappers, sharing every weight tensor with ``model``.

        It computes with whatever adapter is merged right now (the base when none is), at the base model's speed,
        and it has no adapter bookkeeping for ``torch.compile`` to guard on: compile it once and switch freely.
        Use it inside :meth:`using` (or after :meth:`activate`) and under the same lock when threads share it.
        """
        base = self.model.get_base_model()
        shared = {id(t): t for t in (*base.parameters(), *base.buffers())}
        view = copy.deepcopy(base, memo=shared)
        for name, module in list(view.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent_name, _, child = name.rpartition(".")
                parent = view.get_submodule(parent_name) if parent_name else view
                setattr(parent, child, module.get_base_layer())
        return view
