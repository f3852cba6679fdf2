"""The S2FT tuner: plans heads/channels per block, wraps role modules in :class:`S2FTLinear`, saves channel ids."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from ...indices import InvalidSparseIndicesError, check_values
from ..sparse_delta.model import SparseDeltaModel, _is_supported_base
from .architecture import Architecture, resolve_architecture
from .config import S2FTConfig
from .layer import S2FTLinear
from .plan import Block, choose


class S2FTModel(SparseDeltaModel):
    """Structured head/channel fine-tuning (``PeftType.S2FT``) on the sparse-delta core."""

    prefix: str = "s2ft_"
    tuner_layer_cls = S2FTLinear
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

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
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if not _is_supported_base(base):
                raise TypeError(
                    f"s2ft: module '{name}' (role {role!r}) is a {type(base).__name__}, not a linear-like layer."
                )
            block = blocks.setdefault(arch.block_of(name, role), Block(arch.block_of(name, role)))
            block.modules[name] = role
        if not blocks:
            raise ValueError(
                f"s2ft: no module of the model matches the roles {arch.roles} and target_modules "
                f"{config.target_modules}; set S2FTConfig(module_roles=...) for this architecture."
            )
        linear_sizes = {
            name: sum(_in_out(module.get_base_layer() if isinstance(module, BaseTunerLayer) else module))
            for name, module in self.model.named_modules()
            if ".base_layer" not in name
            and (isinstance(module, BaseTunerLayer) or _is_supported_base(module))
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
        if adapter_name not in self._s2ft_plans:
            self._s2ft_plans[adapter_name] = self.plan(config, adapter_name)
        plan = self._s2ft_plans[adapter_name]
        if current_key not in plan or plan[current_key].numel() == 0:
            return  # no channel of this module is trained under this budget: leave it alone
        if isinstance(target, S2FTLinear):
            layer, new = target, False
        else:
            layer, new = self._create_new_module(config, adapter_name, target, current_key), True
        twin = self._twin_adapter(config, adapter_name, layer)
        channels, values = plan[current_key], None
        if twin is not None:  # TRL's "ref" adapter: an exact copy of the adapter it was made from
            channels = layer.channels(twin).clone()
            values = layer.sparse_delta_values[twin].detach().clone()
        layer.set_channels(
            adapter_name,
            channels,
            values=values,
            init_weights=config.init_weights,
            fused=config.fused,
            needs_calibration=twin is None
            and config.selection in ("activation", "gradient")
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
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(target, BaseTunerLayer) and not isinstance(target, S2FTLinear):
            raise TypeError(f"s2ft: module '{current_key}' already carries another adapter type.")
        role = self.architecture(config).role_of(current_key)
        fan_in_fan_out = type(base).__name__ == "Conv1D"
        return S2FTLinear(target, adapter_name, role=role, fan_in_fan_out=fan_in_fan_out)

    def inject_adapter(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().inject_adapter(*args, **kwargs)
        finally:
            self._s2ft_plans.clear()

    # ---------------------------------------------------------- saving / loading
    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls,
        model: nn.Module,
        config: S2FTConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Validate every module's channel ids and values first, then rebuild each layer's support from the file: a
        bad module raises and leaves every layer as it was."""
        remapped = BaseTuner._remap_adapter_state_dict_for_load.__func__(cls, model, config, adapter_name, state_dict)
        checked = []
        for name, module in model.named_modules():
            if not isinstance(module, S2FTLinear) or adapter_name not in module.sparse_delta_values:
                continue
            where = f"s2ft adapter '{adapter_name}', module '{name.removeprefix('base_model.model.')}'"
            ch_key, val_key = (f"{name}.s2ft_{kind}.{adapter_name}" for kind in ("channels", "values"))
            if ch_key not in remapped or val_key not in remapped:
                missing = "channel ids" if ch_key not in remapped else "values"
                raise InvalidSparseIndicesError(f"{where}: the adapter file has no {missing} for this module.")
            channels = module.check_channels(remapped[ch_key], where)
            values = remapped[val_key]
            check_values(values, where)
            other = module.storage_shape[1 - module.s2ft_axis]
            if values.dim() != 1 or values.numel() != channels.numel() * other:
                raise InvalidSparseIndicesError(
                    f"{where}: {channels.numel()} channels need a 1-D tensor of {channels.numel() * other} values, "
                    f"the file has shape {tuple(values.shape)}."
                )
            checked.append((module, channels, values))
        for module, channels, values in checked:  # every module passed: only now change the layers
            module.set_channels(adapter_name, channels.to(module._weight_device()), values=values)
            module.needs_calibration[adapter_name] = False
        return remapped


def _in_out(layer: nn.Module) -> tuple[int, int]:
    from peft.tuners.tuners_utils import _get_in_out_features

    fin, fout = _get_in_out_features(layer)
    return (fin or 0), (fout or 0)

