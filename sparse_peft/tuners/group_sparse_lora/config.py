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
        group_by (`str`, *optional*, defaults to `"rank"`):
            The groups of the group lasso: ``rank``, ``row``, ``column`` or ``module`` (see above).
        **fields: every other field is :class:`~sparse_peft.tuners._lowrank.SparseLowRankConfig`'s (``r``,
            ``lora_alpha``, ``target_modules``, ``sparse_lambda``, the λ schedule, ...), shared with SoRA.

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
