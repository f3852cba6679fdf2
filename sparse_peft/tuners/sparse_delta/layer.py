"""The sparse-delta tuner layer: the one sparse core behind SPARSE_DELTA (and, later, S2FT and composition).

Per adapter it holds ``sparse_delta_values`` (the only trainable tensor, length k) and the persistent buffer
``sparse_delta_indices`` (sorted unique flat indices into the base weight's storage). Two execution paths:

* **fused** (default for one active adapter on a plain float weight): inside the forward and backward kernels
  ``W[idx] = W0[idx] + v`` is written into the base weight, the dense matmul runs at the base layer's speed, and
  the k originals are written back bit-exactly (O(k) each); the backward adds an SDDMM for the values. Outside
  those calls the base weight is always exactly ``W0``.
* **separate** (several active adapters, quantized bases, ``fused=False``): ``y = base(x) + Σ sparse(x)``.

Neither keeps a dense copy of the weight for backward nor builds a dense ``dL/dW``.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from torch import nn

from sparse_peft import triton_ops

from ...indices import index_dtype, validate_indices
from ...proximal import LambdaSchedule, ProximalLayer, soft_threshold_
from ...sharding import assign_in_place
from .._mixed_batch import mixed_batch_forward
from .._quantized import base_weight


class CalibrationRequiredError(RuntimeError):
    """A gradient-based selection has not been run yet, so the mask is only a placeholder."""


class SparseDeltaLayer(nn.Module, BaseTunerLayer, ProximalLayer):
    """Wraps a linear-like base layer (``nn.Linear``, GPT-2 ``Conv1D``, bitsandbytes 4/8-bit) with sparse deltas.

    An adapter made with ``l1_lambda > 0`` takes LT-SFT's L1 pull towards the base after each optimizer step: its
    values are soft-thresholded by ``lr·λ`` (the shared proximal step, as SoRA's gates)."""

    # A method on this core names its containers (PEFT recognises a method's tensors by its prefix); the core reaches
    # them through ``support_values`` / ``support_indices``. Per-adapter plain dicts sit in ``other_param_names`` so
    # PEFT's own ``delete_adapter`` drops them.
    values_name: ClassVar[str] = "sparse_delta_values"
    indices_name: ClassVar[str] = "sparse_delta_indices"
    indices_persistent: ClassVar[bool] = True  # False where the indices are derived from something saved
    adapter_layer_names: tuple[str, ...] = ("sparse_delta_values",)
    other_param_names: tuple[str, ...] = (
        "sparse_delta_indices", "scaling", "fused_mode", "needs_calibration", "sparse_schedule"
    )
    sparsity_unit = "entries"

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, fan_in_fan_out: bool = False, **kwargs: Any
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        setattr(self, self.values_name, nn.ParameterDict({}))
        setattr(self, self.indices_name, BufferDict({}, persistent=self.indices_persistent))
        self.scaling: dict[str, float] = {}
        self.fused_mode: dict[str, bool] = {}
        self.needs_calibration: dict[str, bool] = {}
        self.sparse_schedule: dict[str, LambdaSchedule] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._merge_originals: dict[str, torch.Tensor] = {}
        self._quantized_original: torch.Tensor | None = None
        self._quantized_state: tuple[Any, Any] = (None, None)
        self.quantization_backend = resolve_quantization_backend(self.get_base_layer())
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())
        if self.in_features is None:
            raise TypeError(f"sparse_delta cannot adapt {type(self.get_base_layer()).__name__}.")
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name

    @property
    def support_values(self) -> nn.ParameterDict:
        """Per adapter: the trainable values of the delta (the method's ``<prefix>values`` container)."""
        return getattr(self, self.values_name)

    @property
    def support_indices(self) -> BufferDict:
        """Per adapter: the sorted flat indices the values sit at, in the weight's storage layout."""
        return getattr(self, self.indices_name)

    # ----------------------------------------------------------------- geometry
    @property
    def storage_shape(self) -> tuple[int, int]:
        """Shape the flat indices address: the weight's storage layout (``(in, out)`` for Conv1D)."""
        if self.fan_in_fan_out:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)

    @property
    def numel(self) -> int:
        rows, cols = self.storage_shape
        return rows * cols

    @property
    def is_quantized(self) -> bool:
        return self.quantization_backend is not None

    def dense_weight(self) -> torch.Tensor:
        """The base weight in storage layout (dequantized for quantized bases: a temporary copy)."""
        return base_weight(self)

    # ----------------------------------------------------------------- adapters
    def update_layer(
        self,
        adapter_name: str,
        indices: torch.Tensor,
        init_weights: bool = True,
        fused: bool = True,
        needs_calibration: bool = False,
        seed: int = 0,
        inference_mode: bool = False,
        values: torch.Tensor | None = None,
        checked: bool = False,
    ) -> None:
        """Create (or replace) adapter ``adapter_name`` on the given flat indices (and values, if given).

        ``checked``: the indices already passed :func:`validate_indices` for this layer (the tuner's own draws and
        file records it checked), so a load does not validate every module twice."""
        if not checked:
            indices = validate_indices(indices, self.numel, where=f"sparse_delta adapter '{adapter_name}'")
        self.set_adapter_indices(adapter_name, indices, init_weights=init_weights, seed=seed, values=values)
        self.scaling[adapter_name] = 1.0
        self.fused_mode[adapter_name] = fused
        self.needs_calibration[adapter_name] = needs_calibration
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def set_adapter_indices(
        self,
        adapter_name: str,
        indices: torch.Tensor,
        init_weights: bool = True,
        seed: int = 0,
        values: torch.Tensor | None = None,
    ) -> None:
        """Replace the support (and values) of an adapter; the delta must not be merged. With the same number of
        entries the values are written into the existing parameter, so an optimizer (and FSDP2's sharding) created
        before, e.g. by a Trainer that loads a checkpoint after building its optimizer, keeps training them."""
        if adapter_name in self.merged_adapters:
            raise RuntimeError(
                f"Cannot change the mask of merged adapter '{adapter_name}'; unmerge it first."
            )
        device = self._weight_device()
        k = indices.numel()
        if values is None:
            if init_weights:
                values = torch.zeros(k)
            else:
                gen = torch.Generator().manual_seed(seed)
                values = torch.randn(k, generator=gen) * 0.1
        old = self.support_values[adapter_name] if adapter_name in self.support_values else None
        if old is not None and old.numel() == k:
            assign_in_place(old, values)
        else:
            dtype = old.dtype if old is not None else torch.float32
            requires_grad = old.requires_grad if old is not None else True
            self.support_values[adapter_name] = nn.Parameter(
                values.detach().to(device=device, dtype=dtype), requires_grad=requires_grad
            )
        self.support_indices[adapter_name] = indices.to(device=device, dtype=index_dtype(self.numel))

    def _weight_device(self) -> torch.device:
        weight = getattr(self.get_base_layer(), "weight", None)
        return weight.device if weight is not None else torch.device("cpu")

    def delta_values(self, adapter_name: str) -> torch.Tensor:
        """The scaled values of one adapter (differentiable)."""
        return self.support_values[adapter_name] * self.scaling[adapter_name]

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.scaling:
            self.scaling[adapter] = float(scale)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Dense delta in the base weight's storage layout (for inspection and conversions, not for training)."""
        values = self.delta_values(adapter).detach()
        delta = torch.zeros(self.numel, dtype=values.dtype, device=values.device)
        delta[self.support_indices[adapter].long()] = values
        return delta.view(self.storage_shape)

    # ----------------------------------------------------------------- L1 pull (ProximalLayer)
    def set_l1_lambda(self, adapter_name: str, l1_lambda: float) -> None:
        if l1_lambda > 0:
            self.sparse_schedule[adapter_name] = LambdaSchedule(start=float(l1_lambda))
        else:
            self.sparse_schedule.pop(adapter_name, None)

    def proximal_step(self, adapter_name: str, lr: float, lam: float) -> None:
        soft_threshold_(self.support_values[adapter_name], lr * lam)

    def penalized_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return [self.support_values[adapter_name]]

    def sparsity(self, adapter_name: str) -> tuple[int, int]:
        """Non-zero values of the support (the L1 pull sets small ones exactly to zero)."""
        values = self.support_values[adapter_name]
        return int(torch.count_nonzero(values)), values.numel()

    # ----------------------------------------------------------------- execution path
    def _fusable_adapter(self) -> str | None:
        """The adapter to run on the fused path (delta written into the weight inside the kernel call), or None."""
        if self.disable_adapters or self.merged or self.is_quantized:
            return None
        active = [a for a in self.active_adapters if a in self.support_values]
        if len(active) != 1 or not self.fused_mode.get(active[0], False):
            return None
        weight = getattr(self.get_base_layer(), "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            return None
        return active[0]

    # ----------------------------------------------------------------- merge
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add deltas into the base weight by an O(k) scatter, keeping the k originals for an exact unmerge."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        for name in adapter_names:
            if name not in self.support_values:
                continue
            idx = self.support_indices[name]
            weight = self.dense_weight()
            originals = triton_ops.gather(weight, idx)  # a copy
            values = self.delta_values(name).detach()
            if safe_merge:
                merged = originals.to(torch.float32) + values.to(torch.float32)
                if not torch.isfinite(merged.to(weight.dtype)).all():
                    raise ValueError(
                        f"NaNs detected in the merged weights. The adapter {name} seems to be broken"
                    )
            triton_ops.scatter_add_(weight, idx, values)
            if self.is_quantized:
                self._set_quantized_weight(weight)
            self._merge_originals[name] = originals
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo merges in reverse order by writing the saved originals back (bit-exact for float weights)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            originals = self._merge_originals.pop(name, None)
            if originals is None or name not in self.support_indices or self.is_quantized:
                continue
            weight = self.dense_weight()
            triton_ops.scatter_(weight, self.support_indices[name], originals.to(weight.device))
        if self._quantized_original is not None:
            self._restore_quantized_weight()

    def _set_quantized_weight(self, weight: torch.Tensor) -> None:
        """Re-quantize a merged weight, keeping the original quantized tensor so unmerge restores it exactly.

        Re-quantizing cannot represent a small sparse delta faithfully (and re-quantizing the same values is not
        idempotent in 4-bit), so the original packed weight is kept while merged: one extra quantized copy.
        """
        if self._quantized_original is None:
            base = self.get_base_layer()
            state = getattr(
                base, "state", None
            )  # bnb 8-bit moves its scales from the weight to the layer state
            self._quantized_original = base.weight
            self._quantized_state = (getattr(state, "CB", None), getattr(state, "SCB", None))
        warnings.warn(
            "Merging a sparse delta into a quantized base re-quantizes the weight, which is lossy; unmerge restores "
            "the original quantized weight exactly.",
            stacklevel=3,
        )
        self.set_base_weight(weight)

    def _restore_quantized_weight(self) -> None:
        base = self.get_base_layer()
        base.weight = self._quantized_original
        state = getattr(base, "state", None)
        if state is not None and hasattr(state, "SCB"):
            state.reset_grads()
            state.CB, state.SCB = self._quantized_state
        self._quantized_original = None

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """Used by ``merge_and_unload`` / ``unload``."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return self.get_base_layer()

    # ----------------------------------------------------------------- forward
    def _check_calibrated(self, names: list[str]) -> None:
        if not (self.training and torch.is_grad_enabled()):
            return
        for name in names:
            if self.needs_calibration.get(name) and self.support_values[name].requires_grad:
                raise CalibrationRequiredError(
                    f"Adapter '{name}' uses a gradient-based selection but no calibration has run: call "
                    "sparse_peft.select_masks(model, batches) before training."
                )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters and self.merged:
            self.unmerge()  # as LoRA does: disabled means the base output, also after merge_adapter()
        if adapter_names is not None and not self.disable_adapters:
            return mixed_batch_forward(self, x, adapter_names, *args, **kwargs)
        fused = self._fusable_adapter()
        active = (
            []
            if (self.disable_adapters or self.merged)
            else [a for a in self.active_adapters if a in self.support_values]
        )
        if not active:
            return self.base_layer(x, *args, **kwargs)
        self._check_calibrated(active)
        if self.training and self.sparse_schedule:
            self.note_training_forward()
        if fused is not None and (torch.is_grad_enabled() or not self._few_tokens(fused, x)):
            return self._fused_forward(fused, x)
        result = self.base_layer(x, *args, **kwargs)
        for name in active:
            result = result + self.adapter_output(name, x).to(result.dtype)
        return result

    def _few_tokens(self, name: str, x: torch.Tensor) -> bool:
        """Without autograd the fused path multiplies by a transient copy of the whole weight; for a few tokens
        (generation's one token per step) the base product plus the delta's own product costs less (134M model,
        one token: 63 instead of 103 ms per forward, measured once on 2 CPU cores)."""
        tokens = x.numel() // max(x.shape[-1], 1)
        return tokens * self.support_values[name].numel() <= self.numel

    def holds_adapter(self, name: str) -> bool:
        return name in self.support_values

    def adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The delta's own output for input ``x`` (the separate path; mixed-adapter batches use it per row group)."""
        values = self.delta_values(name)
        return self._delta_forward(name, self._cast_input_dtype(x, values.dtype), values)

    def _fused_forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Base matmul with adapter ``name`` written into the weight only inside the kernels."""
        base = self.get_base_layer()
        return triton_ops.fused_sparse_linear(
            self._cast_input_dtype(x, base.weight.dtype),
            base.weight,
            base.bias,
            self.support_values[name],
            self.support_indices[name],
            self.scaling[name],
            self.fan_in_fan_out,
            **self._structure(name),
        )

    def _structure(self, name: str) -> dict[str, Any]:
        """Extra arguments of the fused kernel for a structured support (none for an unstructured one)."""
        return {}

    def _delta_forward(self, name: str, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The delta's own output (separate path); structured subclasses compute it densely on their slice."""
        return triton_ops.sparse_delta_linear(
            x, values, self.support_indices[name], self.storage_shape, self.fan_in_fan_out
        )

    def __repr__(self) -> str:
        return "sparse_delta." + super().__repr__()


class SparseDeltaLinear(SparseDeltaLayer):
    """The wrapper PEFT creates for linear-like bases.

    PEFT recognises already-adapted linear layers (e.g. for ``target_modules="all-linear"`` on a second adapter)
    by "Linear" in the wrapper's class name, hence this name.
    """


PEFT_PREFIX = "base_model.model."
"""What a PeftModel puts before the base model's module names."""


def sparse_delta_layers(
    model: nn.Module, adapter_name: str | None = None, kind: type[SparseDeltaLayer] = SparseDeltaLayer
) -> dict[str, Any]:
    """The sparse-delta layers (S2FT's too; ``kind`` narrows the type) of a model or PeftModel, keyed by their name
    in the base model; with ``adapter_name``, only those carrying that adapter."""
    return {
        name.removeprefix(PEFT_PREFIX): module
        for name, module in model.named_modules()
        if isinstance(module, kind) and (adapter_name is None or adapter_name in module.support_values)
    }
