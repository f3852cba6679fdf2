"""Fast adapter switching in fused form: the active adapter lives merged in the base weights.

For sparse adapters (SPARSE_DELTA, S2FT) a switch is an O(nnz) scatter: ``unmerge`` writes the saved originals
back (bit-exact), ``merge`` adds the next adapter's values. The weight tensors are updated in place, so the
:meth:`AdapterSwitcher.serving_model` (the bare architecture sharing those tensors) can be ``torch.compile``d once
and never recompiles on a switch. The same calls work for any PEFT adapter
that can merge (LoRA, SoRA, group-sparse LoRA), at their own cost. One lock serialises every state change and
the forward passes that depend on it, so concurrent callers never run on another caller's adapter.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

BASE = "base"
"""Name that selects the bare base model (no adapter)."""


class AdapterSwitcher:
    """Keeps at most one adapter of ``model`` merged, and switches between them under a lock."""

    def __init__(self, model: PeftModel) -> None:
        if not isinstance(model, PeftModel):
            raise TypeError(f"AdapterSwitcher needs a peft.PeftModel, got {type(model).__name__}.")
        self.model = model
        self.lock = threading.RLock()
        self.active: str = BASE
        self.last_switch_s: float = 0.0
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
                self.model.unmerge_adapter()
            if name != BASE:
                self.model.set_adapter(name)
                self.model.merge_adapter()
            self.active = name
            self.last_switch_s = time.perf_counter() - tick
            return self.last_switch_s

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
