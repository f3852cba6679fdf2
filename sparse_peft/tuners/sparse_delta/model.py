"""The SPARSE_DELTA tuner: injects :class:`SparseDeltaLayer` into a model and validates adapter files."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...index_codec import decode_indices, encode_indices
from ...indices import (
    InvalidSparseIndicesError,
    check_checksums,
    check_header_shape,
    check_values,
    integrity_header,
    validate_indices,
)
from .._twin import twin_adapter
from .config import SparseDeltaConfig
from .layer import SparseDeltaLayer, SparseDeltaLinear

SUPPORTED_LAYERS = "torch.nn.Linear, transformers Conv1D, bitsandbytes Linear4bit / Linear8bitLt"


_INDICES, _CODES, _VALUES = ".sparse_delta_indices.", ".sparse_delta_codes.", ".sparse_delta_values"
_HEADER = ".sparse_delta_header"
_PEFT_PREFIX = "base_model.model."


def _is_supported_base(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear | Conv1D):
        return True
    backend = resolve_quantization_backend(module)
    return backend is not None and backend.layer_type == "linear"


def check_module_tensors(
    indices: torch.Tensor,
    values: torch.Tensor,
    header: torch.Tensor | None,
    shape: tuple[int, int] | None,
    where: str,
) -> torch.Tensor:
    """Every check of one module's saved delta; returns the indices in their canonical dtype. ``shape`` is the
    model's weight (``None`` when checking a file on its own: the header's shape bounds the indices then). Files
    written before headers existed get every check but the shape and the checksums."""
    if header is not None:
        shape = check_header_shape(header, shape, where)
    check_values(values, where)
    numel = shape[0] * shape[1] if shape is not None else torch.iinfo(torch.int64).max
    indices = validate_indices(indices, numel, values=values, where=where)
    if header is not None:
        check_checksums(header, indices, values, where)
    return indices


def check_adapter_file(path: str | Path) -> None:
    """Check a saved SPARSE_DELTA adapter file on its own, before any model is wrapped or changed: it parses, and
    every module's indices, values and integrity header pass :func:`check_module_tensors`. Raises
    ``CorruptAdapterFileError`` / ``InvalidSparseIndicesError`` naming the file or module."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ...registry import CorruptAdapterFileError

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CorruptAdapterFileError(
            f"Cannot read adapter file {path}: it is truncated or not a valid safetensors file ({err})."
        ) from err
    for key in [k for k in tensors if k.endswith(_VALUES)]:
        module = key.removesuffix(_VALUES)
        where = f"sparse_delta adapter file {path}, module '{module.removeprefix(_PEFT_PREFIX)}'"
        if module + _CODES[:-1] in tensors:
            indices = decode_indices(tensors[module + _CODES[:-1]], where)
        elif module + _INDICES[:-1] in tensors:
            indices = tensors[module + _INDICES[:-1]]
        else:
            raise InvalidSparseIndicesError(f"{where}: the adapter file has no indices for this module.")
        check_module_tensors(indices, tensors[key], tensors.get(module + _HEADER), None, where)


