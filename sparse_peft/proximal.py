"""Proximal steps for sparsity-inducing penalties, shared by SoRA and group-sparse LoRA.

Both methods add a non-smooth penalty to the loss (``λ‖g‖₁`` on SoRA's gates, ``λ Σ_g √|g|·‖θ_g‖₂`` on LoRA
groups). A plain gradient step never lands exactly on zero, so after every optimizer step the penalised tensors get
the *proximal* step of the penalty instead (step size = the optimizer's learning rate η):

* soft-threshold (L1):        ``g ← sign(g)·max(|g| − ηλ, 0)``
* block soft-threshold (L2,1): ``θ_g ← θ_g·max(0, 1 − ηλ√|g| / ‖θ_g‖)``

These are the exact proximal operators, so a coordinate/group below the threshold becomes exactly 0 and one above it
moves towards 0 by exactly ``ηλ`` (in norm, for groups). λ can follow a sparsifying schedule (:class:`LambdaSchedule`).

Entry points: :func:`apply_proximal_step` for custom training loops (``trainers.SparseUpdateCallback`` calls it for
the Trainer), :func:`sparsity_report` for the active ranks/groups per module, :func:`param_groups` to build an
optimizer that keeps gates out of weight decay.
"""

from __future__ import annotations

import math
import warnings
from abc import abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .sharding import check_editable, editing

FORWARDS_BEFORE_WARNING = 64
"""Training forwards without a proximal step before :meth:`ProximalLayer.note_training_forward` warns (more than any
usual gradient accumulation between two optimizer steps)."""
LambdaScheduleKind = Literal["constant", "linear", "log_linear", "exponential"]
LAMBDA_SCHEDULES: tuple[str, ...] = ("constant", "linear", "log_linear", "exponential")

__all__ = [
    "LAMBDA_SCHEDULES",
    "LambdaSchedule",
    "ProximalLayer",
    "apply_proximal_step",
    "block_soft_threshold_",
    "group_norms",
    "no_weight_decay_parameters",
    "param_groups",
    "penalized_parameters",
    "soft_threshold_",
    "sparsity_report",
]


# --------------------------------------------------------------------------------------------------- operators
@torch.no_grad()
def soft_threshold_(tensor: torch.Tensor, threshold: float) -> torch.Tensor:
    """In place ``t ← sign(t)·max(|t| − threshold, 0)``: the proximal operator of ``threshold·‖t‖₁``.

    Computed in float32 (then written back) so that small thresholds are not lost on half-precision tensors.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    work = tensor.detach().float()
    shrunk = torch.sign(work) * torch.clamp(work.abs() - threshold, min=0.0)
    tensor.copy_(shrunk.to(tensor.dtype))
    return tensor


@torch.no_grad()
def group_norms(parts: Sequence[tuple[torch.Tensor, int | None]]) -> torch.Tensor:
    """Float32 L2 norm of every group; ``parts`` as in :func:`block_soft_threshold_`."""
    sq_norms: torch.Tensor | None = None
    for tensor, dim in parts:
        work = tensor.detach().float()
        if dim is None:
            sq = work.pow(2).sum().reshape(1)
        else:
            reduce = [d for d in range(work.dim()) if d != dim % work.dim()]
            sq = work.pow(2).sum(dim=reduce) if reduce else work.pow(2)
        sq_norms = sq if sq_norms is None else sq_norms + sq
    if sq_norms is None:
        raise ValueError("a group needs at least one tensor")
    return sq_norms.sqrt()


@torch.no_grad()
def block_soft_threshold_(parts: Sequence[tuple[torch.Tensor, int | None]], threshold: float) -> torch.Tensor:
    """In place ``θ_g ← θ_g·max(0, 1 − threshold/‖θ_g‖₂)``: the proximal operator of ``threshold·Σ_g ‖θ_g‖₂``.

    A group may span several tensors (a LoRA rank is row i of A *and* column i of B), so ``parts`` lists
    ``(tensor, group_dim)``: group ``i`` is the slice ``i`` along ``group_dim`` of every tensor (``None``: the whole
    tensor belongs to one single group). All parts must have the same number of groups. ``threshold`` is the full
    per-group threshold (for group lasso ``η·λ·√|g|``). Returns the group norms *after* the step (float32).
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    norms = group_norms(parts)
    # groups that are already 0 stay 0 (the proximal map of 0 is 0); avoid 0/0
    factors = torch.where(
        norms > threshold, 1.0 - threshold / norms.clamp_min(1e-30), torch.zeros_like(norms)
    )
    for tensor, dim in parts:
        if dim is None:
            tensor.mul_(factors.to(tensor.dtype).reshape(()))
        else:
            shape = [1] * tensor.dim()
            shape[dim % tensor.dim()] = -1
            tensor.mul_(factors.to(tensor.dtype).reshape(shape))
    return norms * factors


