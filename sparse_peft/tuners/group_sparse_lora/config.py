"""Group-sparse LoRA configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.utils import PeftType

from .._lowrank import SparseLowRankConfig

GROUP_BY = ("rank", "row", "column", "module")


@dataclass
class GroupSparseLoraConfig(SparseLowRankConfig):
    """LoRA with the group-lasso penalty ``λ Σ_g √|g|·‖θ_g‖₂`` (GS-LoRA), proximal (block soft-threshold) steps.

    ``group_by`` picks the groups: ``rank`` (row i of A with column i of B: zero groups are ranks that
    :func:`sparse_peft.export_to_lora` drops), ``row`` (output channel: a row of B), ``column`` (input channel: a
    column of A) or ``module`` (the whole adapter of one module).

    Args:
        r (`int`, *optional*, defaults to `8`):
            Starting rank.
        lora_alpha (`float`, *optional*, defaults to `8`):
            The adapter output is scaled by lora_alpha / r.
        target_modules (`list[str] | str | None`, *optional*, defaults to `None`):
            Module names or regex to adapt; 'all-linear' for every linear layer.
        exclude_modules (`list[str] | str | None`, *optional*, defaults to `None`):
            Module names or regex to skip.
        lora_dropout (`float`, *optional*, defaults to `0.0`):
            Dropout on the adapter input.
        fan_in_fan_out (`bool`, *optional*, defaults to `False`):
            True for (in, out) weights such as GPT-2 Conv1D.
        bias (`str`, *optional*, defaults to `'none'`):
            'none', 'all' or '<method>_only'.
        modules_to_save (`list[str] | None`, *optional*, defaults to `None`):
            Other modules to train fully and save (e.g. a classification head).
        init_weights (`bool`, *optional*, defaults to `True`):
            False: random init, for tests only.
        layers_to_transform (`list[int] | int | None`, *optional*, defaults to `None`):
            Layer indices to adapt.
        layers_pattern (`list[str] | str | None`, *optional*, defaults to `None`):
            Name of the layer ModuleList.
        sparse_lambda (`float`, *optional*, defaults to `0.1`):
            Penalty strength λ (first stage). Each step shrinks by lr·λ while Adam moves a weight by about lr,
            so useful values are O(0.1-1).
        lambda_schedule (`Literal['constant', 'linear', 'log_linear', 'exponential']`, *optional*, defaults to `'constant'`):
            How λ rises over stages: one of ('constant', 'linear', 'log_linear', 'exponential').
        lambda_max (`float | None`, *optional*, defaults to `None`):
            λ in the last stage.
        lambda_num_stages (`int`, *optional*, defaults to `1`):
            Number of stages of the λ schedule.
        lambda_stage_steps (`int | None`, *optional*, defaults to `None`):
            Optimizer steps per stage; None: split the training steps evenly.
        group_by (`Literal['rank', 'row', 'column', 'module']`, *optional*, defaults to `'rank'`):
            Groups of the group lasso, one of ('rank', 'row', 'column', 'module').

    Example:

    ```py
    >>> import sparse_peft
    >>> from peft import get_peft_model
    >>> config = sparse_peft.GroupSparseLoraConfig(target_modules="all-linear", r=8, group_by="rank")
    >>> model = get_peft_model(base_model, config)
    ```
    """

    group_by: Literal["rank", "row", "column", "module"] = field(
        default="rank", metadata={"help": f"Groups of the group lasso, one of {GROUP_BY}."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.GROUP_SPARSE_LORA
        if self.group_by not in GROUP_BY:
            raise ValueError(f"group_by must be one of {GROUP_BY}, got {self.group_by!r}")
