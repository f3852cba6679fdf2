"""S2FT: structured sparse fine-tuning of selected attention heads and FFN channels (a structured sparse delta)."""

from .architecture import Architecture, UnknownArchitectureError, resolve_architecture
from .config import S2FTConfig
from .layer import S2FTLinear
from .model import S2FTModel

__all__ = [
    "Architecture",
    "S2FTConfig",
    "S2FTLinear",
    "S2FTModel",
    "UnknownArchitectureError",
    "resolve_architecture",
]
