"""SoRA configuration."""

from __future__ import annotations

from dataclasses import dataclass

from peft.utils import PeftType

from .._lowrank import SparseLowRankConfig


@dataclass
class SoraConfig(SparseLowRankConfig):
    """SoRA (arXiv 2311.11696): LoRA with a gate ``g`` between A and B, ``y = Wx + s·B(g ⊙ Ax)``.

    After every optimizer step the gate takes the soft-threshold step ``g ← sign(g)·max(|g| − lr·λ, 0)`` (driven by
    ``trainers.SparseUpdateCallback`` or :func:`sparse_peft.proximal.apply_proximal_step`), so ranks switch off
    exactly; :func:`sparse_peft.export_to_lora` then drops them and folds ``g`` into ``B``. Fields: see
    :class:`~sparse_peft.tuners._lowrank.SparseLowRankConfig`; ``bias="sora_only"`` trains the wrapped layers' biases.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.SORA
