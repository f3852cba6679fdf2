"""Shared pieces of the TRL tests: a word-level tokenizer for the tiny Llama, datasets in every TRL format, one
config per adapter type, and a check that training changed the adapter and nothing else."""

from __future__ import annotations

import torch
from datasets import Dataset
from peft import LoraConfig, PeftConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sparse_peft import GroupSparseLoraConfig, S2FTConfig, SoraConfig, SparseDeltaConfig

WORDS = ["<pad>", "<eos>", "<bos>", "<user>", "<assistant>"] + [f"w{i}" for i in range(40)]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + ' ' }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer whose ids fit the tiny Llama's 64-token vocabulary, with a chat template."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def adapter_configs() -> dict[str, PeftConfig]:
    """Fresh configs of every adapter type (and LoRA for comparison); tiny budgets for a tiny model."""
    return {
        "sparse_delta": SparseDeltaConfig(target_modules="all-linear", density=0.05),
        "sparse_delta_dynamic": SparseDeltaConfig(
            target_modules="all-linear",
            density=0.05,
            reselect_every=2,
            regrow_window=1,
            reselect_fraction=0.5,
        ),
        "sora": SoraConfig(target_modules="all-linear", r=4, sparse_lambda=0.5),
        "group_sparse_lora": GroupSparseLoraConfig(target_modules="all-linear", r=4, sparse_lambda=0.5),
        "s2ft": S2FTConfig(r=2),
        "lora": LoraConfig(target_modules="all-linear", r=4),
    }


SPARSE_METHODS = [name for name in adapter_configs() if name != "lora"]


def sft_dataset(kind: str, n: int = 16) -> Dataset:
    """SFT data in one of TRL's formats: ``text``, ``messages`` (conversational) or ``prompt_completion``."""
    rows = [(f"w{i % 7} w{(i + 1) % 7}", f" w{10 + i % 5} w{20 + i % 3}") for i in range(n)]
    if kind == "text":
        return Dataset.from_dict({"text": [p + c for p, c in rows]})
    if kind == "messages":
        return Dataset.from_dict(
            {
                "messages": [
                    [{"role": "user", "content": p}, {"role": "assistant", "content": c.strip()}]
                    for p, c in rows
                ]
            }
        )
    if kind == "prompt_completion":
        return Dataset.from_dict({"prompt": [p for p, _ in rows], "completion": [c for _, c in rows]})
    raise ValueError(kind)


def preference_dataset(conversational: bool = False, n: int = 16) -> Dataset:
    """prompt/chosen/rejected pairs (plain text or conversational)."""
    prompts = [f"w{i % 7} w{(i + 3) % 7}" for i in range(n)]
    chosen = [f"w{10 + i % 5} w{11 + i % 5}" for i in range(n)]
    rejected = [f"w{30 + i % 5}" for i in range(n)]
    if not conversational:
        return Dataset.from_dict(
            {"prompt": prompts, "chosen": [" " + c for c in chosen], "rejected": [" " + r for r in rejected]}
        )
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p in prompts],
            "chosen": [[{"role": "assistant", "content": c}] for c in chosen],
            "rejected": [[{"role": "assistant", "content": r}] for r in rejected],
        }
    )


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, cloned."""
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    return {name: t.detach().clone() for name, t in state.items()}


def assert_only_adapter_changed(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], adapter: str
) -> None:
    """Some ``adapter`` tensor moved, every tensor of other adapters and of the base stayed bit-identical."""
    moved = [n for n in before if n in after and not torch.equal(before[n], after[n])]
    assert any(f".{adapter}" in n for n in moved), "training did not change the adapter"
    stray = [n for n in moved if f".{adapter}" not in n]
    assert not stray, f"tensors outside adapter {adapter!r} changed: {stray[:5]}"
    for name in moved:
        assert torch.isfinite(after[name].float()).all(), name


TRAIN_ARGS = {
    "max_steps": 3,
    "learning_rate": 3e-2,
    "per_device_train_batch_size": 4,
    "report_to": [],
    "use_cpu": True,
    "disable_tqdm": True,
    "logging_steps": 1,
    "save_strategy": "no",
    "seed": 0,
}
"""A few quick CPU steps: the TRL arguments every trainer test starts from."""
