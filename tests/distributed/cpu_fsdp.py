"""Run accelerate's FSDP on CPU processes (gloo), for tests.

accelerate (1.16) turns ``fsdp=`` / ``ACCELERATE_USE_FSDP`` into ``DistributedType.FSDP`` only for GPU-like
distributed types; on a CPU the same arguments silently train DDP. :func:`route_fsdp_on_cpu` makes the state that
accelerate builds say FSDP whenever it was given an FSDP plugin on CPU processes. Everything after that is the
real code of a GPU run: accelerate's ``fsdp2_prepare_model`` (``fully_shard``), the Trainer's FSDP checkpoints
(full and sharded state dicts through torch.distributed.checkpoint) and their resume. Only the device differs.
"""

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType


def route_fsdp_on_cpu() -> None:
    """Patch ``AcceleratorState.__init__`` in this process (idempotent)."""
    if getattr(AcceleratorState.__init__, "routes_fsdp_on_cpu", False):
        return
    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # a later AcceleratorState() copies PartialState's type over its own: both must say FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    init.routes_fsdp_on_cpu = True
    AcceleratorState.__init__ = init
