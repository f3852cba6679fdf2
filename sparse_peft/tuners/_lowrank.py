"""Shared core of the two sparsity-regularised LoRA variants (SoRA and group-sparse LoRA).

Both are ``y = W x + s·B(g ⊙ A·dropout(x))`` with ``s = lora_alpha / r``; SoRA trains the gate ``g``, group-sparse
LoRA has no gate (``g = 1``). They differ only in the penalty whose proximal step runs after each optimizer step, so
config fields, the tuner layer (forward, merge, unmerge, delta weight) and the tuner model live here once; the
method packages subclass them with their own PEFT prefix and proximal step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    get_quantization_kwargs,
    resolve_quantization_backend,
)
from peft.utils.other import transpose
from torch import nn

from ..proximal import LAMBDA_SCHEDULES, LambdaSchedule, ProximalLayer
from ._base_layers import check_supported, stores_in_out
from ._mixed_batch import adapter_names_hooks, mixed_batch_forward
from ._quantized import base_weight
from ._twin import twin_adapter


@dataclass
class SparseLowRankConfig(PeftConfig):
    """Fields shared by :class:`SoraConfig` and :class:`GroupSparseLoraConfig` (LoRA's names where they overlap).

    Args:
        r (`int`, *optional*, defaults to `8`):
            Starting rank; the penalty then switches ranks (or groups) off.
        lora_alpha (`float`, *optional*, defaults to `8`):
            Scaling numerator: the adapter output is multiplied by ``lora_alpha / r``.
        target_modules (`list[str] | str | None`, *optional*, defaults to `None`):
            Module names or a regex (or ``"all-linear"``); ``None`` uses PEFT's LoRA defaults for the architecture.
        exclude_modules (`list[str] | str | None`, *optional*, defaults to `None`):
            Module names or a regex not to adapt.
        lora_dropout (`float`, *optional*, defaults to `0.0`):
            Dropout on the adapter input.
        fan_in_fan_out (`bool`, *optional*, defaults to `False`):
            ``True`` for layers storing ``(in, out)`` weights (GPT-2 ``Conv1D``; set automatically).
        bias (`str`, *optional*, defaults to `"none"`):
            ``"none"``, ``"all"`` or ``"<method>_only"``, as in LoRA.
        modules_to_save (`list[str] | None`, *optional*, defaults to `None`):
            Further modules trained in full and saved with the adapter (e.g. a classifier head).
        init_weights (`bool`, *optional*, defaults to `True`):
            ``True``: B = 0 (and gates = 1), so the adapter starts as the identity; ``False``: random (tests only).
        layers_to_transform (`list[int] | int | None`, *optional*, defaults to `None`):
            Only these layer indices, as in LoRA.
        layers_pattern (`list[str] | str | None`, *optional*, defaults to `None`):
            Name of the layers' ``ModuleList``, as in LoRA.
        sparse_lambda (`float`, *optional*, defaults to `0.1`):
            Penalty strength λ (at the first stage of the schedule). The proximal step shrinks by lr·λ (groups:
            lr·λ·√|g|) per optimizer step while Adam moves a weight by about lr, so useful values are O(0.1-1); see
            docs/sora_group_sparse.md for a sweep.
        lambda_schedule (`str`, *optional*, defaults to `"constant"`):
            ``constant``, ``linear``, ``log_linear`` or ``exponential`` rise of λ over stages.
        lambda_max (`float | None`, *optional*, defaults to `None`):
            λ in the last stage (required unless the schedule is ``constant``).
        lambda_num_stages (`int`, *optional*, defaults to `1`):
            Number of stages of the schedule.
        lambda_stage_steps (`int | None`, *optional*, defaults to `None`):
            Optimizer steps per stage; ``None`` splits the Trainer's total steps evenly.
    """

    r: int = field(default=8, metadata={"help": "Starting rank."})
    lora_alpha: float = field(default=8, metadata={"help": "The adapter output is scaled by lora_alpha / r."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names or regex to adapt; 'all-linear' for every linear layer."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or regex to skip."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "True for (in, out) weights such as GPT-2 Conv1D."}
    )
    bias: str = field(default="none", metadata={"help": "'none', 'all' or '<method>_only'."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Other modules to train fully and save (e.g. a classification head)."}
    )
    init_weights: bool = field(default=True, metadata={"help": "False: random init, for tests only."})
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Layer indices to adapt."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer ModuleList."}
    )
    sparse_lambda: float = field(
        default=0.1,
        metadata={
            "help": "Penalty strength λ (first stage). Each step shrinks by lr·λ while Adam moves a weight by about "
            "lr, so useful values are O(0.1-1)."
        },
    )
    lambda_schedule: Literal["constant", "linear", "log_linear", "exponential"] = field(
        default="constant", metadata={"help": f"How λ rises over stages: one of {LAMBDA_SCHEDULES}."}
    )
    lambda_max: float | None = field(default=None, metadata={"help": "λ in the last stage."})
    lambda_num_stages: int = field(default=1, metadata={"help": "Number of stages of the λ schedule."})
    lambda_stage_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps per stage; None: split the training steps evenly."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified."
            )
        self.lambda_schedule_obj()  # validate now rather than at the first step

    def lambda_schedule_obj(self) -> LambdaSchedule:
        """The :class:`LambdaSchedule` these fields describe."""
        return LambdaSchedule(
            start=self.sparse_lambda,
            kind=self.lambda_schedule,
            end=self.lambda_max,
            num_stages=self.lambda_num_stages,
            stage_steps=self.lambda_stage_steps,
        )


class SparseLowRankLayer(nn.Module, BaseTunerLayer, ProximalLayer):
    """Wraps ``nn.Linear``, GPT-2 ``Conv1D`` or a quantized linear layer with ``s·B(g ⊙ A·x)``.

    Subclasses set ``prefix`` and the attribute names; state-dict keys are ``<prefix>A.<adapter>`` etc. The gate
    attribute is optional (``gate_name = None`` means no gate).
    """

    prefix: ClassVar[str]
    a_name: ClassVar[str]
    b_name: ClassVar[str]
    dropout_name: ClassVar[str]
    gate_name: ClassVar[str | None] = None
    extra_dict_names: ClassVar[
        tuple[str, ...]
    ] = ()  # further per-adapter dicts a subclass fills in update_layer

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: SparseLowRankConfig, **kwargs: Any
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(
            self.get_base_layer(), get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
        )
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.sparse_schedule: dict[str, LambdaSchedule] = {}
        for name in self.extra_dict_names:
            setattr(self, name, {})
        setattr(self, self.a_name, nn.ParameterDict({}))
        setattr(self, self.b_name, nn.ParameterDict({}))
        setattr(self, self.dropout_name, nn.ModuleDict({}))
        if self.gate_name is not None:
            setattr(self, self.gate_name, nn.ParameterDict({}))
        self._disable_adapters = False
        self.merged_adapters = []
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"Unsupported layer type {type(self.get_base_layer())}")
        self.in_features, self.out_features = in_features, out_features
        self.fan_in_fan_out = config.fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    # -------------------------------------------------------------------------------------------- accessors
    def weight_A(self, adapter: str) -> nn.Parameter:
        """``A`` (``r × in``) of an adapter."""
        return getattr(self, self.a_name)[adapter]

    def weight_B(self, adapter: str) -> nn.Parameter:
        """``B`` (``out × r``) of an adapter."""
        return getattr(self, self.b_name)[adapter]

    def gate(self, adapter: str) -> nn.Parameter | None:
        """The gate vector (length r), or ``None`` for ungated methods."""
        return None if self.gate_name is None else getattr(self, self.gate_name)[adapter]

    # -------------------------------------------------------------------------------------------- setup
    def update_layer(self, adapter_name: str, config: SparseLowRankConfig, **kwargs: Any) -> None:
        """Add (or re-initialise) one adapter on this layer."""
        r = config.r
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha / r
        self.sparse_schedule[adapter_name] = config.lambda_schedule_obj()
        dropout = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        getattr(self, self.dropout_name)[adapter_name] = dropout
        getattr(self, self.a_name)[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))
        getattr(self, self.b_name)[adapter_name] = nn.Parameter(torch.empty(self.out_features, r))
        if self.gate_name is not None:
            getattr(self, self.gate_name)[adapter_name] = nn.Parameter(torch.empty(r))
        self.reset_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, init_weights: bool) -> None:
        """LoRA's init (A Kaiming-uniform, B = 0, gate = 1) or, with ``init_weights=False``, a random non-zero adapter."""
        a, b, g = self.weight_A(adapter_name), self.weight_B(adapter_name), self.gate(adapter_name)
        if a.is_meta:
            return
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(b)
            if g is not None:
                nn.init.ones_(g)
        else:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            if g is not None:
                nn.init.uniform_(g, 0.5, 1.5)

    # -------------------------------------------------------------------------------------------- math
    def effective_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B·diag(g))``: the plain LoRA factors this adapter equals (scaling not included)."""
        a, b, g = self.weight_A(adapter), self.weight_B(adapter), self.gate(adapter)
        return a, (b if g is None else b * g)

    @torch.no_grad()
    def active_ranks(self, adapter: str) -> torch.Tensor:
        """Indices of ranks that still contribute: non-zero gate, non-zero row of A and column of B."""
        a, b = self.effective_factors(adapter)
        alive = (a.detach().abs().amax(dim=1) > 0) & (b.detach().abs().amax(dim=0) > 0)
        return alive.nonzero().flatten()

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``s·B·diag(g)·A`` in the base weight's layout (transposed for ``fan_in_fan_out``)."""
        a, b = self.effective_factors(adapter)
        dtype = a.dtype
        # half-precision matmuls are slow (or missing) on CPU: compute in float32 there
        if a.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            a, b = a.float(), b.float()
        delta = transpose(b @ a, self.fan_in_fan_out) * self.scaling[adapter]
        return delta.to(dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the deltas to the base weight (float rounding makes merge/unmerge exact only to tolerance)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in getattr(self, self.a_name):
                continue
            weight = base_weight(self)
            delta = self.get_delta_weight(adapter).to(device=weight.device, dtype=weight.dtype)
            if safe_merge:
                weight = weight.clone() + delta
                if not torch.isfinite(weight).all():
                    raise ValueError(
                        f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken"
                    )
            else:
                weight += delta
            self.set_base_weight(weight)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract the merged deltas again, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in getattr(self, self.a_name):
                continue
            weight = base_weight(self)
            weight -= self.get_delta_weight(adapter).to(device=weight.device, dtype=weight.dtype)
            self.set_base_weight(weight)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None and not self.disable_adapters:
            return mixed_batch_forward(self, x, adapter_names, *args, **kwargs)
        if self.training:
            self.note_training_forward()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        result_dtype = result.dtype
        a_dict = getattr(self, self.a_name)
        for adapter in self.active_adapters:
            if adapter in a_dict:
                result = result + self.adapter_output(adapter, x)
        return result.to(result_dtype)

    def holds_adapter(self, name: str) -> bool:
        return name in getattr(self, self.a_name)

    def adapter_output(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """``s·B(g ⊙ A·dropout(x))``: the adapter's own output (mixed-adapter batches use it per row group)."""
        a, b, g = self.weight_A(adapter), self.weight_B(adapter), self.gate(adapter)
        h = F.linear(getattr(self, self.dropout_name)[adapter](self._cast_input_dtype(x, a.dtype)), a)
        if g is not None:
            h = h * g
        return F.linear(h, b) * self.scaling[adapter]

    @torch.no_grad()
    def copy_adapter(self, source: str, target: str) -> None:
        """Make adapter ``target`` an exact copy of ``source`` (factors, gate and any extra per-adapter state)."""
        names = [self.a_name, self.b_name] + ([self.gate_name] if self.gate_name is not None else [])
        for name in names:
            params = getattr(self, name)
            params[target].data.copy_(params[source].data)
        for name in self.extra_dict_names:
            table = getattr(self, name)
            if source in table:
                value = table[source]
                table[target] = value.detach().clone() if isinstance(value, torch.Tensor) else value

    # -------------------------------------------------------------------------------------------- misc
    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def sparsity(self, adapter_name: str) -> tuple[int, int]:
        return int(self.active_ranks(adapter_name).numel()), self.r[adapter_name]

    def __repr__(self) -> str:
        return self.prefix.rstrip("_") + "." + super().__repr__()


class SparseLowRankModel(BaseTuner):
    """Injects a :class:`SparseLowRankLayer` subclass into every targeted linear-like module."""

    tuner_layer_cls: type[SparseLowRankLayer]
    # the module actually created; its name contains "Linear" because PEFT's "all-linear" recognises already
    # adapted layers by that convention
    linear_cls: type[SparseLowRankLayer]
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        config: SparseLowRankConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config)
            twin = self._twin_adapter(config, adapter_name, target)
            if twin is not None:
                target.copy_adapter(twin, adapter_name)
            return
        new_module = self._create_new_module(config, adapter_name, target, **get_quantization_kwargs(self))
        if adapter_name not in self.active_adapters:
            # an additional adapter is not trainable until set_adapter selects it
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Mixed-adapter batches (``adapter_names=[...]``), as PEFT's LoRA (see :mod:`._mixed_batch`)."""
        with adapter_names_hooks(self, self.tuner_layer_cls, set(self.peft_config), **kwargs):
            yield

    def _twin_adapter(
        self, config: SparseLowRankConfig, adapter_name: str, layer: SparseLowRankLayer
    ) -> str | None:
        """The adapter a new one must copy, gate included (TRL's reference adapter; see :func:`twin_adapter`)."""
        return twin_adapter(self.peft_config, config, adapter_name, getattr(layer, layer.a_name))

    def _create_new_module(
        self, config: SparseLowRankConfig, adapter_name: str, target: nn.Module, **kwargs: Any
    ) -> SparseLowRankLayer:
        in_out = stores_in_out(check_supported(target, self.prefix.rstrip("_")))
        if in_out and not config.fan_in_fan_out:
            warnings.warn("The target module is a Conv1D: setting fan_in_fan_out=True.", stacklevel=2)
            config.fan_in_fan_out = True
        elif not in_out and config.fan_in_fan_out:
            warnings.warn("The target module is a linear layer: setting fan_in_fan_out=False.", stacklevel=2)
            config.fan_in_fan_out = False
        return self.linear_cls(target, adapter_name, config, **kwargs)
