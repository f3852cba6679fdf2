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
        **fields: every field is :class:`~sparse_peft.tuners._lowrank.SparseLowRankConfig`'s (``r``,
            ``lora_alpha``, ``target_modules``, ``sparse_lambda``, the λ schedule, ...), shared with group-sparse
            LoRA.

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
