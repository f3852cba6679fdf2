"""SoRA tuner model."""

from __future__ import annotations

from .._lowrank import SparseLowRankModel
from .layer import Linear, SoraLayer


class SoraModel(SparseLowRankModel):
    """Wraps every targeted linear-like module in a :class:`SoraLayer` (``get_peft_model(base, SoraConfig(...))``)."""

    prefix: str = "sora_"
    tuner_layer_cls = SoraLayer
    linear_cls = Linear
