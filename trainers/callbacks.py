"""Drive the sparse updates of sparse_peft adapters from transformers' ``Trainer`` (and TRL's trainers).

:class:`SparseUpdateCallback` is a thin dispatcher: each adapter family contributes a :class:`SparseHook`
(registered with :func:`register_hook`) that says what to do after an optimizer step, at the end of a step and what
to log. The built-in :class:`ProximalHook` serves SoRA and group-sparse LoRA; other families (e.g. dynamic sparse
masks with prune/regrow) add their own hook without touching the callback.

Two things a callback cannot do from inside the Trainer, :meth:`SparseUpdateCallback.attach` does:

* keep SoRA's gates out of weight decay from the moment the optimizer is built (the Trainer decides decay by
  parameter name, and regrouping an existing optimizer would break resuming from its checkpoint), and
* run before the reporting callbacks, so the logged sparsity reaches the console / TensorBoard and not only
  ``trainer.state.log_history``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sparse_peft.dynamic import DynamicMasks
from sparse_peft.proximal import (
    LearningRate,
    apply_proximal_step,
    no_weight_decay_parameters,
    penalized_parameters,
    sparsity_report,
)
from sparse_peft.sharding import check_editable, groups_with_parameters

__all__ = [
    "DynamicMaskHook",
    "ProximalHook",
    "SparseHook",
    "SparseUpdateCallback",
    "register_hook",
    "registered_hooks",
]


class SparseHook:
    """One adapter family's part of the training loop. All methods are optional no-ops; override what you need."""

    name: str = "sparse"

    def on_train_begin(self, model: nn.Module, optimizer: Any) -> None:
        """Called once before the first step."""

    def on_resume(self, model: nn.Module, completed_steps: int, state: dict[str, Any] | None) -> None:
        """Called after ``on_train_begin``: the step count (non-zero when resuming) and the saved hook state."""

    def state_dict(self) -> dict[str, Any] | None:
        """Training state that is not in the model or optimizer, saved with every Trainer checkpoint."""
        return None

    def on_optimizer_step(
        self, model: nn.Module, lr: LearningRate, step: int, total_steps: int | None
    ) -> None:
        """Called right after ``optimizer.step()`` (``step`` is its 0-based index; ``lr`` maps a parameter to its lr)."""

    def on_step_end(self, model: nn.Module, step: int, total_steps: int | None) -> None:
        """Called at the end of each optimizer step (``step`` counts completed steps)."""

    def logs(self, model: nn.Module) -> dict[str, float]:
        """Scalars to add to the Trainer's logs."""
        return {}


class ProximalHook(SparseHook):
    """SoRA / group-sparse LoRA: proximal step after each optimizer step; logs active ranks/groups per module."""

    name = "proximal"

    def __init__(self, log_per_module: bool = True) -> None:
        self.log_per_module = log_per_module
        self._lambdas: dict[str, float] = {}

    def on_train_begin(self, model: nn.Module, optimizer: Any) -> None:
        check_editable(penalized_parameters(model))  # refuse DeepSpeed ZeRO-3 before the first step, not after it

    def on_optimizer_step(
        self, model: nn.Module, lr: LearningRate, step: int, total_steps: int | None
    ) -> None:
        self._lambdas = apply_proximal_step(model, lr, step=step, total_steps=total_steps)

    def logs(self, model: nn.Module) -> dict[str, float]:
        report = sparsity_report(model)
        if not report:
            return {}
        active = sum(a for a, _ in report.values())
        total = sum(t for _, t in report.values())
        out: dict[str, float] = {
            "sparsity/active": active,
            "sparsity/active_fraction": active / max(total, 1),
        }
        for adapter, lam in self._lambdas.items():
            out[f"sparsity/lambda/{adapter}"] = lam
        if self.log_per_module:
            out.update({f"sparsity/{name}": a for name, (a, _) in report.items()})
        return out


