"""The README's main job: an end-to-end sparse-delta run on a tiny model built on the spot.

Steps: build a small Llama from a config (nothing is downloaded) and save it with a word-level tokenizer; make two
synthetic next-token skills on disjoint token ranges; for each, pick a gradient-selected sparse delta from
calibration batches and train it; compare held-out accuracy with the base; compose the two adapters; save,
reload and merge and check they give the same outputs; write a manifest the demo serves.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .compose import compose
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
    accuracy_table: dict[str, dict[str, float]] | None = None


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


def successor_table(seed: int, low: int = 0, high: int = VOCAB) -> torch.Tensor:
    """The task's hidden rule: a fixed random permutation of the tokens in ``[low, high)`` (others map to
    themselves), so two skills on disjoint token ranges can be composed."""
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


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer for the tiny model: token ``i`` is the word ``t<i>``."""
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", unk_token="t0")


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


SKILLS = {"rule-low": (0, VOCAB // 2), "rule-high": (VOCAB // 2, VOCAB)}
"""Two skills on disjoint token ranges: each learns its own successor rule; the composition should do both."""


def _skill_data(seed: int, low: int, high: int) -> tuple[list[dict], list[dict]]:
    gen = torch.Generator().manual_seed(seed + low)
    table = successor_table(seed + low, low, high)
    train = [chain_batch(32, table, gen, low, high) for _ in range(8)]
    heldout = [chain_batch(64, table, gen, low, high) for _ in range(2)]
    return train, heldout


def _train_skill(seed: int, low: int, high: int, steps: int) -> tuple[PeftModel, int, int, float]:
    train, _ = _skill_data(seed, low, high)
    config = SparseDeltaConfig(target_modules="all-linear", density=0.1, selection="gradient", seed=seed + low)
    model = get_peft_model(tiny_llama(seed), config)
    select_masks(model, train[:2])
    trainable, total = model.get_nb_trainable_parameters()
    seconds, _ = train_on_task(model, train, steps, progress=True)
    return model, trainable, total, seconds


def run_quickstart(
    output: str | Path = "quickstart-out", steps: int = 150, seed: int = 0
) -> QuickstartResult:
    """Train one sparse-delta adapter per skill, evaluate, compose, save, reload and merge.

    Writes ``base/`` (model + tokenizer), ``adapters/<skill>`` and ``adapters/composed``, ``merged/``,
    ``results.json``, ``results.md`` and ``manifest.json`` (what ``sparse-peft demo`` serves) to ``output``.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    base_dir = output / "base"
    tiny_llama(seed).save_pretrained(base_dir)
    tokenizer().save_pretrained(base_dir)
    heldout = {name: _skill_data(seed, *span)[1] for name, span in SKILLS.items()}

    table: dict[str, dict[str, float]] = {"base": {n: evaluate(tiny_llama(seed), h)[1] for n, h in heldout.items()}}
    adapters: dict[str, str] = {}
    first = next(iter(SKILLS))
    for name, span in SKILLS.items():
        model, trainable, total, seconds = _train_skill(seed, *span, steps)
        table[name] = {n: evaluate(model, h)[1] for n, h in heldout.items()}
        model.save_pretrained(output / "adapters" / name)
        adapters[name] = f"adapters/{name}"
        if name == first:
            first_model, first_stats = model, (trainable, total, seconds)

    combined = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), output / "adapters" / first,
                                         adapter_name=first)
    for name in list(SKILLS)[1:]:
        combined.load_adapter(output / "adapters" / name, adapter_name=name)
    compose(combined, list(SKILLS), new_adapter_name="composed")
    combined.set_adapter("composed")
    table["composed"] = {n: evaluate(combined, h)[1] for n, h in heldout.items()}
    combined.save_pretrained(output / "adapters", selected_adapters=["composed"])
    adapters["composed"] = "adapters/composed"

    probe = heldout[first][0]["input_ids"]
    with torch.no_grad():
        first_model.eval()
        expected = first_model(input_ids=probe).logits
        reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), output / "adapters" / first)
        reloaded.eval()
        reload_diff = (reloaded(input_ids=probe).logits - expected).abs().max().item()
        merged = reloaded.merge_and_unload()
        merge_diff = (merged(input_ids=probe).logits - expected).abs().max().item()
    merged.save_pretrained(output / "merged")
    tokenizer().save_pretrained(output / "merged")

    base_loss, base_acc = evaluate(tiny_llama(seed), heldout[first])
    adapter_loss, adapter_acc = evaluate(first_model, heldout[first])
    trainable, total, seconds = first_stats
    result = QuickstartResult(
        base_heldout_loss=base_loss,
        adapter_heldout_loss=adapter_loss,
        base_heldout_accuracy=base_acc,
        adapter_heldout_accuracy=adapter_acc,
        trainable_params=trainable,
        total_params=total,
        train_seconds=seconds,
        reload_max_abs_diff=reload_diff,
        merge_max_abs_diff=merge_diff,
        adapter_file_bytes=(output / "adapters" / first / "adapter_model.safetensors").stat().st_size,
        accuracy_table=table,
    )
    (output / "results.json").write_text(json.dumps(asdict(result), indent=2))
    (output / "results.md").write_text(results_markdown(table))
    manifest = {
        "base_model": str(base_dir.resolve()),
        "adapters": adapters,
        "results": "results.md",
        "example_prompt": " ".join(f"t{int(t)}" for t in probe[0, :4]),
    }
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return result


def results_markdown(table: dict[str, dict[str, float]]) -> str:
    """Held-out next-token accuracy of base, each skill adapter and the composition, on every skill."""
    skills = list(SKILLS)
    lines = ["| model | " + " | ".join(skills) + " |", "|---|" + "---:|" * len(skills)]
    lines += [f"| {row} | " + " | ".join(f"{accs[s]:.1%}" for s in skills) + " |" for row, accs in table.items()]
    return "\n".join(lines) + "\n"


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
            "held-out next-token accuracy per skill:",
            results_markdown(result.accuracy_table or {}),
        ]
    )
