"""Skills datasets for the embedded model: small tasks with distinct formats, generated here, with fixed
train/validation/test splits and an exact-match evaluator.

The formats are ones the embedded SmolLM2-135M-Instruct does not follow (0% exact match on each, plain prompt;
asked in its chat format with an instruction it scores 0% on ``reverse`` and ``date``) and that a sparse adapter
learns in about 60 steps. Arithmetic (``517 + 8 =``) was dropped: 120 steps did not teach it.

Each skill maps a random draw to a ``(prompt, completion)`` pair and a plausible wrong completion (for preference
data). A pair's split is a hash of its prompt, so a held-out prompt never appears in training, whatever ``n``
and seed are asked for. The data are plain text in TRL's formats, so they work with any model and tokenizer.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

if TYPE_CHECKING:  # datasets is the optional [trl] extra: imported where a dataset is built
    from datasets import Dataset

SPLITS = ("train", "validation", "test")
WORDS = (
    "file list value name string number object function line data path time key type class method error set "
    "module text code item index case mode result size call order field node table state user host port default "
    "event block group"
).split()
"""Common short words (one token each for most tokenizers; any tokenizer works)."""


@dataclass(frozen=True)
class Skill:
    """A task: ``draw(rng)`` gives a prompt and its one correct completion, ``corrupt(rng, prompt, completion)`` a
    plausible wrong completion."""

    name: str
    description: str
    draw: Callable[[random.Random], tuple[str, str]]
    corrupt: Callable[[random.Random, str, str], str]


def _draw_reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 3)
    return f"reverse: {' '.join(words)} ->", " " + " ".join(reversed(words))


def _corrupt_reverse(rng: random.Random, prompt: str, completion: str) -> str:
    words = completion.split()
    wrong = [words[-1], *words[:-1]] if rng.random() < 0.5 else words[::-1]  # rotated, or the original order
    return " " + " ".join(wrong)


def _draw_date(rng: random.Random) -> tuple[str, str]:
    year, month, day = rng.randrange(1950, 2050), rng.randrange(1, 13), rng.randrange(1, 29)
    return f"date: {year}-{month:02d}-{day:02d} ->", f" {day:02d}/{month:02d}/{year}"


def _corrupt_date(rng: random.Random, prompt: str, completion: str) -> str:
    day, month, year = completion.split("/")
    if day.strip() != month:
        return f" {month}/{day.strip()}/{year}"  # month and day swapped: the US order
    return f" {day.strip()}/{month}/{int(year) + rng.choice((-1, 1))}"


def _draw_sort(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(10, 100), 3)
    return f"sort: {' '.join(map(str, numbers))} ->", " " + " ".join(map(str, sorted(numbers)))


def _corrupt_sort(rng: random.Random, prompt: str, completion: str) -> str:
    numbers = completion.split()
    wrong = numbers[::-1] if rng.random() < 0.5 else [numbers[1], numbers[0], numbers[2]]
    return " " + " ".join(wrong)


SKILLS: dict[str, Skill] = {
    skill.name: skill
    for skill in (
        Skill("reverse", "reverse a list of three words", _draw_reverse, _corrupt_reverse),
        Skill("date", "rewrite an ISO date (YYYY-MM-DD) as DD/MM/YYYY", _draw_date, _corrupt_date),
        Skill("sort", "sort three two-digit numbers in increasing order", _draw_sort, _corrupt_sort),
    )
}


def split_of(prompt: str) -> str:
    """The split a prompt belongs to: 20% test, 10% validation, 70% train, by a stable hash."""
    bucket = int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 10
    return "test" if bucket < 2 else "validation" if bucket == 2 else "train"


def _skill(name: str) -> Skill:
    if name not in SKILLS:
        raise ValueError(f"unknown skill {name!r}; the skills are {sorted(SKILLS)}")
    return SKILLS[name]


def skill_examples(name: str, split: str = "train", n: int = 1000, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` distinct ``(prompt, completion)`` pairs of skill ``name`` from ``split``, drawn with ``seed``."""
    skill = _skill(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; the splits are {SPLITS}")
    rng = random.Random(f"{name}/{split}/{seed}")
    seen: dict[str, str] = {}
    misses = 0
    while misses < 20_000:  # that many draws in a row without a new prompt: the split is exhausted
        prompt, completion = skill.draw(rng)
        if prompt in seen or split_of(prompt) != split:
            misses += 1
            continue
        misses = 0
        seen[prompt] = completion
        if len(seen) == n:
            return list(seen.items())
    raise ValueError(f"skill {name!r} has fewer than {n} distinct {split} examples")


def skill_dataset(
    name: str, split: str = "train", n: int = 1000, kind: str = "prompt_completion", seed: int = 0
) -> Dataset:
    """The skill in TRL's ``prompt``/``completion`` format, or (``kind="preference"``) ``prompt``/``chosen``/
    ``rejected`` with the correct completion chosen and a plausible wrong one rejected."""
    from datasets import Dataset

    pairs = skill_examples(name, split, n, seed)
    if kind == "prompt_completion":
        return Dataset.from_dict({"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]})
    if kind == "preference":
        rng = random.Random(f"{name}/{split}/{seed}/rejected")
        rejected = [_skill(name).corrupt(rng, p, c) for p, c in pairs]
        return Dataset.from_dict(
            {"prompt": [p for p, _ in pairs], "chosen": [c for _, c in pairs], "rejected": rejected}
        )
    raise ValueError(f"unknown kind {kind!r}; use 'prompt_completion' or 'preference'")


def completion_batch(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]]
) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt + completion + eos`` with labels only on the completion and eos (the loss TRL's
    SFTTrainer uses on prompt/completion data)."""
    rows, labels = [], []
    for prompt, completion in pairs:
        prompt_ids = tokenizer(prompt)["input_ids"]
        answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt_ids + answer_ids)
        labels.append([-100] * len(prompt_ids) + answer_ids)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }


@torch.no_grad()
def exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 100,
) -> float:
    """Fraction of prompts whose greedy continuation is exactly the completion followed by eos.

    Computed in one teacher-forced pass: greedy decoding reproduces the completion iff the argmax at every
    completion position is the next completion token, so this equals generating and comparing, without the
    decoding loop."""
    was_training = model.training
    model.eval()
    hits = 0
    for start in range(0, len(pairs), batch_size):
        batch = completion_batch(tokenizer, pairs[start : start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predicted, target = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
        scored = target != -100
        hits += ((predicted == target) | ~scored).all(dim=1).sum().item()
    model.train(was_training)
    return hits / len(pairs)


COMPOSITION_EXAMPLES = 128
"""Training examples per skill whose layer inputs RegMean composition matches (``sparse_peft.compose(...,
method="regmean")``): with 32, alpha 0.9 or 1.0 lost part of a skill on the validation split; with 128 and alpha 1.0
none was lost."""


def skill_inputs(
    tokenizer: PreTrainedTokenizerBase, skill: str, n: int = COMPOSITION_EXAMPLES, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """``n`` of the skill's training examples (prompt + completion) as one batch of model inputs: the task
    examples RegMean composes on."""
    batch = completion_batch(tokenizer, skill_examples(skill, "train", n, seed=seed))
    return [{"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}]
