"""Millisecond fixtures: a random-init ~0.2M-parameter Llama and synthetic successor-chain tasks.

Tests and micro-benchmarks use these where what matters is the adapter mechanics, not language: building the
model takes milliseconds and the task is learnable in a few dozen steps. The quickstart and the quality
benchmark use the pretrained embedded model and the skills instead (:mod:`sparse_peft.embedded`).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from ..dynamic import DynamicMasks, ReselectionStats

VOCAB, SEQ_LEN = 64, 12


def tiny_llama(seed: int = 0, **config: Any) -> LlamaForCausalLM:
    """A small Llama with grouped-query attention, built deterministically from a config: by default ~0.2M
    parameters (2 layers, hidden 64, 4 query / 2 key-value heads, intermediate 2 × hidden). Keyword arguments
    override any ``LlamaConfig`` field: the one builder of every test and benchmark that needs a tiny decoder."""
    torch.manual_seed(seed)
    hidden = config.get("hidden_size", 64)
    defaults = {
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    return LlamaForCausalLM(LlamaConfig(**{**defaults, **config}))


def successor_table(seed: int, low: int = 0, high: int = VOCAB) -> torch.Tensor:
    """The task's hidden rule: a fixed random permutation of the tokens in ``[low, high)`` (others map to
    themselves)."""
    table = torch.arange(VOCAB)
    perm = torch.randperm(high - low, generator=torch.Generator().manual_seed(seed + 1))
    table[low:high] = low + perm
    return table


def chain_batch(
    n: int, table: torch.Tensor, generator: torch.Generator, low: int = 0, high: int = VOCAB
) -> dict[str, torch.Tensor]:
    """Sequences starting in ``[low, high)`` where each token is ``table[previous token]``."""
    tokens = [torch.randint(low, high, (n,), generator=generator)]
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
    for step in tqdm(range(steps), desc="training", disable=not progress):
        model(**batches[step % len(batches)]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        dynamic.step()
    dynamic.close()
    return time.perf_counter() - start, dynamic.history