class DynamicMaskHook(SparseHook):
    """Dynamic SPARSE_DELTA masks (SpIEL): prune/regrow after optimizer steps; logs the replaced entries."""

    name = "dynamic_mask"

    def __init__(self) -> None:
        self.masks: DynamicMasks | None = None
        self._last_replaced = 0

    def on_train_begin(self, model: nn.Module, optimizer: Any) -> None:
        masks = DynamicMasks(model, optimizer)
        self.masks = masks if masks.adapters() else None

    def on_resume(self, model: nn.Module, completed_steps: int, state: dict[str, Any] | None) -> None:
        if self.masks is None:
            return
        if state is not None:
            self.masks.load_state_dict(state)
        else:
            self.masks.begin(completed_steps)

    def on_optimizer_step(
        self, model: nn.Module, lr: LearningRate, step: int, total_steps: int | None
    ) -> None:
        if self.masks is None:
            return
        self.masks.total_steps = total_steps
        for stats in self.masks.step():
            self._last_replaced = stats.total_replaced

    def state_dict(self) -> dict[str, Any] | None:
        return self.masks.state_dict() if self.masks is not None else None

    def logs(self, model: nn.Module) -> dict[str, float]:
        if self.masks is None:
            return {}
        return {
            "sparsity/reselections": float(self.masks.reselections),
            "sparsity/last_replaced": float(self._last_replaced),
        }


_HOOKS: list[Callable[[], SparseHook]] = [ProximalHook, DynamicMaskHook]
HOOK_STATE_FILE = "sparse_peft_hooks.pt"
_PEERS = "_sparse_update_callbacks"  # TrainerState attribute (not a dataclass field, so never serialised)


def register_hook(factory: Callable[[], SparseHook]) -> None:
    """Make every new :class:`SparseUpdateCallback` run ``factory()`` too (idempotent)."""
    if factory not in _HOOKS:
        _HOOKS.append(factory)


def registered_hooks() -> list[SparseHook]:
    """Fresh instances of every registered hook."""
    return [factory() for factory in _HOOKS]


def _learning_rates(optimizer: Any) -> Callable[[nn.Parameter], float]:
    """Map a parameter to the lr its optimizer group used in the step just taken (0 if it is not optimized)."""
    table: dict[int, float] = {}
    for group, params in groups_with_parameters(optimizer):
        lr = float(group.get("lr", 0.0))
        for p in params:
            table[id(p)] = lr
    return lambda p: table.get(id(p), 0.0)


