"""The embedded base model: a few-million-parameter Llama pretrained on the docstring corpus, built on first use.

Nothing is downloaded: the tokenizer (byte-level BPE, one token per digit) and the model are trained here from
:func:`docstring_corpus`, deterministically from a seed, and cached under ``$SPARSE_PEFT_CACHE`` (default
``~/.cache/sparse-peft``) in the standard Hugging Face layout, so ``from_pretrained(tiny_model_path())`` works
like any hub model. The cache key covers the build recipe and the corpus, so a change to either builds anew.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .corpus import corpus_fingerprint, docstring_corpus

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


@dataclass(frozen=True)
class BaseModelRecipe:
    """Everything that determines the embedded model (its hash names the cache entry)."""

    vocab_size: int = 2048
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 400
    lr: float = 3e-3
    warmup_steps: int = 30
    seed: int = 0

    def key(self, corpus: list[str]) -> str:
        text = json.dumps(asdict(self), sort_keys=True) + corpus_fingerprint(corpus)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


DEFAULT_RECIPE = BaseModelRecipe()


def train_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``corpus``: digits are always single tokens (so numbers are spelt digit by digit)
    and every text is encodable. ``<s>`` is prepended to each encoded text, ``</s>`` ends completions."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


def _model_config(recipe: BaseModelRecipe, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _token_stream(corpus: list[str], tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """The corpus as one token stream, each docstring starting with ``<s>`` and ending with ``</s>``."""
    ids: list[int] = []
    for doc in corpus:
        ids += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids)


def pretrain(
    recipe: BaseModelRecipe, corpus: list[str], progress: bool = True
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict[str, float]]:
    """Train the tokenizer, then the model on random windows of the corpus (AdamW, warmup + cosine decay).
    Returns the model, the tokenizer and a summary (losses, time)."""
    torch.manual_seed(recipe.seed)
    tokenizer = train_tokenizer(corpus, recipe.vocab_size)
    stream = _token_stream(corpus, tokenizer)
    model = LlamaForCausalLM(_model_config(recipe, tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.1, betas=(0.9, 0.95))

    def lr_factor(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        done = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * done))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(recipe.seed)
    offsets = torch.arange(recipe.seq_len)
    start, losses = time.perf_counter(), []
    model.train()
    bar = tqdm(range(recipe.steps), desc="pretraining the embedded tiny model", disable=not progress)
    for _ in bar:
        starts = torch.randint(0, len(stream) - recipe.seq_len, (recipe.batch_size, 1), generator=generator)
        batch = stream[starts + offsets]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    tail = losses[-20:]
    summary = {
        "first_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
        "seconds": time.perf_counter() - start,
        "corpus_tokens": len(stream),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, tokenizer, summary


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSE_PEFT_CACHE", Path.home() / ".cache" / "sparse-peft"))


def tiny_model_path(recipe: BaseModelRecipe = DEFAULT_RECIPE, progress: bool = True) -> Path:
    """The directory of the embedded model (``config.json``, ``model.safetensors``, tokenizer files), built and
    cached on first call. Concurrent callers wait for one build; a half-written build is never used."""
    corpus = docstring_corpus()
    root = cache_dir()
    target = root / f"tiny-llama-{recipe.key(corpus)}"
    if (target / "build.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "build.json").exists():  # another process built it while we waited
            return target
        model, tokenizer, summary = pretrain(recipe, corpus, progress=progress)
        partial = root / f"{target.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        build = {"recipe": asdict(recipe), "corpus": corpus_fingerprint(corpus), **summary}
        (partial / "build.json").write_text(json.dumps(build, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return target


def load_tiny_model(
    recipe: BaseModelRecipe = DEFAULT_RECIPE, progress: bool = True
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The embedded model and its tokenizer (built on first use)."""
    path = tiny_model_path(recipe, progress=progress)
    return LlamaForCausalLM.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path)
