"""The README's main job: an end-to-end sparse-delta run on a tiny model built on the spot.

Steps: build a small Llama from a config (nothing is downloaded), make a synthetic next-token task, pick a
gradient-selected sparse delta from calibration batches, train it, compare held-out loss with the base, save the
adapter, reload it into a fresh base model, merge it and check all three give the same outputs.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from .dynamic import DynamicMasks, ReselectionStats
from .selection import select_masks
from .tuners.sparse_delta import SparseDeltaConfig

VOCAB, SEQ_LEN = 64, 12


@dataclass
class QuickstartResult:
    base_heldout_loss: float
    adapter_heldout_loss: float
    base_heldout_accuracy: float
    adapter_heldout_accuracy: float
    trainable_params: int
    total_params: int
    train_seconds: float
    reload_max_abs_diff: float
    merge_max_abs_diff: float
    adapter_file_bytes: int


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A ~0.2M-parameter Llama (with grouped-query attention) built deterministically from a config."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def successor_table(seed: int) -> torch.Tensor:
    """The task's hidden rule: a fixed random permutation of the vocabulary."""
    return torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed + 1))


def chain_batch(n: int, table: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Sequences where each token is ``table[previous token]``: the model must learn the table."""
    tokens = [torch.randint(0, VOCAB, (n,), generator=generator)]
    for _ in range(SEQ_LEN - 1):
        tokens.append(table[tokens[-1]])
    input_ids = torch.stack(tokens, dim=1)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """Held-out loss and next-token exact-match accuracy."""
    model.eval()
    losses, hits, count = [], 0, 0
    for batch in batches:
        out = model(**batch)
        losses.append(out.loss.item())
        predicted = out.logits[:, :-1].argmax(-1)
        hits += (predicted == batch["input_ids"][:, 1:]).sum().item()
        count += predicted.numel()
    return sum(losses) / len(losses), hits / count


def train_on_task(
    model: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    steps: int,
    lr: float = 3e-2,
    progress: bool = False,
) -> tuple[float, list[ReselectionStats]]:
    """AdamW on the trainable parameters, cycling through ``batches``; dynamic sparse masks (if the adapter has
    them) are driven too. Returns the training time in seconds and the reselections made."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    dynamic = DynamicMasks(model, optimizer, total_steps=steps)
    start = time.perf_counter()
    model.train()
    for step in tqdm(range(steps), desc="training sparse delta", disable=not progress):
        model(**batches[step % len(batches)]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        dynamic.step()
    dynamic.close()
    return time.perf_counter() - start, dynamic.history


def run_quickstart(
    output: str | Path = "quickstart-out", steps: int = 150, seed: int = 0
) -> QuickstartResult:
    """Train, evaluate, save, reload and merge one sparse-delta adapter; write ``results.json`` to ``output``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    table = successor_table(seed)
    train = [chain_batch(32, table, gen) for _ in range(8)]
    heldout = [chain_batch(64, table, gen) for _ in range(2)]

    base_loss, base_acc = evaluate(tiny_llama(seed), heldout)
    config = SparseDeltaConfig(target_modules="all-linear", density=0.1, selection="gradient", seed=seed)
    model = get_peft_model(tiny_llama(seed), config)
    select_masks(model, train[:2])
    trainable, total = model.get_nb_trainable_parameters()
    train_seconds, _ = train_on_task(model, train, steps, progress=True)
    adapter_loss, adapter_acc = evaluate(model, heldout)

    adapter_dir = output / "adapter"
    model.save_pretrained(adapter_dir)
    probe = heldout[0]["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=probe).logits
        reloaded = PeftModel.from_pretrained(tiny_llama(seed), adapter_dir)
        reloaded.eval()
        reload_diff = (reloaded(input_ids=probe).logits - expected).abs().max().item()
        merged = reloaded.merge_and_unload()
        merge_diff = (merged(input_ids=probe).logits - expected).abs().max().item()
    merged.save_pretrained(output / "merged")

    result = QuickstartResult(
        base_heldout_loss=base_loss,
        adapter_heldout_loss=adapter_loss,
        base_heldout_accuracy=base_acc,
        adapter_heldout_accuracy=adapter_acc,
        trainable_params=trainable,
        total_params=total,
        train_seconds=train_seconds,
        reload_max_abs_diff=reload_diff,
        merge_max_abs_diff=merge_diff,
        adapter_file_bytes=(adapter_dir / "adapter_model.safetensors").stat().st_size,
    )
    (output / "results.json").write_text(json.dumps(asdict(result), indent=2))
    return result


def format_result(result: QuickstartResult, output: str | Path) -> str:
    """A short human-readable summary of a quickstart run."""
    return "\n".join(
        [
            f"trainable params: {result.trainable_params:,} of {result.total_params:,}",
            f"held-out loss: base {result.base_heldout_loss:.3f} -> sparse delta {result.adapter_heldout_loss:.3f}",
            f"held-out next-token accuracy: base {result.base_heldout_accuracy:.1%} -> "
            f"sparse delta {result.adapter_heldout_accuracy:.1%}",
            f"training: {result.train_seconds:.1f}s",
            f"reloaded adapter max |diff|: {result.reload_max_abs_diff:.2e}; merged: {result.merge_max_abs_diff:.2e}",
            f"adapter file: {result.adapter_file_bytes:,} bytes; outputs in {Path(output).resolve()}",
        ]
    )
