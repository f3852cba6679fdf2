"""GROUP_SPARSE_LORA: LoRA with a group-lasso penalty over ranks, channels or modules."""

from .config import GroupSparseLoraConfig
from .layer import GroupSparseLoraLayer
from .model import GroupSparseLoraModel

__all__ = ["GroupSparseLoraConfig", "GroupSparseLoraLayer", "GroupSparseLoraModel"]
