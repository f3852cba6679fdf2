"""A tiny base model with a tokenizer and a folder of adapters of every kind, for the demo and hot-swap tests."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, PreTrainedTokenizerFast

import sparse_peft
from sparse_peft import S2FTConfig, SoraConfig, SparseDeltaConfig
from sparse_peft.embedded import toy

WORDS = ["<pad>", "<eos>", "<bos>"] + [f"w{i}" for i in range(61)]


def tiny_llama() -> LlamaForCausalLM:
    return toy.tiny_llama(0, vocab_size=len(WORDS), hidden_size=32, pad_token_id=0, eos_token_id=1, bos_token_id=2).eval()


def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


ADAPTERS = {
    "delta-a": SparseDeltaConfig(target_modules="all-linear", density=0.3, init_weights=False, seed=1),
    "delta-b": SparseDeltaConfig(target_modules="all-linear", density=0.3, init_weights=False, seed=2),
    "s2ft": S2FTConfig(heads_ratio=0.5, channels_ratio=0.5, init_weights=False),
    "sora": SoraConfig(r=4, target_modules="all-linear", init_weights=False),
    "lora": LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
}


def _scale_up(model: torch.nn.Module) -> None:
    """Make the random adapters strong enough to change greedy answers of the tiny model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("sparse_delta_values", "s2ft_values", "lora_B", "sora_B")):
                p.normal_(0, 1.0)


def build(root: Path) -> tuple[Path, Path]:
    """Write ``root/base`` (model + tokenizer) and ``root/adapters/<name>`` (+ a corrupt and a foreign one)."""
    assert sparse_peft  # registered
    base_dir, adapters = root / "base", root / "adapters"
    tiny_llama().save_pretrained(base_dir)
    tokenizer().save_pretrained(base_dir)
    for name, config in ADAPTERS.items():
        config.base_model_name_or_path = str(base_dir)
        model = get_peft_model(tiny_llama(), config)
        _scale_up(model)
        model.save_pretrained(adapters / name)
    corrupt = adapters / "corrupt"
    get_peft_model(tiny_llama(), SparseDeltaConfig(target_modules="all-linear", density=0.1)).save_pretrained(corrupt)
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4))
    get_peft_model(gpt2, LoraConfig(r=2, target_modules=["c_attn"])).save_pretrained(adapters / "gpt2-lora")
    return base_dir, adapters


def free_port() -> int:
    """A port nobody listens on, for serving the demo in a test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
