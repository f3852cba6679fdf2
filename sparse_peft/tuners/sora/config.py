"""SoRA configuration."""

from __future__ import annotations

from dataclasses import dataclass

from peft.utils import PeftType

from .._lowrank import SparseLowRankConfig


@dataclass
class SoraConfig(SparseLowRankConfig):
    """SoRA (arXiv 2311.11696): LoRA with a gate ``g`` between A and B, ``y = Wx + s·B(g ⊙ Ax)``.

    After every optimizer step the gate takes the soft-threshold step ``g ← sign(g)·max(|g| − lr·λ, 0)`` (driven by
    ``sparse_peft.trainers.attach(trainer)`` or :func:`sparse_peft.proximal.apply_proximal_step`), so ranks switch
    off exactly; :func:`sparse_peft.export_to_lora` then drops them and folds ``g`` into ``B``.
    ``bias="sora_only"`` trains the wrapped layers' biases.

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

    Example:

    ```py
    >>> import sparse_peft
    >>> from peft import get_peft_model
    >>> from sparse_peft.trainers import attach
    >>> model = get_peft_model(base_model, sparse_peft.SoraConfig(target_modules="all-linear", r=8, sparse_lambda=0.1))
    >>> attach(trainer)  # the Trainer then takes the gates' proximal step after every optimizer step
    ```
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.SORA
