"""Composing sparse adapters: one adapter whose delta combines several (LT-SFT's composition, TIES, DARE).

The inputs are sparse deltas on the same base. ``sum`` adds them (LT-SFT; where supports overlap the values add).
The others follow the model-merging literature, applied to sparse deltas entry by entry:

- ``magnitude_prune``: keep each delta's largest-|value| ``density`` fraction of its *own entries* (a dense task
  vector is trimmed against the whole matrix; a sparse delta is already a top-k of the matrix, so the trim is
  relative to its support), then sum.
- ``ties`` (Yadav et al. 2023, "TIES-Merging", arXiv 2306.01708): trim as above, elect a sign per entry from the
  sum of the trimmed values, and average the values that agree with it ("disjoint mean"): entries changed by one
  adapter keep their value, entries changed by several do not add up.
- ``dare_linear`` / ``dare_ties`` (Yu et al. 2024, "Language Models are Super Mario", arXiv 2311.03099): drop each
  entry with probability ``1 - density`` and rescale the rest by ``1 / density``, then sum / TIES-merge.
- ``regmean`` (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models", arXiv
  2212.09849): per linear layer, the weight that best reproduces every adapter's layer output *on that adapter's
  own inputs*, ``argmin_W Σ_i ‖(W − W_i) X_iᵀ‖²``, solved here on the union of the supports (row by row, a
  small linear system per output channel), so the result stays sparse. It needs a few batches of each adapter's
  task (``inputs=``) to collect the input Gram matrices ``X_iᵀX_i``; the other methods look at the values only.
  This is the method that accounts for interference: a delta that shifts another task's activations is
  penalised on that task's inputs.

Names and semantics follow PEFT's ``LoraModel.add_weighted_adapter(combination_type=...)`` (``weights`` scale each
delta before the merge; ``majority_sign_method="total"``). On the real base model, two and three skill adapters
composed by ``sum`` lose the later skills and ``ties`` keeps them; see docs/benchmarks.md, "Composition".

The result is an ordinary adapter of the inputs' type (SPARSE_DELTA, or S2FT on the union of the channels, with
trimmed entries at zero): it can be saved, merged, switched to or trained further.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from peft import PeftModel

from .masks import sparse_delta_layers
from .tuners.s2ft import S2FTConfig, S2FTLinear
from .tuners.sparse_delta.config import SparseDeltaConfig

CompositionMethod = Literal["sum", "magnitude_prune", "ties", "dare_linear", "dare_ties", "regmean"]
METHODS: tuple[str, ...] = ("sum", "magnitude_prune", "ties", "dare_linear", "dare_ties", "regmean")
DEFAULT_REGMEAN_ALPHA = 1.0
"""RegMean's scaling of the Gram matrices' off-diagonal entries (1: the plain least squares). The paper's 0.9
regularises towards the diagonal; on the real model's three skills (128 examples each, validation split) 1.0 kept
every skill and 0.9 / 0.95 lost part of ``date``."""
DEFAULT_TIES_DENSITY = 0.2
"""The density the trimming methods use when none is given: TIES-merging's default (keep 20%), and the best for two
skill adapters on the validation split of the real-model composition benchmark (benchmarks/composition.py; for
three, 0.1 was)."""


def merge_deltas(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor]],
    weights: Sequence[float],
    method: CompositionMethod = "sum",
    density: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine sparse deltas ``(flat indices, values)`` of one matrix; returns the union of the supports (sorted,
    int64) and the combined value on each (0 where every input was trimmed or dropped). ``regmean`` needs the
    tasks' inputs: :func:`regmean_values`."""
    if method == "regmean":
        raise ValueError("merge_deltas: regmean needs input Gram matrices; use regmean_values.")
    kept = []
    for (indices, values), weight in zip(parts, weights, strict=True):
        indices, values = indices.long(), values.float()
        if method in ("magnitude_prune", "ties") and density < 1.0 and values.numel():
            keep = values.abs().topk(max(1, round(density * values.numel()))).indices
            mask = torch.zeros_like(values, dtype=torch.bool)
            mask[keep] = True
            values = values * mask
        elif method in ("dare_linear", "dare_ties") and density < 1.0:
            mask = torch.rand(values.shape, generator=generator, device="cpu").to(values.device) < density
            values = values * mask / density
        kept.append((indices, values * weight))
    union, inverse = torch.unique(torch.cat([i for i, _ in kept]), return_inverse=True)
    values = torch.cat([v for _, v in kept])
    total = torch.zeros(union.numel(), dtype=torch.float32, device=values.device).index_add_(0, inverse, values)
    if method not in ("ties", "dare_ties"):
        return union, total
    agree = (torch.sign(values) == torch.sign(total)[inverse]) & (values != 0)
    summed = torch.zeros_like(total).index_add_(0, inverse, values * agree)
    count = torch.zeros_like(total).index_add_(0, inverse, agree.float())
    return union, summed / count.clamp(min=1.0)


