"""TRL / transformers integration of sparse_peft: callbacks that drive sparse updates during training."""

from .callbacks import DynamicMaskHook, ProximalHook, SparseHook, SparseUpdateCallback, register_hook

__all__ = ["DynamicMaskHook", "ProximalHook", "SparseHook", "SparseUpdateCallback", "register_hook"]
