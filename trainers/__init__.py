"""TRL / transformers integration of sparse_peft (the layer above the core; the core never imports it).

Importing it changes nothing in transformers or TRL. The sparse updates that happen between optimizer steps (SoRA and
group-sparse LoRA proximal steps, dynamic-mask reselection) need :class:`SparseUpdateCallback` on the trainer:
``attach(trainer)`` gives one trainer the callback, or ``install()`` (reversible with ``uninstall()``) gives it to
every Trainer built afterwards, TRL's included; see :mod:`sparse_peft.trainers.integration`.
:class:`SparsePOTrainer` adds SparsePO's token-masked preference loss (and attaches the callback itself).
"""

if __name__ == "sparse_peft.trainers":
    from .callbacks import DynamicMaskHook, ProximalHook, SparseHook, SparseUpdateCallback, register_hook
    from .integration import attach, install, installed, uninstall
    from .sparsepo import (
        MaskNetwork,
        SparsePOConfig,
        SparsePOTrainer,
        activation_mask,
        completion_token_terms,
    )
else:  # `import trainers` from a source checkout: the deprecated pre-0.2 name
    from sparse_peft._renamed import redirect

    redirect(__name__, "sparse_peft.trainers")

__all__ = [
    "DynamicMaskHook",
    "MaskNetwork",
    "ProximalHook",
    "SparseHook",
    "SparsePOConfig",
    "SparsePOTrainer",
    "SparseUpdateCallback",
    "activation_mask",
    "completion_token_terms",
    "attach",
    "install",
    "installed",
    "register_hook",
    "uninstall",
]