def input_grams(
    model: PeftModel,
    layers: Mapping[str, torch.nn.Module],
    inputs: Mapping[str, Sequence[Mapping[str, torch.Tensor]]],
) -> dict[str, dict[str, torch.Tensor]]:
    """Per adapter, per layer: the Gram matrix ``XᵀX / n`` of the layer's inputs over the real (unpadded) tokens of
    that adapter's batches, with that adapter active — RegMean's statistics. Each adapter's matrix is a mean, so
    every task weighs the same whatever its token count."""
    grams: dict[str, dict[str, torch.Tensor]] = {}
    tokens: dict[str, int] = {}
    current: dict[str, Any] = {}

    def collect(name: str) -> Any:
        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if current.get("last_input") is x:  # q/k/v and gate/up read the same tensor: one product
                gram = current["last_gram"]
            else:
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                keep = current.get("mask")
                if keep is not None and keep.numel() == flat.shape[0]:
                    flat = flat[keep]
                gram = flat.T @ flat
                current["last_input"], current["last_gram"] = x, gram
            store = grams[current["adapter"]]
            store[name] = store[name] + gram if name in store else gram

        return hook

    active = model.active_adapter
    handles = [layer.register_forward_pre_hook(collect(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            for adapter, batches in inputs.items():
                model.set_adapter(adapter)
                current["adapter"], grams[adapter], tokens[adapter] = adapter, {}, 0
                for batch in batches:
                    mask = batch.get("attention_mask")
                    current["mask"] = None if mask is None else mask.reshape(-1).bool()
                    tokens[adapter] += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
                    model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")})
    finally:
        for handle in handles:
            handle.remove()
        current.clear()
        model.set_adapter(active)
    return {a: {n: g / max(tokens[a], 1) for n, g in per_layer.items()} for a, per_layer in grams.items()}


def regmean_values(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor]],
    grams: Sequence[torch.Tensor],
    storage_shape: tuple[int, int],
    in_out: bool,
    alpha: float = DEFAULT_REGMEAN_ALPHA,
    extra_grams: Sequence[torch.Tensor] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """RegMean on the union of sparse supports for one matrix: ``parts`` are each delta's ``(flat indices,
    values)`` in the storage layout (``in_out``: stored ``(in, out)``, GPT-2's Conv1D), ``grams`` each task's
    input Gram matrix. Per output channel ``o`` with union columns ``S``, solves
    ``(Σ G̃_i)[S, S] · δ = Σ_i (Δ_i[o] G̃_i)[S]`` with ``G̃ = α·G + (1 − α)·diag(G)``; returns the union (sorted)
    and ``δ`` on it. ``extra_grams``: tasks whose delta is zero on this matrix (they pull ``δ`` towards 0 on their
    inputs). One delta alone comes back unchanged (up to a 1e-6 ridge)."""
    rows, cols = storage_shape
    n_in = rows if in_out else cols

    def offdiagonal_scaled(g: torch.Tensor) -> torch.Tensor:
        return alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))

    scaled = [offdiagonal_scaled(g) for g in grams]
    total = torch.stack(scaled + [offdiagonal_scaled(g) for g in extra_grams]).sum(0).double()
    n_out = cols if in_out else rows
    target = torch.zeros(n_out, n_in, dtype=torch.float64, device=total.device)
    for (indices, values), gram in zip(parts, scaled, strict=True):  # Δ_i·G̃_i as sparse × dense: nnz·in work
        flat = indices.long()
        out_i, in_i = (flat % cols, flat // cols) if in_out else (flat // cols, flat % cols)
        delta = torch.sparse_coo_tensor(
            torch.stack([out_i, in_i]), values.double(), (n_out, n_in), check_invariants=True
        )
        target += torch.sparse.mm(delta, gram.double())
    union = torch.unique(torch.cat([i.long() for i, _ in parts]))
    storage_row, storage_col = union // cols, union % cols
    out_ch, in_ch = (storage_col, storage_row) if in_out else (storage_row, storage_col)
    order = torch.argsort(out_ch * n_in + in_ch)  # entries grouped by output channel
    out_sorted, in_sorted = out_ch[order], in_ch[order]
    channels, counts = torch.unique_consecutive(out_sorted, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    total += 1e-6 * torch.diagonal(total).mean().clamp_min(1e-12) * torch.eye(n_in, dtype=total.dtype)
    values = torch.empty(union.numel(), dtype=torch.float32, device=union.device)
    # A row with k of the n inputs costs k³ by a direct solve; a row missing only m = n − k inputs costs m³ by
    # the complement of one shared inverse. Each row takes the cheaper, exactly.
    wide = counts > n_in // 2
    if wide.any():
        rows_wide = torch.nonzero(wide).squeeze(1)
        entries = _row_entries(starts[rows_wide], counts[rows_wide], out_sorted.numel())
        try:
            solution = _solve_wide_rows(total, target[channels[rows_wide]], in_sorted, entries)
        except RuntimeError:  # a numerically singular Gram: the shared inverse is unusable, solve these rows directly
            solution = None
        if solution is not None and bool(torch.isfinite(solution).all()):
            values[order[entries[1][entries[0]]]] = solution.float()
        else:
            wide = torch.zeros_like(wide)
    narrow = torch.nonzero(~wide).squeeze(1)
    by_count = narrow[torch.argsort(counts[narrow])]
    # narrow rows batched by similar entry counts (padding to the widest row of a batch stays small: selected
    # supports are uneven), each batch one batched Cholesky solve
    for batch in _similar_width_batches(counts[by_count].tolist()):
        rows_here = by_count[batch]
        present, flat = _row_entries(starts[rows_here], counts[rows_here], out_sorted.numel())
        padded = torch.where(present, in_sorted[flat], torch.zeros((), dtype=torch.long))
        system = total[padded[:, :, None], padded[:, None, :]]
        eye = torch.eye(padded.shape[1], dtype=system.dtype, device=system.device).expand_as(system)
        system = torch.where(present[:, :, None] & present[:, None, :], system, eye)  # padding solves to 0
        rhs = torch.where(present, target[channels[rows_here][:, None], padded], torch.zeros((), dtype=target.dtype))
        values[order[flat[present]]] = _spd_solve(system, rhs)[present].float()
    return union, values


def _row_entries(starts: torch.Tensor, counts: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows whose entries sit at ``starts[r] : starts[r] + counts[r]`` of a flat array: a (rows, widest)
    mask of real slots and the flat positions of every slot (padding clamped into range)."""
    slot = torch.arange(int(counts.max()), device=counts.device)
    present = slot[None, :] < counts[:, None]
    return present, (starts[:, None] + slot[None, :]).clamp(max=size - 1)


def _spd_solve(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Batched solve of symmetric positive definite systems by Cholesky (half an LU's work); a system that is
    not numerically positive definite falls back to least squares."""
    factor, info = torch.linalg.cholesky_ex(system)
    solution = torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)
    failed = info != 0
    if failed.any():  # least squares also copes with a singular system
        solution[failed] = torch.linalg.lstsq(system[failed], rhs[failed].unsqueeze(-1)).solution.squeeze(-1)
    return solution


def _solve_wide_rows(
    total: torch.Tensor, target: torch.Tensor, in_sorted: torch.Tensor, entries: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Exact solves of ``total[S, S] · x = target[S]`` for rows whose support ``S`` covers most inputs, through
    ``H = total⁻¹`` shared by all rows: with ``y = H·b`` (b zero off ``S``) and ``C`` the missing inputs,
    ``x = (y − H[:, C] · H[C, C]⁻¹ · y[C])[S]`` (the Lagrange multipliers that hold ``x`` at 0 on ``C``). Returns
    the values in the order of ``entries``' real slots."""
    present, flat = entries
    n_in = total.shape[0]
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(total))  # raises on a matrix that is not positive definite
    inverse = (inverse + inverse.T) / 2
    on_support = torch.zeros(present.shape[0], n_in, dtype=torch.bool, device=total.device)
    on_support[torch.arange(present.shape[0])[:, None].expand_as(present)[present], in_sorted[flat[present]]] = True
    y = torch.where(on_support, target, torch.zeros((), dtype=target.dtype)) @ inverse
    missing = ~on_support
    counts = missing.sum(1)
    by_count = torch.argsort(counts)
    for batch in _similar_width_batches(counts[by_count].tolist()):  # rows batched by similar missing counts
        rows = by_count[batch]
        m = int(counts[rows].max())
        if m == 0:  # full rows: y is the answer
            continue
        # each row's missing inputs first (a stable sort puts True before False when sorting ~missing)
        complement = torch.argsort(on_support[rows].to(torch.int8), dim=1, stable=True)[:, :m]
        real = torch.gather(missing[rows], 1, complement)
        system = inverse[complement[:, :, None], complement[:, None, :]]
        eye = torch.eye(m, dtype=system.dtype, device=system.device).expand_as(system)
        system = torch.where(real[:, :, None] & real[:, None, :], system, eye)  # padding: multiplier 0
        rhs = torch.where(real, torch.gather(y[rows], 1, complement), torch.zeros((), dtype=y.dtype))
        solved = torch.where(real, _spd_solve(system, rhs), torch.zeros((), dtype=y.dtype))
        multipliers = torch.zeros(rows.numel(), n_in, dtype=y.dtype, device=y.device).scatter_(1, complement, solved)
        y[rows] -= multipliers @ inverse
    return y[on_support]


def _similar_width_batches(sorted_counts: list[int], budget: int = 1 << 22) -> list[slice]:
    """Split ascending per-channel entry counts into runs of similar width whose padded systems stay under
    ``budget`` elements."""
    batches, first = [], 0
    for i, count in enumerate(sorted_counts):
        if i > first and (count > 1.25 * sorted_counts[first] + 4 or (i - first + 1) * count * count > budget):
            batches.append(slice(first, i))
            first = i
    if sorted_counts:
        batches.append(slice(first, len(sorted_counts)))
    return batches


def compose(
    model: PeftModel,
    adapter_names: Sequence[str],
    weights: Sequence[float] | None = None,
    new_adapter_name: str = "composed",
    method: CompositionMethod = "sum",
    density: float | None = None,
    seed: int = 0,
    inputs: Mapping[str, Sequence[Mapping[str, torch.Tensor]]] | None = None,
    alpha: float = DEFAULT_REGMEAN_ALPHA,
) -> str:
    """Add ``new_adapter_name``, the combination of ``adapter_names``' deltas by ``method`` (see the module
    docstring), to ``model`` and return its name. The new adapter is added but not activated.

    Args:
        model (`PeftModel`): holds the adapters, all SPARSE_DELTA or all S2FT.
        adapter_names (`Sequence[str]`): the adapters to combine.
        weights (`Sequence[float]`, *optional*, defaults to `None`):
            A factor per delta (default 1; each input's own scaling is applied too).
        new_adapter_name (`str`, *optional*, defaults to `"composed"`): name of the result; must be new.
        method (`str`, *optional*, defaults to `"sum"`):
            ``sum``, ``magnitude_prune``, ``ties``, ``dare_linear``, ``dare_ties`` or ``regmean``.
        density (`float`, *optional*, defaults to `None`):
            Fraction of each delta's entries that ``magnitude_prune`` / ``ties`` keep and ``dare_*`` keep in
            expectation; ``None``: :data:`DEFAULT_TIES_DENSITY` for those, 1.0 for ``sum``.
        seed (`int`, *optional*, defaults to `0`): seeds DARE's random drop.
        inputs (`Mapping[str, Sequence[Mapping[str, Tensor]]]`, *optional*, defaults to `None`):
            ``regmean`` only: per adapter, a few batches of its own task (``input_ids``, ``attention_mask``).
        alpha (`float`, *optional*, defaults to `1.0`): ``regmean``'s off-diagonal scaling, in (0, 1].

    Example:

    ```py
    >>> from sparse_peft import compose
    >>> compose(model, ["reverse", "date"], method="ties", density=0.2, new_adapter_name="both")
    >>> model.set_adapter("both")
    >>> compose(model, ["reverse", "date"], method="regmean", new_adapter_name="both-regmean",
    ...         inputs={"reverse": [reverse_batch], "date": [date_batch]})
    ```
    """
    names = list(adapter_names)
    if len(names) < 1:
        raise ValueError("compose: give at least one adapter name.")
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"compose: {len(names)} adapters but {len(weights)} weights.")
    if method not in METHODS:
        raise ValueError(f"compose: method must be one of {METHODS}, got {method!r}.")
    if density is None:
        density = 1.0 if method in ("sum", "regmean") else DEFAULT_TIES_DENSITY
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"compose: density must be in (0, 1], got {density!r}.")
    if method in ("sum", "regmean") and density != 1.0:
        raise ValueError(
            f"compose: density applies to magnitude_prune, ties and dare_*; {method} keeps every entry."
        )
    if method == "regmean":
        missing = [n for n in names if not (inputs or {}).get(n)]
        if missing:
            raise ValueError(
                f"compose: method='regmean' needs inputs={{adapter: [batches of its task]}}; none for {missing}."
            )
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"compose: alpha must be in (0, 1], got {alpha!r}.")
    elif inputs is not None:
        raise ValueError(f"compose: inputs are used by method='regmean' only, not {method!r}.")
    if new_adapter_name in model.peft_config:
        raise ValueError(f"compose: an adapter named {new_adapter_name!r} already exists.")
    kinds = {type(model.peft_config.get(name)) for name in names}
    for name in names:
        config = model.peft_config.get(name)
        if not isinstance(config, SparseDeltaConfig | S2FTConfig):
            kind = type(config).__name__ if config is not None else "nothing"
            raise ValueError(
                f"compose: adapter {name!r} is {kind}; only SparseDeltaConfig and S2FTConfig adapters can be "
                "composed."
            )
    if len(kinds) > 1:
        raise ValueError("compose: adapters of one type only (a PeftModel holds one adapter type).")

    layers = {
        n: m for n, m in sorted(sparse_delta_layers(model).items()) if any(a in m.support_values for a in names)
    }
    config = copy.deepcopy(model.peft_config[names[0]])
    config.target_modules = sorted(layers)
    config.exclude_modules = None
    config.layers_to_transform = config.layers_pattern = None
    config.selection, config.init_weights = "random", True
    if isinstance(config, S2FTConfig):  # the union of column/row slices is again a slice
        config.channel_plan = {
            name: torch.unique(torch.cat([layer.channels(a) for a in names if a in layer.support_values]))
            .tolist()
            for name, layer in layers.items()
        }
    config.inference_mode = True
    grams = input_grams(model, layers, {n: inputs[n] for n in names}) if method == "regmean" and inputs else {}
    model.add_adapter(new_adapter_name, config)

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, layer in layers.items():  # sorted by name: DARE's draws do not depend on module order
            present = [(a, w) for a, w in zip(names, weights, strict=True) if a in layer.support_values]
            parts = [(layer.support_indices[a], layer.delta_values(a).detach()) for a, _ in present]
            if method == "regmean":  # every task's inputs count, also where its adapter leaves the layer alone
                weighted = [(i, v * w) for (i, v), (_, w) in zip(parts, present, strict=True)]
                union, merged = regmean_values(
                    weighted,
                    [grams[a][name] for a, _ in present],
                    layer.storage_shape,
                    layer.fan_in_fan_out,
                    alpha,
                    extra_grams=[grams[a][name] for a in names if a not in layer.support_values],
                )
            else:
                union, merged = merge_deltas(parts, [w for _, w in present], method, float(density), generator)
            if isinstance(layer, S2FTLinear):  # the union of slices is a slice: keep it whole, trimmed entries at 0
                channels = torch.unique(torch.cat([layer.channels(a) for a, _ in present]))
                layer.set_channels(new_adapter_name, channels, values=merged)
            else:
                if method not in ("sum", "regmean"):  # trimmed or dropped entries leave the support
                    union, merged = union[merged != 0], merged[merged != 0]
                layer.set_adapter_indices(new_adapter_name, union, values=merged)
            layer.needs_calibration[new_adapter_name] = False
    return new_adapter_name
