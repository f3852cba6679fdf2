"""Run under ``torchrun --nproc_per_node 2`` (gloo on CPU): FSDP2 training of a fused SPARSE_DELTA adapter under one
sharding variant, against a single-process run on the same data.

The fused path writes ``W0[idx] + v`` into the gathered weight in place during forward and backward. Under
``fully_shard`` that write lands in the unsharded buffer FSDP gathered for this step, never in the sharded
parameter; this worker checks that under each variant: the trained values equal a one-process run on both ranks'
batches (FSDP averages the ranks' gradients), and the sharded base weights are exactly the initial ones.

Variants: ``reshard`` (the default), ``keep_unsharded`` (``reshard_after_forward=False``: the gathered weight lives on
from forward to backward), ``offload`` (``CPUOffloadPolicy``: parameters and optimizer step on the host), ``fsdp1``
(FSDP1 with ``use_orig_params=True``) and ``fsdp1_flat`` (FSDP1 with flat parameters only, accelerate's default). Usage:
``fsdp_variants_worker.py OUT_DIR VARIANT``; writes ``rank<i>.json``.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

from sparse_peft import SparseDeltaConfig
from sparse_peft.embedded.toy import chain_batch, successor_table, tiny_llama
from sparse_peft.masks import sparse_delta_layers

STEPS = 3
VARIANTS = {
    "reshard": {},
    "keep_unsharded": {"reshard_after_forward": False},
    "offload": {"offload_policy": CPUOffloadPolicy(pin_memory=False)},
}


def batches(rank: int) -> list[dict[str, torch.Tensor]]:
    gen, table = torch.Generator().manual_seed(100 + rank), successor_table(0)
    return [chain_batch(4, table, gen) for _ in range(STEPS)]


def model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    config = SparseDeltaConfig(target_modules="all-linear", density=0.05, fused=True, init_weights=False, seed=3)
    model = get_peft_model(tiny_llama(0), config)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: list[dict[str, torch.Tensor]]) -> None:
    model.train()
    for batch in steps:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def shard_fsdp1(model: torch.nn.Module, use_orig_params: bool) -> torch.nn.Module:
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    return FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=use_orig_params,
                                    device_id=torch.device("cpu"))


def key(name: str) -> str:
    """A layer's name from its decoder layer on (FSDP1 inserts wrapper modules into the names)."""
    name = name.replace("_fsdp_wrapped_module.", "")
    return name[name.index("layers.") :]


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def main(out_dir: str, variant: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # the reference: one process, both ranks' batches in one batch per step
    reference, ref_optimizer = model_and_optimizer()
    both = [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(batches(0), batches(1), strict=True)]
    train(reference, ref_optimizer, both)
    expected = {key(n): full(layer.support_values["default"])
                for n, layer in sparse_delta_layers(reference).items()}

    model, _ = model_and_optimizer()
    initial_base = {key(n): full(layer.get_base_layer().weight)
                    for n, layer in sparse_delta_layers(model).items()}
    if variant.startswith("fsdp1"):  # FSDP1: flat parameters, the weights views into them
        model = shard_fsdp1(model, use_orig_params=variant == "fsdp1")
    else:
        for block in model.base_model.model.model.layers:
            fully_shard(block, **VARIANTS[variant])
        fully_shard(model, **VARIANTS[variant])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train(model, optimizer, batches(rank))
    if variant.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel

        sharded = len(FullyShardedDataParallel.fsdp_modules(model)) > 1  # the root and every decoder layer
        with FullyShardedDataParallel.summon_full_params(model):
            return report(out_dir, rank, sparse_delta_layers(model), expected, initial_base, sharded)
    layers = sparse_delta_layers(model)
    sharded = all(type(layer.get_base_layer().weight).__name__ == "DTensor" for layer in layers.values())
    report(out_dir, rank, layers, expected, initial_base, sharded)


def report(out_dir: str, rank: int, layers: dict, expected: dict, initial_base: dict, sharded: bool) -> None:
    layers = {key(n): layer for n, layer in layers.items()}
    values_diff = max(
        (full(layer.support_values["default"]) - expected[n]).abs().max().item() for n, layer in layers.items()
    )
    base_unchanged = all(torch.equal(full(layer.get_base_layer().weight), initial_base[n]) for n, layer in layers.items())
    Path(out_dir, f"rank{rank}.json").write_text(
        json.dumps({"values_diff": values_diff, "base_unchanged": base_unchanged, "sharded": sharded})
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    dist.destroy_process_group()