def _decayed(optimizer: Any, params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    wanted = {id(p) for p in params}
    return [
        p
        for group, group_params in groups_with_parameters(optimizer)
        if group.get("weight_decay", 0.0)
        for p in group_params
        if id(p) in wanted
    ]


def _load_hook_state(args: TrainingArguments, state: TrainerState) -> dict[str, Any]:
    """The hook state saved with the checkpoint the Trainer resumed from (empty for a fresh run)."""
    if not state.global_step:
        return {}
    path = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / HOOK_STATE_FILE
    return torch.load(path, weights_only=False) if path.is_file() else {}


class SparseUpdateCallback(TrainerCallback):
    """Applies every registered :class:`SparseHook` (by default: the proximal steps of SoRA / group-sparse LoRA).

    ``Trainer(..., callbacks=[SparseUpdateCallback()])`` works; ``SparseUpdateCallback.attach(trainer)`` is better
    (gates never weight-decayed, sparsity visible in every logger). It holds no training state of its own: gates,
    masks and factors are adapter weights (saved in checkpoints) and λ is a function of ``state.global_step``, so
    resuming from a checkpoint continues exactly.
    """

    # True for the instance `import trainers` adds to every Trainer (see trainers.integration)
    auto: bool = False

    def __init__(self, hooks: Sequence[SparseHook] | None = None) -> None:
        self.hooks: list[SparseHook] = list(hooks) if hooks is not None else registered_hooks()
        self._started = False
        self._active = False

    # ------------------------------------------------------------------------------------------------ set-up
    @classmethod
    def attach(cls, trainer: Trainer, hooks: Sequence[SparseHook] | None = None) -> SparseUpdateCallback:
        """Add the callback to ``trainer`` ahead of the reporting callbacks and exclude gates from weight decay."""
        existing = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SparseUpdateCallback)]
        # e.g. the one `import trainers` added to every Trainer: never run the hooks twice
        for cb in existing:
            trainer.callback_handler.callbacks.remove(cb)
        callback = cls(hooks) if hooks is not None or not existing else existing[0]
        trainer.callback_handler.callbacks.insert(0, callback)
        if getattr(trainer, "_sparse_peft_attached", False):
            return callback
        trainer._sparse_peft_attached = True  # type: ignore[attr-defined]
        original = trainer.get_decay_parameter_names

        def get_decay_parameter_names(model: nn.Module) -> list[str]:
            exempt = {id(p) for p in no_weight_decay_parameters(model)}
            names = original(model)
            skip = {n for n, p in model.named_parameters() if id(p) in exempt}
            return [n for n in names if n not in skip]

        trainer.get_decay_parameter_names = get_decay_parameter_names  # type: ignore[method-assign]
        return callback

    # ------------------------------------------------------------------------------------------------ events
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Several instances may sit in one Trainer (the automatic one plus one passed in `callbacks=[...]`): they
        # register here and, at their first event, elect one (an explicit one before the automatic one) to run the
        # hooks, so no proximal step or reselection ever happens twice.
        self._started = self._active = False
        state.__dict__.setdefault(_PEERS, []).append(self)

    def _start(self, args: TrainingArguments, state: TrainerState, kwargs: dict[str, Any]) -> bool:
        """Elect the active instance once per run and, if it is this one, start its hooks."""
        if self._started:
            return self._active
        self._started = True
        peers = state.__dict__.get(_PEERS)
        if not peers:  # events driven by hand, without on_train_begin: nothing to elect or start
            self._active = True
            return True
        explicit = [p for p in peers if not p.auto]
        self._active = self is (explicit[0] if explicit else peers[0])
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if not self._active or model is None:
            return self._active
        decayed = _decayed(optimizer, no_weight_decay_parameters(model))
        if decayed:
            warnings.warn(
                f"{len(decayed)} SoRA gate tensors are in an optimizer group with weight decay, which adds an L2 pull "
                "to their L1 proximal step. Use SparseUpdateCallback.attach(trainer) instead of callbacks=[...], or "
                "build the optimizer with sparse_peft.proximal.param_groups(model, weight_decay).",
                stacklevel=3,
            )
        saved = _load_hook_state(args, state)
        for hook in self.hooks:
            hook.on_train_begin(model, optimizer)
            hook.on_resume(model, state.global_step, saved.get(hook.name))
        return True

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._start(args, state, kwargs)  # before the first forward/backward: gradient hooks must be in place

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Write the hooks' own state next to the Trainer's checkpoint, so resuming continues exactly."""
        if not self._start(args, state, kwargs):
            return
        hook_state = {hook.name: hook.state_dict() for hook in self.hooks if hook.state_dict() is not None}
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if hook_state and folder.is_dir() and state.is_world_process_zero:
            torch.save(hook_state, folder / HOOK_STATE_FILE)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not self._start(args, state, kwargs):
            return
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None or optimizer is None or getattr(optimizer, "step_was_skipped", False):
            return  # e.g. fp16 overflow: no update was made, so no proximal step either
        lr = _learning_rates(optimizer)
        for hook in self.hooks:
            hook.on_optimizer_step(model, lr, state.global_step, state.max_steps or None)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs.get("model")
        if not self._start(args, state, kwargs) or model is None:
            return
        for hook in self.hooks:
            hook.on_step_end(model, state.global_step, state.max_steps or None)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        model = kwargs.get("model")
        if not self._start(args, state, kwargs) or model is None or logs is None:
            return
        extra: dict[str, float] = {}
        for hook in self.hooks:
            extra.update(hook.logs(model))
        logs.update(extra)
        # the Trainer appended a copy of `logs` to the history before calling us: keep the history complete too
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
