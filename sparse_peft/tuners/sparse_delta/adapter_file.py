"""Reading a saved sparse adapter (SPARSE_DELTA or S2FT) so that a load changes nothing unless every module passes.

PEFT loads an adapter in three steps: it reads the config (``PeftConfig.from_pretrained``), wraps the model / adds the
adapter name with a freshly initialised adapter (``inject_adapter``), then reads the weights and copies them in. A
file that does not fit the model was only noticed in the last step, leaving the model wrapped and the name
registered. Here the config remembers the local weights file it came with; the tuner reads it while injecting, takes
each module's support from it (nothing is drawn and thrown away), checks it against the injected layers, and on any
failure withdraws what it injected (:class:`InjectionUndo`) before the error reaches the user.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...indices import CorruptAdapterFileError
from .layer import PEFT_PREFIX

_SOURCE = "_sparse_peft_weights_file"


@dataclass
class ModuleRecord:
    """One module's saved tensors, in checkpoint form (keys without the adapter name)."""

    key: str  # checkpoint key of the module, e.g. "base_model.model.model.layers.0.mlp.down_proj"
    support: torch.Tensor  # flat indices or, block-coded, block ids (SPARSE_DELTA); channel ids (S2FT)
    values: torch.Tensor
    header: torch.Tensor | None  # integrity header (shape + checksums); None in files written before headers
    stored: dict[str, torch.Tensor] = field(default_factory=dict)  # the module's tensors as read from the file
    block_size: int = 1  # > 1: ``support`` holds the ids of aligned blocks of this many entries
    checked: torch.Tensor | None = None  # the support in canonical form once checked against its layer

    def same_tensors(self, stored: dict[str, torch.Tensor]) -> bool:
        """Whether ``stored`` (the same module read again) holds exactly this record's tensors."""
        return stored.keys() == self.stored.keys() and all(
            stored[k].dtype == v.dtype and torch.equal(stored[k], v) for k, v in self.stored.items()
        )

    @property
    def module(self) -> str:
        return self.key.removeprefix(PEFT_PREFIX)


def remember_weights_file(config: object, folder: str, subfolder: str | None) -> None:
    """Called by the configs' ``from_pretrained``: note the local ``adapter_model.safetensors`` next to the config
    (not serialised; a Hub id has no local file and keeps PEFT's own order of checks)."""
    weights = os.path.join(folder, subfolder or "", "adapter_model.safetensors")
    if os.path.isfile(weights):
        object.__setattr__(config, _SOURCE, weights)


def take_weights_file(config: object) -> str | None:
    """The file a config was loaded with, once: the injection that follows ``from_pretrained`` is the load."""
    return config.__dict__.pop(_SOURCE, None)


def read_adapter_file(path: str) -> dict[str, torch.Tensor]:
    """All tensors of an adapter file, or ``CorruptAdapterFileError`` naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise CorruptAdapterFileError(
            f"Cannot read adapter file {path}: it is truncated or not a valid safetensors file ({err}). "
            "Re-save or re-download the adapter."
        ) from err


class InjectionUndo:
    """What ``inject_adapter`` changes on a model, recorded before it runs, so a failed load can take it back:
    new adapter layers go (their base layers return to their parents), layers that already carried other adapters
    lose only the new one, and every parameter's ``requires_grad`` and the tuner's bookkeeping are as before."""

    def __init__(self, tuner: nn.Module, model: nn.Module) -> None:
        self.tuner, self.model = tuner, model
        self.layers_before = {id(m) for m in model.modules() if isinstance(m, BaseTunerLayer)}
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.targeted = list(getattr(tuner, "targeted_module_names", []))
        self.active = tuner.__dict__.get("active_adapter")

    def __call__(self, adapter_name: str) -> None:
        for name, module in list(self.model.named_modules()):
            if adapter_name not in getattr(module, "support_values", {}):
                continue
            if id(module) in self.layers_before:
                module.delete_adapter(adapter_name)
            else:
                parent_name, _, attr = name.rpartition(".")
                setattr(self.model.get_submodule(parent_name), attr, module.get_base_layer())
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)
        self.tuner.targeted_module_names = self.targeted
        if self.active is not None:
            self.tuner.active_adapter = self.active
