"""SORA: sparse low-rank adaptation with a soft-thresholded rank gate."""

from .config import SoraConfig
from .layer import SoraLayer
from .model import SoraModel

__all__ = ["SoraConfig", "SoraLayer", "SoraModel"]
