"""Run under ``accelerate launch --num_processes 2 --cpu``: DDP training with a dynamic sparse mask.

Each rank sees different data, so rank-local regrowth scores differ; after every reselection the ranks must
still hold identical indices and values. Writes one JSON file per rank into the directory given as argv[1].
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import get_peft_model

from sparse_peft import SparseDeltaConfig
from sparse_peft.dynamic import DynamicMasks
from sparse_peft.embedded.toy import chain_batch, successor_table, tiny_llama
from sparse_peft.masks import sparse_delta_layers


def main(out_dir: str) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    config = SparseDeltaConfig(target_modules="all-linear", density=0.05, reselect_every=3, regrow_window=2,
                               reselect_fraction=0.5, reselect_schedule="constant")
    model = get_peft_model(tiny_llama(0), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    dynamic = DynamicMasks(model, optimizer, total_steps=9)
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    gen = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    table = successor_table(0)
    snapshots = []
    ddp_model.train()
    for _ in range(9):
        batch = chain_batch(8, table, gen)
        accelerator.backward(ddp_model(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
        if dynamic.step():
            layers = sparse_delta_layers(model)
            snapshots.append({n: layer.support_indices["default"].tolist() for n, layer in layers.items()})
    values = {n: layer.support_values["default"].detach().tolist() for n, layer in sparse_delta_layers(model).items()}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"indices": snapshots, "values": values}))


if __name__ == "__main__":
    main(sys.argv[1])
