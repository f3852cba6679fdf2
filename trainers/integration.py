"""Give Trainers :class:`~sparse_peft.trainers.callbacks.SparseUpdateCallback`: one (:func:`attach`) or all (:func:`install`).

Nothing happens at import: changing how every Trainer in a process behaves is the user's decision, not a side effect
of an import. :func:`attach` is the explicit per-trainer form (it never adds a second callback, and keeps SoRA gates
out of that trainer's weight decay). :func:`install` is the one documented, reversible opt-in for code that builds
trainers it does not control (TRL's ``SFTTrainer(peft_config=SoraConfig(...))`` inside a script): every Trainer built
afterwards gets the callback from transformers' own list of default callbacks (so it runs before the reporting
callbacks and its sparsity logs reach every logger) and gates stay out of weight decay; :func:`uninstall` restores
transformers exactly. For models without sparse_peft adapters the hooks find nothing to do.
"""

from __future__ import annotations

from collections.abc import Sequence

import transformers.trainer as hf_trainer
from torch import nn
from transformers import Trainer

from sparse_peft.proximal import no_weight_decay_parameters

from .callbacks import SparseHook, SparseUpdateCallback

__all__ = ["AutoSparseUpdateCallback", "attach", "install", "installed", "uninstall"]

_ORIGINAL_DECAY = Trainer.get_decay_parameter_names


def _decay_without_gates(self: Trainer, model: nn.Module) -> list[str]:
    """Trainer's decay list minus the parameters sparse_peft's proximal steps own (SoRA gates)."""
    names = _ORIGINAL_DECAY(self, model)
    exempt = {id(p) for p in no_weight_decay_parameters(model)}
    if not exempt:
        return names
    skip = {n for n, p in model.named_parameters() if id(p) in exempt}
    return [n for n in names if n not in skip]


class AutoSparseUpdateCallback(SparseUpdateCallback):
    """The instance every Trainer gets from transformers' default callbacks; an explicit one takes precedence."""

    auto = True


def install() -> None:
    """Make every Trainer built from now on run SparseUpdateCallback and keep gates out of weight decay (idempotent)."""
    if AutoSparseUpdateCallback not in hf_trainer.DEFAULT_CALLBACKS:
        hf_trainer.DEFAULT_CALLBACKS.append(AutoSparseUpdateCallback)
    Trainer.get_decay_parameter_names = _decay_without_gates  # type: ignore[method-assign]


def uninstall() -> None:
    """Undo :func:`install` (trainers built afterwards need :func:`attach`)."""
    while AutoSparseUpdateCallback in hf_trainer.DEFAULT_CALLBACKS:
        hf_trainer.DEFAULT_CALLBACKS.remove(AutoSparseUpdateCallback)
    Trainer.get_decay_parameter_names = _ORIGINAL_DECAY  # type: ignore[method-assign]


def installed() -> bool:
    """Whether new Trainers get the callback automatically."""
    return AutoSparseUpdateCallback in hf_trainer.DEFAULT_CALLBACKS


def attach(trainer: Trainer, hooks: Sequence[SparseHook] | None = None) -> SparseUpdateCallback:
    """Give one trainer the callback explicitly (reuses an installed one; ``hooks`` replaces the default hooks)."""
    return SparseUpdateCallback.attach(trainer, hooks)