class SparseDeltaModel(BaseTuner):
    """Sparse high-rank delta adapters (``PeftType.SPARSE_DELTA``). Create it with ``get_peft_model``."""

    prefix: str = "sparse_delta_"
    tuner_layer_cls = SparseDeltaLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        config: SparseDeltaConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        from ...selection import initial_indices, module_seed

        if current_key is None:
            raise ValueError("sparse_delta: current_key must not be None")
        if isinstance(target, SparseDeltaLayer):
            layer, new = target, False
        else:
            layer, new = self._create_new_module(config, adapter_name, target), True
        rows, cols = layer.storage_shape
        seed = module_seed(config.seed, current_key)
        twin = self._twin_adapter(config, adapter_name, layer)
        values = None
        if twin is not None:  # e.g. TRL's "ref" adapter: start as an exact copy of the adapter it was made from
            indices = layer.sparse_delta_indices[twin].clone()
            values = layer.sparse_delta_values[twin].detach().clone()
        else:
            indices = initial_indices(layer, config.budget(rows, cols), config.selection, seed)
        layer.update_layer(
            adapter_name,
            indices,
            init_weights=config.init_weights,
            fused=config.fused,
            needs_calibration=twin is None
            and config.selection in ("gradient", "snip")
            and not config.inference_mode,
            seed=seed,
            inference_mode=config.inference_mode,
            values=values,
        )
        if new:
            if adapter_name not in self.active_adapters:
                layer.requires_grad_(False)
            self._replace_module(parent, target_name, layer, target)

    def _twin_adapter(
        self, config: SparseDeltaConfig, adapter_name: str, layer: SparseDeltaLayer
    ) -> str | None:
        """The adapter a new one must copy (TRL's reference adapter; see :func:`twin_adapter`)."""
        return twin_adapter(self.peft_config, config, adapter_name, layer.sparse_delta_indices)

    @staticmethod
    def _create_new_module(
        config: SparseDeltaConfig, adapter_name: str, target: nn.Module
    ) -> SparseDeltaLayer:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not _is_supported_base(base):
            raise TypeError(
                f"sparse_delta cannot adapt a {type(base).__module__}.{type(base).__name__}; supported layers are "
                f"{SUPPORTED_LAYERS}. Adjust `target_modules` / `exclude_modules`."
            )
        fan_in_fan_out = isinstance(base, Conv1D)  # the storage layout decides, per layer; the config is not mutated
        if config.fan_in_fan_out and not fan_in_fan_out:
            warnings.warn(
                f"fan_in_fan_out=True but {type(base).__name__} stores (out, in); using False for it.", stacklevel=3
            )
        return SparseDeltaLinear(target, adapter_name, fan_in_fan_out=fan_in_fan_out)

    # ---------------------------------------------------------- saving / loading
    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: SparseDeltaConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """Indices go to the file as LEB128-coded gaps (``sparse_delta_codes``): ~1.3 instead of 4 bytes each; next to
        them an integrity header (``sparse_delta_header``: the weight's shape and CRC-32s of indices and values)."""
        saved = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        layers = {name.removeprefix(_PEFT_PREFIX): m for name, m in model.named_modules()
                  if isinstance(m, SparseDeltaLayer)}
        compact = {}
        for key, value in saved.items():
            if _INDICES in key:  # "<module>.sparse_delta_indices.<adapter>"
                module_key, adapter = key.split(_INDICES, 1)
                layer = layers.get(module_key.removeprefix(_PEFT_PREFIX))
                values = saved.get(f"{module_key}{_VALUES}.{adapter}")
                if layer is not None and values is not None:
                    compact[f"{module_key}{_HEADER}.{adapter}"] = integrity_header(layer.storage_shape, value, values)
                key, value = key.replace(_INDICES, _CODES), encode_indices(value)
            compact[key] = value
        return compact

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls,
        model: nn.Module,
        config: SparseDeltaConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Validate every module's indices, values and integrity header before anything touches the model, then size
        each layer to the file's support. A bad module raises and leaves every layer as it was."""
        state_dict = dict(state_dict)
        headers = {k.removesuffix(_HEADER).removeprefix(_PEFT_PREFIX): state_dict.pop(k)
                   for k in [k for k in state_dict if k.endswith(_HEADER)]}
        for key in [k for k in state_dict if k.endswith(_CODES[:-1])]:  # compact files; plain int ones load as is
            where = f"sparse_delta adapter '{adapter_name}', {key.removeprefix(_PEFT_PREFIX)}"
            state_dict[key.removesuffix(_CODES[:-1]) + _INDICES[:-1]] = decode_indices(state_dict.pop(key), where)
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        resized = []
        for name, module in model.named_modules():
            if not isinstance(module, SparseDeltaLayer) or adapter_name not in module.sparse_delta_values:
                continue
            idx_key, val_key = (
                f"{name}.sparse_delta_{kind}.{adapter_name}" for kind in ("indices", "values")
            )
            where = f"sparse_delta adapter '{adapter_name}', module '{name.removeprefix(_PEFT_PREFIX)}'"
            if idx_key not in remapped or val_key not in remapped:
                missing = "indices" if idx_key not in remapped else "values"
                raise InvalidSparseIndicesError(
                    f"{where}: the adapter file has no {missing} for this module."
                )
            values = remapped[val_key]
            header = headers.pop(name.removeprefix(_PEFT_PREFIX), None)
            indices = check_module_tensors(remapped[idx_key], values, header, module.storage_shape, where)
            remapped[idx_key] = indices
            resized.append((module, indices))
        if headers:
            raise InvalidSparseIndicesError(
                f"sparse_delta adapter '{adapter_name}': the file has tensors for modules this model does not adapt: "
                f"{sorted(headers)[:5]} (was target_modules edited, or is it for another model?)."
            )
        for module, indices in resized:  # every module passed: only now change the layers
            if indices.numel() != module.sparse_delta_values[adapter_name].numel():
                module.set_adapter_indices(adapter_name, indices.to(module._weight_device()))
            module.needs_calibration[adapter_name] = False
        return remapped
