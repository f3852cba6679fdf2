"""Run under ``torchrun --nproc_per_node 2`` (gloo on CPU): FSDP2 (``fully_shard`` on every decoder layer and the
root) training of a dynamic SPARSE_DELTA adapter with :class:`DynamicMasks`, the fused path included.

The values and their Adam state are sharded DTensors; every reselection must leave all ranks with identical indices
and the same full values. Each rank trains on different data. Writes ``rank<i>.json`` into the directory argv[1].
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.fsdp import fully_shard

from sparse_peft import SparseDeltaConfig
from sparse_peft.dynamic import DynamicMasks
from sparse_peft.embedded.toy import chain_batch, successor_table, tiny_llama
from sparse_peft.masks import sparse_delta_layers


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = SparseDeltaConfig(target_modules="all-linear", density=0.05, reselect_every=3, regrow_window=2,
                               reselect_fraction=0.5, reselect_schedule="constant")
    model = get_peft_model(tiny_llama(0), config)
    for block in model.base_model.model.model.layers:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    dynamic = DynamicMasks(model, optimizer, total_steps=9)
    gen = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    table = successor_table(0)
    snapshots, losses = [], []
    model.train()
    for _ in range(9):
        loss = model(**chain_batch(8, table, gen)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if dynamic.step():
            layers = sparse_delta_layers(model)
            snapshots.append({n: layer.support_indices["default"].tolist() for n, layer in layers.items()})
    values = {}
    for name, layer in sparse_delta_layers(model).items():
        param = layer.support_values["default"]
        values[name] = (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().tolist()
        sharded = type(param).__name__ == "DTensor"
    Path(out_dir, f"rank{rank}.json").write_text(
        json.dumps({"indices": snapshots, "values": values, "losses": losses, "sharded": sharded})
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