# --------------------------------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class LambdaSchedule:
    """λ as a function of the optimizer step: SoRA's sparsifying scheduler.

    λ is piecewise constant over ``num_stages`` stages of ``stage_steps`` steps each (the last stage lasts until the
    end) and rises from ``start`` to ``end``:

    * ``constant``: always ``start``;
    * ``linear``: evenly spaced values;
    * ``log_linear``: ``log`` of evenly spaced ``exp(λ)`` values (large first increments, then flattening);
    * ``exponential``: geometric spacing ``start·(end/start)^u`` (small first increments, then growing).

    With ``stage_steps=None`` the stages split ``total_steps`` (known to the Trainer) evenly.
    """

    start: float
    kind: LambdaScheduleKind = "constant"
    end: float | None = None
    num_stages: int = 1
    stage_steps: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in LAMBDA_SCHEDULES:
            raise ValueError(f"lambda schedule must be one of {LAMBDA_SCHEDULES}, got {self.kind!r}")
        if self.start < 0 or (self.end is not None and self.end < 0):
            raise ValueError("λ must be >= 0")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        if self.stage_steps is not None and self.stage_steps < 1:
            raise ValueError(f"stage_steps must be >= 1, got {self.stage_steps}")
        if self.kind != "constant":
            if self.end is None:
                raise ValueError(f"the {self.kind!r} lambda schedule needs an end value (lambda_max)")
            if self.kind == "exponential" and self.start == 0:
                raise ValueError("the 'exponential' lambda schedule needs a start λ > 0")

    def stage(self, step: int, total_steps: int | None = None) -> int:
        """Index of the stage that ``step`` (0-based optimizer step) falls into."""
        if self.kind == "constant" or self.num_stages == 1:
            return 0
        stage_steps = self.stage_steps
        if stage_steps is None:
            if not total_steps:
                raise ValueError("a staged lambda schedule needs stage_steps or the total number of steps")
            stage_steps = max(1, math.ceil(total_steps / self.num_stages))
        return min(step // stage_steps, self.num_stages - 1)

    def value(self, step: int, total_steps: int | None = None) -> float:
        """λ at optimizer step ``step``."""
        stage = self.stage(step, total_steps)
        if stage == 0 or self.end is None:
            return self.start
        u = stage / (self.num_stages - 1)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * u
        if self.kind == "log_linear":
            return math.log(math.exp(self.start) + (math.exp(self.end) - math.exp(self.start)) * u)
        return self.start * (self.end / self.start) ** u  # exponential


# --------------------------------------------------------------------------------------------------- layer protocol
class ProximalLayer:
    """Mixin for tuner layers whose adapters take a proximal step after each optimizer step.

    Implementations keep ``sparse_schedule[adapter] -> LambdaSchedule`` and list, in ``no_decay_layer_names``, the
    adapter attributes (``ParameterDict`` names) that must stay out of weight decay.
    """

    sparse_schedule: dict[str, LambdaSchedule]
    no_decay_layer_names: tuple[str, ...] = ()
    sparsity_unit: str = "groups"
    _forwards_without_step: int = 0

    def note_training_forward(self) -> None:
        """Count training forwards since the last proximal step and warn once they pile up: nothing then enforces the
        adapter's sparsity (a Trainer without ``sparse_peft.trainers.attach``/``install``, or a custom loop without
        :func:`apply_proximal_step`), which would otherwise go unnoticed."""
        if not (getattr(self, "training", False) and torch.is_grad_enabled()) or not self.proximal_adapters():
            return
        self._forwards_without_step += 1
        if self._forwards_without_step == FORWARDS_BEFORE_WARNING:
            warnings.warn(
                f"{FORWARDS_BEFORE_WARNING} training forwards of a sparsity-penalised adapter (SoRA, group-sparse LoRA "
                "or l1_lambda) without a proximal step: its penalty is not applied. Give the Trainer the callback "
                "(`sparse_peft.trainers.attach(trainer)`, or `sparse_peft.trainers.install()` once) or call "
                "`sparse_peft.proximal.apply_proximal_step` after each optimizer step.",
                UserWarning,
                stacklevel=3,
            )

    @abstractmethod
    def proximal_step(self, adapter_name: str, lr: float, lam: float) -> None:
        """Apply the proximal operator of the adapter's penalty with step size ``lr`` and strength ``lam``."""

    @abstractmethod
    def sparsity(self, adapter_name: str) -> tuple[int, int]:
        """``(active, total)`` ranks or groups of the adapter."""

    @abstractmethod
    def penalized_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The parameters the proximal step changes (their optimizer group supplies the learning rate)."""

    def proximal_adapters(self) -> list[str]:
        """Adapters that take a proximal step now: active, trainable and not merged into the base weight."""
        names = []
        for name in getattr(self, "active_adapters", []):
            if name not in self.sparse_schedule or name in getattr(self, "merged_adapters", []):
                continue
            if getattr(self, "disable_adapters", False):
                continue
            params = self.penalized_parameters(name)
            if params and all(p.requires_grad for p in params):
                names.append(name)
        return names


def _proximal_layers(model: nn.Module) -> Iterable[tuple[str, ProximalLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, ProximalLayer):
            yield name, module


LearningRate = float | Callable[[nn.Parameter], float]


@torch.no_grad()
def apply_proximal_step(
    model: nn.Module, lr: LearningRate, step: int = 0, total_steps: int | None = None
) -> dict[str, float]:
    """Take the proximal step on every SoRA gate / group-sparse LoRA group of ``model``; call after ``optimizer.step()``.

    ``lr`` is the step size the optimizer just used (a float, or a callable mapping a parameter to its group's lr);
    ``step`` is the 0-based index of the optimizer step just taken, which selects λ from each adapter's schedule.
    Only active, trainable, unmerged adapters are touched. Returns ``{adapter_name: λ}`` for the adapters stepped.
    """
    used: dict[str, float] = {}
    for _, layer in _proximal_layers(model):
        layer._forwards_without_step = 0
        for adapter in layer.proximal_adapters():
            params = layer.penalized_parameters(adapter)
            check_editable(params)  # before the lr: ZeRO-3 would read as lr 0
            lam = layer.sparse_schedule[adapter].value(step, total_steps)
            used[adapter] = lam
            if lam <= 0:
                continue
            step_size = lr(params[0]) if callable(lr) else float(lr)
            if step_size > 0:
                with editing(params):  # DeepSpeed ZeRO: its master copies too
                    layer.proximal_step(adapter, step_size, lam)
    return used


def sparsity_report(model: nn.Module, adapter_name: str | None = None) -> dict[str, tuple[int, int]]:
    """``{module name: (active, total)}`` ranks (SoRA, rank groups) or groups of one adapter (default: the active one)."""
    report: dict[str, tuple[int, int]] = {}
    prefix = "base_model.model."
    for name, layer in _proximal_layers(model):
        adapters = [adapter_name] if adapter_name is not None else list(getattr(layer, "active_adapters", []))
        for adapter in adapters:
            if adapter in layer.sparse_schedule:
                key = (
                    name.removeprefix(prefix)
                    if len(adapters) == 1
                    else f"{name.removeprefix(prefix)}[{adapter}]"
                )
                report[key] = layer.sparsity(adapter)
    return report


# --------------------------------------------------------------------------------------------------- weight decay
def penalized_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter that the next :func:`apply_proximal_step` edits (active, trainable, unmerged adapters)."""
    return [p for _, layer in _proximal_layers(model) for a in layer.proximal_adapters()
            for p in layer.penalized_parameters(a)]


def no_weight_decay_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that must not be weight-decayed: SoRA gates (decay would add an L2 pull to the L1 proximal step)."""
    params: list[nn.Parameter] = []
    for _, layer in _proximal_layers(model):
        for attr in layer.no_decay_layer_names:
            params.extend(getattr(layer, attr).values())
    return params


def param_groups(model: nn.Module, weight_decay: float, **group_kwargs: object) -> list[dict]:
    """Optimizer parameter groups for custom loops: gates and other 1-D parameters (biases, norms) get no decay.

    ``torch.optim.AdamW(param_groups(model, 0.01), lr=1e-3)``. Extra keyword arguments are copied into both groups.
    """
    exempt = {id(p) for p in no_weight_decay_parameters(model)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if id(p) in exempt or p.dim() < 2 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, **group_kwargs},
        {"params": no_decay, "weight_decay": 0.0, **group_kwargs},
    ]
