"""The S2FT tuner: plans heads/channels per block, wraps role modules in :class:`S2FTLinear`, saves channel ids."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from ...indices import InvalidSparseIndicesError, check_checksums, check_header_shape, check_values
from .._base_layers import base_of, check_supported, is_supported, stores_in_out
from ..sparse_delta.adapter_file import ModuleRecord
from ..sparse_delta.model import SparseDeltaModel
from .architecture import Architecture, resolve_architecture
from .config import S2FTConfig
from .layer import S2FTLinear
from .plan import Block, choose


class S2FTModel(SparseDeltaModel):
    """Structured head/channel fine-tuning (``PeftType.S2FT``) on the sparse-delta core."""

    prefix: str = "s2ft_"
    tuner_layer_cls = S2FTLinear
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    support_name = "s2ft_channels"
    values_name = "s2ft_values"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._s2ft_plans: dict[str, dict[str, torch.Tensor]] = {}
        super().__init__(*args, **kwargs)

    # ---------------------------------------------------------- planning
    def architecture(self, config: S2FTConfig) -> Architecture:
        return resolve_architecture(
            getattr(self.model, "config", None),
            config.module_roles,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )

    def _prepare_adapter_config(self, peft_config: S2FTConfig, model_config: dict) -> S2FTConfig:
        """Default targets: every module with a role the config trains (o, down; v / up / gate if asked)."""
        if peft_config.target_modules is None:
            arch = self.architecture(peft_config)
            wanted = {"o", "down"} | ({"v"} if peft_config.value_rows else set())
            wanted |= {"up", "gate"} if peft_config.up_gate_rows else set()
            peft_config.target_modules = sorted({s for role, s in arch.roles.items() if role in wanted})
        return peft_config

    def blocks(self, config: S2FTConfig, adapter_name: str) -> dict[str, Block]:
        """Targeted role modules grouped by transformer block, with each block's all-linear LoRA cost."""
        arch = self.architecture(config)
        blocks: dict[str, Block] = {}
        for name, module in self.model.named_modules():
            role = arch.role_of(name)
            if role is None or not self._check_target_module_exists(config, name):
                continue
            if role in ("v",) and not config.value_rows or role in ("up", "gate") and not config.up_gate_rows:
                continue
            if not is_supported(module):
                raise TypeError(
                    f"s2ft: module '{name}' (role {role!r}) is a {type(base_of(module)).__name__}, not a linear-like "
                    "layer."
                )
            block = blocks.setdefault(arch.block_of(name, role), Block(arch.block_of(name, role)))
            block.modules[name] = role
        if not blocks:
            raise ValueError(
                f"s2ft: no module of the model matches the roles {arch.roles} and target_modules "
                f"{config.target_modules}; set S2FTConfig(module_roles=...) for this architecture."
            )
        linear_sizes = {
            name: sum(_in_out(base_of(module)))
            for name, module in self.model.named_modules()
            if ".base_layer" not in name and (isinstance(module, BaseTunerLayer) or is_supported(module))
        }
        for block in blocks.values():
            prefix = block.name + "." if block.name else ""
            block.lora_cost_per_rank = sum(size for name, size in linear_sizes.items() if name.startswith(prefix))
        return blocks

    def plan(
        self,
        config: S2FTConfig,
        adapter_name: str,
        scores: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Channel ids per targeted module name, for static selection or for calibration ``scores`` per block."""
        if config.channel_plan is not None:
            blocks = self.blocks(config, adapter_name)
            targeted = {name for block in blocks.values() for name in block.modules}
            unknown = set(config.channel_plan) - targeted
            if unknown:
                raise ValueError(f"s2ft channel_plan names modules that are not targeted role modules: {sorted(unknown)}")
            return {name: torch.tensor(ids, dtype=torch.long) for name, ids in config.channel_plan.items()}
        arch = self.architecture(config)
        modules = dict(self.model.named_modules())
        plan: dict[str, torch.Tensor] = {}
        for block in self.blocks(config, adapter_name).values():
            block_scores = scores.get(block.name) if scores is not None else None
            plan.update(choose(block, arch, config, modules.__getitem__, block_scores))
        return plan

    # ---------------------------------------------------------- injection
    def _create_and_replace(
        self,
        config: S2FTConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        loading = self._loading.get(adapter_name)
        if adapter_name not in self._s2ft_plans:  # a loaded adapter's plan is its file's channels
            self._s2ft_plans[adapter_name] = (
                self.plan(config, adapter_name) if loading is None
                else {name: record.support for name, record in loading.items()}
            )
        plan = self._s2ft_plans[adapter_name]
        if current_key not in plan or plan[current_key].numel() == 0:
            return  # no channel of this module is trained under this budget: leave it alone
        if isinstance(target, S2FTLinear):
            layer, new = target, False
        else:
            layer, new = self._create_new_module(config, adapter_name, target, current_key), True
        twin = self._twin_adapter(config, adapter_name, layer)
        channels, values = plan[current_key], None
        if loading is not None:
            record = self._loaded_record(adapter_name, current_key, layer)
            channels, values = record.checked, record.values.clone()  # the record keeps the file's tensors
        if twin is not None:  # TRL's "ref" adapter: an exact copy of the adapter it was made from
            channels = layer.channels(twin).clone()
            values = layer.support_values[twin].detach().clone()
        layer.set_channels(
            adapter_name,
            channels,
            values=values,
            init_weights=config.init_weights,
            fused=config.fused,
            needs_calibration=twin is None
            and config.selection in ("activation", "gradient")
            and loading is None
            and not config.inference_mode,
            inference_mode=config.inference_mode,
        )
        if new:
            if adapter_name not in self.active_adapters:
                layer.requires_grad_(False)
            self._replace_module(parent, target_name, layer, target)

    def _create_new_module(  # type: ignore[override]
        self, config: S2FTConfig, adapter_name: str, target: nn.Module, current_key: str = ""
    ) -> S2FTLinear:
        if isinstance(target, BaseTunerLayer) and not isinstance(target, S2FTLinear):
            raise TypeError(f"s2ft: module '{current_key}' already carries another adapter type.")
        base = check_supported(target, "s2ft")
        role = self.architecture(config).role_of(current_key)
        return S2FTLinear(target, adapter_name, role=role, fan_in_fan_out=stores_in_out(base))

    def inject_adapter(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().inject_adapter(*args, **kwargs)
        finally:
            self._s2ft_plans.clear()

    # ---------------------------------------------------------- saving / loading
    @classmethod
    def _encode_support(
        cls, key: str, support: torch.Tensor, block_size: int = 1
    ) -> tuple[str, torch.Tensor, torch.Tensor]:
        return key, support, support  # channel ids: a few ints, stored (and checksummed) as they are

    @classmethod
    def _decode_support(cls, parts: dict[str, torch.Tensor], where: str) -> tuple[torch.Tensor, int]:
        if cls.support_name not in parts:
            raise InvalidSparseIndicesError(f"{where}: the adapter file has no channel ids for this module.")
        return parts[cls.support_name], 1

    @classmethod
    def _check_record(cls, layer: S2FTLinear, record: ModuleRecord, where: str) -> torch.Tensor:  # type: ignore[override]
        """Shape (from the integrity header), channel ids, value count and finiteness, checksums."""
        if record.header is not None:
            check_header_shape(record.header, layer.storage_shape, where)
        channels = layer.check_channels(record.support, where)
        check_values(record.values, where)
        other = layer.storage_shape[1 - layer.s2ft_axis]
        if record.values.dim() != 1 or record.values.numel() != channels.numel() * other:
            raise InvalidSparseIndicesError(
                f"{where}: {channels.numel()} channels need a 1-D tensor of {channels.numel() * other} values, "
                f"the file has shape {tuple(record.values.shape)}."
            )
        if record.header is not None:
            check_checksums(record.header, channels, record.values, where)
        return channels

    @classmethod
    def _apply_support(cls, layer: S2FTLinear, adapter_name: str, support: torch.Tensor,  # type: ignore[override]
                       values: torch.Tensor) -> None:
        layer.set_channels(adapter_name, support.to(layer._weight_device()), values=values)
        layer.needs_calibration[adapter_name] = False


def _in_out(layer: nn.Module) -> tuple[int, int]:
    from peft.tuners.tuners_utils import _get_in_out_features

    fin, fout = _get_in_out_features(layer)
    return (fin or 0), (fout or 0)

