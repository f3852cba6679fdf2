"""The SPARSE_DELTA tuner: injects :class:`SparseDeltaLayer` into a model and validates adapter files."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from torch.distributed.tensor import DTensor

from ...index_codec import decode_blocks, decode_indices, encode_blocks, encode_indices
from ...indices import (
    InvalidSparseIndicesError,
    check_checksums,
    check_header_shape,
    check_values,
    expand_blocks,
    index_dtype,
    integrity_header,
    validate_indices,
)
from ...triton_ops.torch_ops import aligned_run_ids
from .._base_layers import check_supported, stores_in_out
from .._mixed_batch import adapter_names_hooks
from .._support import initial_indices, module_seed
from .._twin import twin_adapter
from .adapter_file import InjectionUndo, ModuleRecord, read_adapter_file, take_weights_file
from .config import SparseDeltaConfig
from .layer import PEFT_PREFIX, SparseDeltaLayer, SparseDeltaLinear, sparse_delta_layers


class SparseDeltaModel(BaseTuner):
    """Sparse high-rank delta adapters (``PeftType.SPARSE_DELTA``). Create it with ``get_peft_model``."""

    prefix: str = "sparse_delta_"
    tuner_layer_cls = SparseDeltaLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    support_name = "sparse_delta_indices"  # the layer's saved support (S2FT: its channel ids)
    values_name = "sparse_delta_values"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loading: dict[str, dict[str, ModuleRecord]] = {}  # adapter -> the checked file it is injected from
        self._injected_records: dict[str, dict[str, ModuleRecord]] = {}  # ... kept for the state-dict load that follows
        super().__init__(*args, **kwargs)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """PEFT's injection; for a config loaded with its weights file (``from_pretrained``, ``load_adapter``) the
        supports come from the file, which must fit every injected layer, or everything injected is withdrawn and
        the error raised: a failed load leaves the model (its wrapping, names, trainable flags) as it was."""
        source = take_weights_file(self.peft_config[adapter_name])
        if source is None:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
            return
        where = f"{self.prefix[:-1]} adapter file {source}"
        records = self._records(read_adapter_file(source), where)
        undo = InjectionUndo(self, model)
        self._loading[adapter_name] = records
        try:  # each injected module's record is checked as its layer is created (_loaded_record)
            super().inject_adapter(model, adapter_name, *args, **kwargs)
            self._covered_layers(model, adapter_name, records, where)
            self._injected_records[adapter_name] = records
        except Exception:
            undo(adapter_name)
            raise
        finally:
            self._loading.pop(adapter_name, None)

    def _loaded_record(self, adapter_name: str, key: str, layer: SparseDeltaLayer) -> ModuleRecord | None:
        """Module ``key``'s record, its support checked (``record.checked``), while injecting from a file; else None
        (draw a support). The layer is created on the file's support and values: nothing is drawn and discarded."""
        records = self._loading.get(adapter_name)
        if records is None or key not in records:
            return None
        record = records[key]
        record.checked = self._check_record(layer, record, f"{self.prefix[:-1]} adapter '{adapter_name}', module '{key}'")
        return record

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
        loaded = self._loaded_record(adapter_name, current_key, layer)
        if twin is not None:  # e.g. TRL's "ref" adapter: start as an exact copy of the adapter it was made from
            indices = layer.support_indices[twin].clone()
            values = layer.support_values[twin].detach().clone()
        elif loaded is not None:
            indices, values = loaded.checked, loaded.values.clone()  # the record keeps the file's tensors
        else:
            try:
                k = config.budget(rows, cols)
            except ValueError as err:
                raise ValueError(f"{err} (module {current_key!r})") from err
            indices = initial_indices(layer, k, config.selection, seed, config.block_size)
        layer.update_layer(
            adapter_name,
            indices,
            init_weights=config.init_weights,
            fused=config.fused,
            needs_calibration=twin is None
            and loaded is None
            and config.selection in ("gradient", "snip")
            and not config.inference_mode,
            seed=seed,
            inference_mode=config.inference_mode,
            values=values,
            checked=True,  # drawn here, copied from a twin, or checked against this layer by _loaded_record
        )
        layer.set_l1_lambda(adapter_name, config.l1_lambda)
        if new:
            if adapter_name not in self.active_adapters:
                layer.requires_grad_(False)
            self._replace_module(parent, target_name, layer, target)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._injected_records.pop(adapter_name, None)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Mixed-adapter batches (``adapter_names=[...]``), as PEFT's LoRA (see :mod:`.._mixed_batch`)."""
        with adapter_names_hooks(self, self.tuner_layer_cls, set(self.peft_config), **kwargs):
            yield

    def _twin_adapter(
        self, config: SparseDeltaConfig, adapter_name: str, layer: SparseDeltaLayer
    ) -> str | None:
        """The adapter a new one must copy (TRL's reference adapter; see :func:`twin_adapter`)."""
        return twin_adapter(self.peft_config, config, adapter_name, layer.support_indices)

    @staticmethod
    def _create_new_module(
        config: SparseDeltaConfig, adapter_name: str, target: nn.Module
    ) -> SparseDeltaLayer:
        base = check_supported(target, "sparse_delta")
        fan_in_fan_out = stores_in_out(base)  # the storage layout decides, per layer; the config is not mutated
        if config.fan_in_fan_out and not fan_in_fan_out:
            warnings.warn(
                f"fan_in_fan_out=True but {type(base).__name__} stores (out, in); using False for it.", stacklevel=3
            )
        return SparseDeltaLinear(target, adapter_name, fan_in_fan_out=fan_in_fan_out)

    # ---------------------------------------------------------- saving / loading
    @classmethod
    def _encode_support(
        cls, key: str, support: torch.Tensor, block_size: int = 1
    ) -> tuple[str, torch.Tensor, torch.Tensor]:
        """(file key, stored tensor, the tensor the header checksums). Indices go to the file as LEB128-coded gaps
        (``sparse_delta_codes``): ~1.3 instead of 4 bytes each; a support of whole aligned blocks as its block ids
        (``sparse_delta_block_codes``, ~1 byte per block), which the header then checksums and a load checks
        without expanding them first."""
        ids = aligned_run_ids(support.detach(), block_size)
        if ids is not None:
            key = key.replace(".sparse_delta_indices", ".sparse_delta_block_codes")
            return key, encode_blocks(ids, block_size), ids
        return key.replace(".sparse_delta_indices", ".sparse_delta_codes"), encode_indices(support), support

    @classmethod
    def _decode_support(cls, parts: dict[str, torch.Tensor], where: str) -> tuple[torch.Tensor, int]:
        """(support, block size): flat indices (block size 1) or the ids of aligned blocks."""
        if "sparse_delta_block_codes" in parts:
            return decode_blocks(parts["sparse_delta_block_codes"], where)
        if "sparse_delta_codes" in parts:
            return decode_indices(parts["sparse_delta_codes"], where), 1
        if "sparse_delta_indices" in parts:  # plain int files
            return parts["sparse_delta_indices"], 1
        raise InvalidSparseIndicesError(f"{where}: the adapter file has no indices for this module.")

    @classmethod
    def _check_record(cls, layer: SparseDeltaLayer, record: ModuleRecord, where: str) -> torch.Tensor:
        """Every check of one module's saved delta against its layer (shape, values, indices, checksums); returns
        the indices in their canonical dtype. Files written before headers existed get all but shape and checksums.
        A block-coded support is checked as block ids (sorted, unique, in range: so are the entries they expand
        to), one per block."""
        shape = layer.storage_shape
        numel, block = shape[0] * shape[1], record.block_size
        if record.header is not None:
            check_header_shape(record.header, shape, where)
        check_values(record.values, where)
        if block == 1:
            indices = validate_indices(record.support, numel, values=record.values, where=where)
        elif record.values.numel() != record.support.numel() * block:
            raise InvalidSparseIndicesError(
                f"{where}: {record.support.numel()} blocks of {block} entries but {record.values.numel()} values."
            )
        else:
            validate_indices(record.support, numel // block, where=where, kind=f"block ids (blocks of {block})",
                             unit="blocks")  # fmt: skip
        if record.header is not None:  # on the decoded int64 form the checksum was made of (no int32 round trip)
            check_checksums(record.header, record.support, record.values, where)
        return indices if block == 1 else expand_blocks(record.support, block, index_dtype(numel))

    @classmethod
    def _apply_support(cls, layer: SparseDeltaLayer, adapter_name: str, support: torch.Tensor,
                       values: torch.Tensor) -> None:
        if support.numel() != layer.support_values[adapter_name].numel():
            layer.set_adapter_indices(adapter_name, support.to(layer._weight_device()))
        layer.needs_calibration[adapter_name] = False

    @classmethod
    def _records(
        cls, tensors: dict[str, torch.Tensor], where: str, reuse: dict[str, ModuleRecord] | None = None
    ) -> dict[str, ModuleRecord]:
        """Group a checkpoint's tensors of this method by module (keys without the adapter name). Tensors of other
        kinds (``modules_to_save`` etc.) are PEFT's; an unknown tensor of this method is refused. A module whose
        tensors are exactly those of its ``reuse`` record (the same file, read again by PEFT) reuses that record,
        already decoded and checked."""
        header_name = cls.prefix + "header"
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            module_key, _, kind = key.rpartition(".")
            if kind.startswith(cls.prefix):
                parts.setdefault(module_key, {})[kind] = tensor
        known = {cls.support_name, cls.values_name, header_name, "sparse_delta_codes", "sparse_delta_block_codes"}
        records = {}
        for module_key, found in parts.items():
            module_where = f"{where}, module '{module_key.removeprefix(PEFT_PREFIX)}'"
            unknown = sorted(set(found) - known)
            if unknown:
                raise InvalidSparseIndicesError(
                    f"{module_where}: unknown tensors {unknown} (written by another tool or version?)."
                )
            if cls.values_name not in found:
                raise InvalidSparseIndicesError(f"{module_where}: the adapter file has no values for this module.")
            previous = (reuse or {}).get(module_key.removeprefix(PEFT_PREFIX))
            if previous is not None and previous.same_tensors(found):
                records[previous.module] = previous
                continue
            support, block_size = cls._decode_support(found, module_where)
            record = ModuleRecord(module_key, support, found[cls.values_name], found.get(header_name), found,
                                  block_size=block_size)
            records[record.module] = record
        return records

    @classmethod
    def _covered_layers(
        cls, model: nn.Module, adapter_name: str, records: dict[str, ModuleRecord], where: str
    ) -> dict[str, SparseDeltaLayer]:
        """The layers carrying ``adapter_name``, by module name, after checking that the file has tensors for
        exactly these modules."""
        layers = sparse_delta_layers(model, adapter_name, kind=cls.tuner_layer_cls)
        missing, extra = sorted(set(layers) - set(records)), sorted(set(records) - set(layers))
        if missing:
            raise InvalidSparseIndicesError(
                f"{where}: the file has no tensors for {len(missing)} adapted module(s), e.g. {missing[:3]} "
                "(was target_modules edited, or is it for another model?)."
            )
        if extra:
            raise InvalidSparseIndicesError(
                f"{where}: the file has tensors for modules this model does not adapt: {extra[:5]} "
                "(was target_modules edited, or is it for another model?)."
            )
        return layers

    @classmethod
    def _checked_supports(
        cls, model: nn.Module, adapter_name: str, records: dict[str, ModuleRecord], where: str
    ) -> list[tuple[SparseDeltaLayer, ModuleRecord, torch.Tensor]]:
        """Check that the file covers exactly the layers carrying ``adapter_name`` and that every module passes
        :meth:`_check_record`; change nothing. Returns (layer, record, canonical support) per module."""
        layers = cls._covered_layers(model, adapter_name, records, where)
        return [
            (layer, records[name], records[name].checked if records[name].checked is not None
             else cls._check_record(layer, records[name], f"{where}, module '{name}'"))
            for name, layer in layers.items()
        ]

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: SparseDeltaConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """Next to each module's support and values the file gets an integrity header (``<prefix>header``: the
        weight's shape and CRC-32s of support and values); the support is stored by :meth:`_encode_support`.

        A sharded state dict (FSDP2's DTensor values, as accelerate's ``SHARDED_STATE_DICT`` checkpoints take it
        for torch.distributed.checkpoint) keeps the plain support, whose size is fixed by the budget (a coded
        support's byte count changes when dynamic masks reselect, and a sharded load fills tensors of the sizes the
        model has now), and no header: its checksum would need every rank's shard of the values."""
        saved = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        layers = sparse_delta_layers(model, kind=cls.tuner_layer_cls)
        marker = f".{cls.support_name}."
        compact = {}
        for key, value in saved.items():
            if marker in key:  # "<module>.<support_name>.<adapter>"
                module_key, adapter = key.split(marker, 1)
                layer = layers.get(module_key.removeprefix(PEFT_PREFIX))
                values = saved.get(f"{module_key}.{cls.values_name}.{adapter}")
                if isinstance(values, DTensor):
                    compact[key] = value
                    continue
                key, value, checksummed = cls._encode_support(key, value, getattr(config, "block_size", 1))
                if layer is not None and values is not None:
                    header = integrity_header(layer.storage_shape, checksummed, values)
                    compact[f"{module_key}.{cls.prefix}header.{adapter}"] = header
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
        """Validate every module against its layer before anything touches the model, then give each layer the
        file's support; PEFT copies the values. A bad module raises and leaves every layer as it was."""
        where = f"{cls.prefix[:-1]} adapter '{adapter_name}'"
        injected = getattr(getattr(model, "base_model", None), "_injected_records", {}).pop(adapter_name, None)
        records = cls._records(state_dict, where, reuse=injected)  # right after a load: decoded and checked once
        checked = cls._checked_supports(model, adapter_name, records, where)
        plain = {k: v for k, v in state_dict.items() if not k.rpartition(".")[2].startswith(cls.prefix)}
        for _, record, support in checked:
            plain[f"{record.key}.{cls.support_name}"] = support
            plain[f"{record.key}.{cls.values_name}"] = record.values
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, plain)
        for layer, record, support in checked:  # every module passed: only now change the layers
            cls._apply_support(layer, adapter_name, support, record.values)
        return remapped
