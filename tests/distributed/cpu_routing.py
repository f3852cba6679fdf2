"""Run accelerate's FSDP and DeepSpeed paths on CPU processes (gloo), for tests.

accelerate (1.16) only sets up FSDP and DeepSpeed for accelerator devices:

* ``fsdp=`` / ``ACCELERATE_USE_FSDP`` become ``DistributedType.FSDP`` only for GPU-like distributed types; on a CPU
  the same arguments silently train DDP. :func:`route_fsdp_on_cpu` makes the state say FSDP whenever it was given
  an FSDP plugin on CPU processes.
* DeepSpeed on a CPU-only machine starts (DeepSpeed's CPU accelerator, gloo), but the state keeps ``num_processes``
  at 1 (its backend is "none"), so every gather of the Trainer fails. :func:`count_deepspeed_processes_on_cpu` takes
  the process count and ranks from torch.distributed.

Everything after that is the real code of a GPU run: accelerate's preparation (``fully_shard``, the DeepSpeed
engine and its ZeRO optimizer), the Trainer's checkpoints (FSDP full and sharded state dicts, DeepSpeed's own) and
their resume. Only the device differs.
"""

import os

import torch
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


def count_deepspeed_processes_on_cpu() -> None:
    """Patch ``PartialState.__init__`` in this process (idempotent)."""
    if getattr(PartialState.__init__, "counts_deepspeed_on_cpu", False):
        return
    original = PartialState.__init__

    def init(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        if (self.distributed_type == DistributedType.DEEPSPEED and self.num_processes == 1
                and torch.distributed.is_initialized()):
            self.num_processes = torch.distributed.get_world_size()
            self.process_index = torch.distributed.get_rank()
            self.local_process_index = int(os.environ.get("LOCAL_RANK", 0))

    init.counts_deepspeed_on_cpu = True
    PartialState.__init__ = init
