"""SPARSE_DELTA: sparse high-rank deltas (SHiRA / SpIEL / LT-SFT style)."""

from .config import SparseDeltaConfig
from .layer import CalibrationRequiredError, SparseDeltaLayer, SparseDeltaLinear
from .model import SparseDeltaModel

__all__ = [
    "CalibrationRequiredError",
    "SparseDeltaConfig",
    "SparseDeltaLayer",
    "SparseDeltaLinear",
    "SparseDeltaModel",
]
