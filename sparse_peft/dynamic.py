"""Dynamic sparse masks (SpIEL): periodically drop the weakest entries of a sparse delta and regrow new ones.

Every ``reselect_every`` optimizer steps, for each layer of a dynamic SPARSE_DELTA adapter: drop the fraction of
active entries with the smallest ``|Δ|`` and regrow as many inactive entries with the best score; regrown values
start at 0 and their optimizer state (Adam's moments, or any per-element state) is zeroed. The number of
trainable values never changes, so optimizers and compiled graphs keep their shapes.

Scores come from the ``regrow_window`` steps before each reselection, from each layer's dense gradient formed
transiently in a backward hook (one layer at a time; see :func:`sparse_peft.tuners._support.dense_grad_hooks`):

* ``gradient`` — accumulated ``|∂L/∂W|`` of candidate entries, kept as a bounded sparse candidate list (the top
  entries of each step, summed), so there is no dense per-weight state;
* ``momentum`` — SM3-style row and column accumulators (``O(rows + cols)`` per layer); an entry's score is
  ``min(row_i, col_j)``.

Under ``torch.distributed`` rank 0's choice is broadcast, so every rank holds identical indices. Under FSDP2
(``fully_shard``) the values and their optimizer state are sharded DTensors: a reselection works on their full
tensors (gathered, identical on every rank) and writes each rank's shard back; the index buffers are not sharded.
Use :class:`DynamicMasks` in a custom loop (``dyn.step()`` after each ``optimizer.step()``); the Trainer path is
``trainers.SparseUpdateCallback``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .masks import sparse_delta_layers
from .sharding import assign_in_place, check_editable, editing, element_states, full_tensor, set_element_state
from .tuners._support import dense_grad_hooks
from .tuners.sparse_delta.config import SparseDeltaConfig
from .tuners.sparse_delta.layer import SparseDeltaLayer

CANDIDATE_FACTOR = 2  # candidates kept per layer, relative to the most entries one reselection can replace


@dataclass
class _LayerScore:
    """Regrowth evidence of one layer collected during a window."""

    candidates: torch.Tensor | None = None  # gradient: sorted flat indices
    scores: torch.Tensor | None = None  # gradient: accumulated |grad| of the candidates
    rows: torch.Tensor | None = None  # momentum: SM3 row accumulator
    cols: torch.Tensor | None = None  # momentum: SM3 column accumulator
    steps: int = 0


@dataclass
class ReselectionStats:
    step: int
    fraction: float
    replaced: dict[str, int] = field(default_factory=dict)

    @property
    def total_replaced(self) -> int:
        return sum(self.replaced.values())


def _max_candidates(layer: SparseDeltaLayer, adapter: str, config: SparseDeltaConfig) -> int:
    k = layer.support_values[adapter].numel()
    most = k if config.reselect_first_full else math.ceil(config.reselect_fraction * k)
    return max(1, min(layer.numel - k, CANDIDATE_FACTOR * most))


def _accumulate_gradient(state: _LayerScore, grad: torch.Tensor, active: torch.Tensor, limit: int) -> None:
    """Add one step's ``|grad|`` to the candidates and admit this step's top inactive entries, keeping ``limit``.

    An entry admitted late misses its earlier steps' gradient: the list approximates the window's accumulated
    ``|grad|`` with O(limit) memory instead of a dense accumulator.
    """
    flat = grad.abs().flatten()
    flat[active] = -1.0
    top = torch.topk(flat, min(limit, flat.numel())).indices
    top = top[flat[top] >= 0]
    union = (
        top.sort().values if state.candidates is None else torch.unique(torch.cat([state.candidates, top]))
    )
    score = flat[union].clamp(min=0)
    if state.candidates is not None and state.candidates.numel():
        pos = torch.searchsorted(state.candidates, union).clamp(max=state.candidates.numel() - 1)
        found = state.candidates[pos] == union
        score[found] += state.scores[pos[found]]
    keep = torch.topk(score, min(limit, score.numel())).indices.sort().values
    state.candidates, state.scores = union[keep], score[keep]


def _accumulate_momentum(state: _LayerScore, grad: torch.Tensor) -> None:
    """SM3: ``ν = min(row_i, col_j) + g²``; ``row = max_j ν``, ``col = max_i ν``."""
    sq = grad.pow(2)
    if state.rows is None:
        nu = sq
    else:
        nu = torch.minimum(state.rows[:, None], state.cols[None, :]) + sq
    state.rows, state.cols = nu.amax(dim=1), nu.amax(dim=0)


def _regrow_choice(
    state: _LayerScore, active: torch.Tensor, n: int, shape: tuple[int, int], regrow: str
) -> torch.Tensor:
    """The n best-scoring inactive flat indices."""
    if regrow == "momentum":
        if state.rows is None:
            return torch.empty(0, dtype=torch.long, device=active.device)
        score = torch.minimum(state.rows[:, None], state.cols[None, :]).flatten()
        score[active] = -1.0
        top = torch.topk(score, min(n, score.numel())).indices
        return top[score[top] >= 0]
    if state.candidates is None:
        return torch.empty(0, dtype=torch.long, device=active.device)
    valid = ~torch.isin(state.candidates, active)
    cands, scores = state.candidates[valid], state.scores[valid]
    return cands[torch.topk(scores, min(n, scores.numel())).indices]


def _broadcast(indices: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(indices, src=0)
    return indices


@torch.no_grad()
def replace_support(
    layer: SparseDeltaLayer, adapter: str, new_indices: torch.Tensor, optimizer: Any = None
) -> int:
    """Move adapter ``adapter`` of ``layer`` onto ``new_indices`` (same count), in place.

    Kept entries keep their values and optimizer state; new entries start at 0 with zeroed state. The values
    Parameter and index buffer are updated in place, so optimizers keep referencing them. Returns #new entries.
    """
    values = layer.support_values[adapter]
    old = layer.support_indices[adapter].long()
    new = new_indices.to(old.device).long()
    if new.shape != old.shape:
        raise ValueError(f"replace_support: {new.numel()} new indices for {old.numel()} values.")
    pos = torch.searchsorted(old, new).clamp(max=max(old.numel() - 1, 0))
    kept = old[pos] == new

    def moved(tensor: torch.Tensor) -> torch.Tensor:
        full = full_tensor(tensor)
        return torch.where(kept, full[pos], torch.zeros_like(full))

    with editing([values]):
        assign_in_place(values, moved(values))
    layer.support_indices[adapter].copy_(new.to(layer.support_indices[adapter].dtype))
    for key, tensor in element_states(optimizer, values).items():
        set_element_state(optimizer, values, key, moved(tensor))
    return int((~kept).sum())


class DynamicMasks:
    """Prune/regrow controller for every dynamic SPARSE_DELTA adapter of a model.

    ``step()`` must be called once after each ``optimizer.step()``; it installs the scoring hooks for the window
    before each reselection and reselects at the window's end.
    """

    def __init__(self, model: nn.Module, optimizer: Any = None, total_steps: int | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.completed_steps = 0
        self.reselections = 0
        self.history: list[ReselectionStats] = []
        self._scores: dict[tuple[str, str], _LayerScore] = {}
        self._handles: list[Any] = []
        for adapter in self.adapters():  # reselection edits the values between steps
            check_editable([layer.support_values[adapter] for layer in self._layers(adapter).values()])

    # ------------------------------------------------------------------ discovery
    def adapters(self) -> dict[str, SparseDeltaConfig]:
        """Dynamic sparse-delta adapters that are being trained (frozen copies such as TRL's ``ref`` are left)."""
        configs = getattr(self.model, "peft_config", {})
        return {
            n: c
            for n, c in configs.items()
            if isinstance(c, SparseDeltaConfig)
            and c.is_dynamic
            and any(layer.support_values[n].requires_grad for layer in self._layers(n).values())
        }

    def _layers(self, adapter: str) -> dict[str, SparseDeltaLayer]:
        return sparse_delta_layers(self.model, adapter)

    # ------------------------------------------------------------------ schedule
    def _in_window(self, adapter: str, step_number: int) -> bool:
        """Whether optimizer step ``step_number`` (1-based) feeds the next reselection's scores."""
        config = self.adapters()[adapter]
        until_reselect = (-step_number) % config.reselect_every
        return until_reselect < config.regrow_window

    def begin(self, completed_steps: int = 0) -> None:
        """Set the step counter (e.g. when resuming) and install hooks if the next step is in a window."""
        self.completed_steps = completed_steps
        self._refresh_hooks()

    def _refresh_hooks(self) -> None:
        self._remove_hooks()
        for adapter, config in self.adapters().items():
            if not self._in_window(adapter, self.completed_steps + 1):
                continue
            for name, layer in self._layers(adapter).items():
                state = self._scores.setdefault((adapter, name), _LayerScore())
                self._handles += dense_grad_hooks(layer, self._consumer(adapter, layer, state, config))

    def _consumer(self, adapter: str, layer: SparseDeltaLayer, state: _LayerScore, config: SparseDeltaConfig):
        def consume(grad: torch.Tensor) -> None:
            if not layer.support_values[adapter].requires_grad:
                return
            if config.regrow == "momentum":
                _accumulate_momentum(state, grad)
            else:
                active = layer.support_indices[adapter].long()
                _accumulate_gradient(state, grad, active, _max_candidates(layer, adapter, config))
            state.steps += 1

        return consume

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[ReselectionStats]:
        """Call after each optimizer step. Returns the reselections made at this step (usually none)."""
        self.completed_steps += 1
        done = []
        for adapter, config in self.adapters().items():
            if self.completed_steps % config.reselect_every == 0:
                done.append(self.reselect(adapter))
        self._refresh_hooks()
        return done

    def reselect(self, adapter: str) -> ReselectionStats:
        """Prune and regrow every layer of ``adapter`` now, from the scores collected so far."""
        config = self.adapters()[adapter]
        fraction = config.replace_fraction(
            self.completed_steps, self.total_steps, first=self.reselections == 0
        )
        stats = ReselectionStats(step=self.completed_steps, fraction=fraction)
        for name, layer in self._layers(adapter).items():
            state = self._scores.pop((adapter, name), _LayerScore())
            values = layer.support_values[adapter]
            active = layer.support_indices[adapter].long()
            n = min(round(fraction * active.numel()), layer.numel - active.numel())
            grow = (
                _regrow_choice(state, active, n, layer.storage_shape, config.regrow) if n > 0 else active[:0]
            )
            n = grow.numel()
            new = active
            if n > 0:
                drop = torch.topk(full_tensor(values.detach()).abs().float(), n, largest=False).indices
                keep = torch.ones_like(active, dtype=torch.bool)
                keep[drop] = False
                new = torch.cat([active[keep], grow.to(active.device)]).sort().values
            new = _broadcast(new.contiguous())
            stats.replaced[name] = replace_support(layer, adapter, new, self.optimizer)
        self.reselections += 1
        self.history.append(stats)
        return stats

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Counters and the partial window scores, so a resumed run reselects exactly like an uninterrupted one."""
        return {
            "completed_steps": self.completed_steps,
            "reselections": self.reselections,
            "scores": {f"{a}\t{n}": vars(s).copy() for (a, n), s in self._scores.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reselections = int(state["reselections"])
        self._scores = {tuple(k.split("\t")): _LayerScore(**v) for k, v in state["scores"].items()}
        self.begin(int(state["completed_steps"]))

    def close(self) -> None:
        self._remove_hooks()
