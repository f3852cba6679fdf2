"""TRL / transformers integration of sparse_peft.

``import trainers`` makes every ``transformers.Trainer`` (hence TRL's SFTTrainer / DPOTrainer) drive sparse_peft's
updates automatically (see :mod:`trainers.integration`); :class:`SparsePOTrainer` adds SparsePO's token-masked
preference loss.
"""

from .callbacks import DynamicMaskHook, ProximalHook, SparseHook, SparseUpdateCallback, register_hook
from .integration import attach, install, installed, uninstall
from .sparsepo import MaskNetwork, SparsePOConfig, SparsePOTrainer, activation_mask

install()

__all__ = [
    "DynamicMaskHook",
    "MaskNetwork",
    "ProximalHook",
    "SparseHook",
    "SparsePOConfig",
    "SparsePOTrainer",
    "SparseUpdateCallback",
    "activation_mask",
    "attach",
    "install",
    "installed",
    "register_hook",
    "uninstall",
]
