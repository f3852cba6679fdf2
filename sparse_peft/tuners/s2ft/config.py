"""Configuration of S2FT: structured head/channel selection, trained densely on the selected slices."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig
from peft.utils import PeftType

from ..sparse_delta.adapter_file import remember_weights_file
from .architecture import ROLES

S2FT_SELECTIONS = ("random", "weight", "activation", "gradient")


@dataclass
class S2FTConfig(PeftConfig):
    """Per transformer block, train a few attention heads and FFN channels (S2FT: select sparsely, compute densely).

    Attention: the selected heads' input columns of the output projection (``o``) and, with ``value_rows``, the
    matching rows of the value projection (GQA-aware). FFN: the selected channels' input columns of the down
    projection and, with ``up_gate_rows``, the matching rows of up/gate. The update is a structured sparse delta,
    so merge/unmerge/switch/compose work as for ``SparseDeltaConfig``.

    Budget: a LoRA-equivalent ``r`` (the trainable-parameter count of ``LoraConfig(r, target_modules="all-linear")``
    on each block, split ``attention_fraction`` to heads and the rest to channels), or ``heads_ratio`` /
    ``channels_ratio`` (fractions of each block's heads / FFN channels). Selection: ``random`` (seeded),
    ``weight`` (slice norm), ``activation`` (mean |input| on calibration batches) or ``gradient`` (slice gradient
    norm); the last two need :func:`sparse_peft.select_masks` before training.

    Args:
        r (`int | None`, *optional*, defaults to `None`):
            LoRA-equivalent budget per block (all-linear LoRA r).
        heads_ratio (`float | None`, *optional*, defaults to `None`):
            Fraction of attention heads per block.
        channels_ratio (`float | None`, *optional*, defaults to `None`):
            Fraction of FFN channels per block.
        attention_fraction (`float`, *optional*, defaults to `0.5`):
            With r: share of the budget given to attention heads (rest: channels).
        value_rows (`bool`, *optional*, defaults to `False`):
            Also train the selected heads' v_proj rows.
        up_gate_rows (`bool`, *optional*, defaults to `False`):
            Also train the selected channels' up/gate projection rows.
        selection (`Literal['random', 'weight', 'activation', 'gradient']`, *optional*, defaults to `'random'`):
            How heads/channels are chosen: one of ('random', 'weight', 'activation', 'gradient').
        seed (`int`, *optional*, defaults to `0`):
            Seed of the random selection (per block).
        module_roles (`dict[str, str] | None`, *optional*, defaults to `None`):
            Role -> module-name suffix for architectures S2FT does not know; roles: ('o', 'v', 'down', 'up',
            'gate').
        channel_plan (`dict[str, list[int]] | None`, *optional*, defaults to `None`):
            Explicit channel ids per module name (logical input columns of o/down, output rows of v/up/gate);
            overrides budget and selection. compose() writes it; use it to train on a given slice.
        num_attention_heads (`int | None`, *optional*, defaults to `None`):
            Override the model's head count.
        num_key_value_heads (`int | None`, *optional*, defaults to `None`):
            Override the KV head count.
        head_dim (`int | None`, *optional*, defaults to `None`):
            Override the head size.
        target_modules (`list[str] | str | None`, *optional*, defaults to `None`):
            Restrict to these role modules (default: every module with a role).
        exclude_modules (`list[str] | str | None`, *optional*, defaults to `None`):
            Modules to leave alone.
        layers_to_transform (`list[int] | int | None`, *optional*, defaults to `None`):
            Only these layers.
        layers_pattern (`list[str] | str | None`, *optional*, defaults to `None`):
            Layer ModuleList name.
        fused (`bool`, *optional*, defaults to `True`):
            Write the delta into the weight inside the kernels (base speed).
        init_weights (`bool`, *optional*, defaults to `True`):
            Start from a zero delta (identity).
        modules_to_save (`list[str] | None`, *optional*, defaults to `None`):
            Extra modules trained fully.

    Example:

    ```py
    >>> import sparse_peft
    >>> from peft import get_peft_model
    >>> model = get_peft_model(base_model, sparse_peft.S2FTConfig(r=8, selection="weight"))
    ```
    """

    r: int | None = field(default=None, metadata={"help": "LoRA-equivalent budget per block (all-linear LoRA r)."})
    heads_ratio: float | None = field(default=None, metadata={"help": "Fraction of attention heads per block."})
    channels_ratio: float | None = field(default=None, metadata={"help": "Fraction of FFN channels per block."})
    attention_fraction: float = field(
        default=0.5, metadata={"help": "With r: share of the budget given to attention heads (rest: channels)."}
    )
    value_rows: bool = field(default=False, metadata={"help": "Also train the selected heads' v_proj rows."})
    up_gate_rows: bool = field(
        default=False, metadata={"help": "Also train the selected channels' up/gate projection rows."}
    )
    selection: Literal["random", "weight", "activation", "gradient"] = field(
        default="random", metadata={"help": f"How heads/channels are chosen: one of {S2FT_SELECTIONS}."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random selection (per block)."})
    module_roles: dict[str, str] | None = field(
        default=None,
        metadata={"help": f"Role -> module-name suffix for architectures S2FT does not know; roles: {ROLES}."},
    )
    channel_plan: dict[str, list[int]] | None = field(
        default=None,
        metadata={
            "help": "Explicit channel ids per module name (logical input columns of o/down, output rows of v/up/"
            "gate); overrides budget and selection. compose() writes it; use it to train on a given slice."
        },
    )
    num_attention_heads: int | None = field(default=None, metadata={"help": "Override the model's head count."})
    num_key_value_heads: int | None = field(default=None, metadata={"help": "Override the KV head count."})
    head_dim: int | None = field(default=None, metadata={"help": "Override the head size."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Restrict to these role modules (default: every module with a role)."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to leave alone."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Only these layers."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Layer ModuleList name."})
    fused: bool = field(
        default=True, metadata={"help": "Write the delta into the weight inside the kernels (base speed)."}
    )
    init_weights: bool = field(default=True, metadata={"help": "Start from a zero delta (identity)."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra modules trained fully."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.S2FT
        if self.selection not in S2FT_SELECTIONS:
            raise ValueError(f"s2ft selection must be one of {S2FT_SELECTIONS}, got {self.selection!r}.")
        ratios = (self.heads_ratio, self.channels_ratio)
        if self.r is not None and any(x is not None for x in ratios):
            raise ValueError("s2ft: give the budget as r or as heads_ratio/channels_ratio, not both.")
        if self.r is None and all(x is None for x in ratios):
            self.r = 8
        if self.r is not None and (not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0):
            raise ValueError(f"s2ft r must be a positive integer, got {self.r!r}.")
        for name in ("heads_ratio", "channels_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"s2ft {name} must be in [0, 1], got {value!r}.")
        if self.r is None and not any(x for x in ratios) and self.channel_plan is None:
            raise ValueError(
                "s2ft: heads_ratio and channels_ratio select no head and no channel (0 trainable parameters); give "
                "one of them a value in (0, 1], or a budget r."
            )
        if not 0.0 <= self.attention_fraction <= 1.0:
            raise ValueError(f"s2ft attention_fraction must be in [0, 1], got {self.attention_fraction!r}.")
        if self.module_roles is not None and not isinstance(self.module_roles, dict):
            raise ValueError("s2ft module_roles must be a dict mapping roles to module-name suffixes.")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """PEFT's, noting the local weights file: the injection that follows takes each module's channels from it
        (no plan drawn and thrown away) and refuses a file that does not fit the model, leaving it as it was."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        remember_weights_file(config, pretrained_model_name_or_path, subfolder)
        return config
