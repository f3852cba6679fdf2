"""SoRA / group-sparse LoRA helpers beyond the shared contract (``tests/contract.py``, which the contract classes use
directly with ``exact_unmerge=False``: their merge is LoRA-style ``W += ΔW`` in the weight dtype).

Used by ``test_sora.py``, ``test_group_sparse_lora.py``, ``test_export_lora.py`` and ``test_proximal.py``: their
own tiny models (smaller than the contract's; the proximal, Trainer and export tests are tuned to them; nothing is
downloaded), their low-rank layers, bitsandbytes bases, loading exports in a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import torch
from peft import get_peft_model
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
)

from sparse_peft.embedded import toy
from sparse_peft.tuners._lowrank import SparseLowRankLayer

REPO_ROOT = Path(__file__).resolve().parents[1]
INPUT_IDS = torch.tensor([[1, 5, 9, 2, 7, 3], [4, 4, 8, 6, 1, 0]])


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    return toy.tiny_llama(seed, vocab_size=32, hidden_size=16, intermediate_size=24, max_position_embeddings=32).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """GPT-2: every projection is a ``Conv1D`` (``fan_in_fan_out``)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    """A BERT encoder with a classification head (for ``modules_to_save``)."""
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, num_labels=3,
    )
    return BertForSequenceClassification(cfg).eval()


BUILDERS: dict[str, Callable[[int], nn.Module]] = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
TARGETS: dict[str, list[str] | str] = {
    "llama": "all-linear",
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "dense"],
}


def output(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits.float()


def layers(model: nn.Module) -> list[SparseLowRankLayer]:
    return [m for m in model.modules() if isinstance(m, SparseLowRankLayer)]


def save_tiny_base(kind: str, directory: Path) -> Path:
    path = directory / f"base-{kind}"
    BUILDERS[kind](0).save_pretrained(path)
    return path


def check_bnb(make_config: Callable[..., object], bits: int, tmp_path: Path) -> None:
    """bitsandbytes 4-/8-bit Llama base on CPU: forward, exact disable, gradients, approximate merge."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        if bits == 4
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    from sparse_peft.embedded.toy import tiny_llama as quantizable_llama

    # linear layers >= 64 inputs wide: bitsandbytes 0.50's CPU 4-bit inference path (AVX512-BF16 CPUs) fails on
    # layers narrower than its 64-wide quantization block
    path = tmp_path / "base-quantizable-llama"
    quantizable_llama(0).save_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu")
    model = get_peft_model(base, make_config(target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False))
    assert all(layer.quantization_backend is not None for layer in layers(model))
    # train before the first inference forward: on AVX512-BF16 CPUs bitsandbytes 0.50 moves a 4-bit layer to an
    # inference-only kernel at its first eval forward, after which no gradient flows through frozen 4-bit layers
    model.train()
    model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss.backward()
    assert all(layer.weight_A("default").grad is not None for layer in layers(model))
    model.eval()
    with model.disable_adapter():
        ref = output(model)
    plain = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu")
    assert torch.equal(ref, output(plain))  # disabled = exactly the quantized base
    y = output(model)
    assert torch.isfinite(y).all() and not torch.allclose(y, ref, atol=1e-3)
    model.merge_adapter()  # requantization: close, not equal
    drift = (output(model) - y).abs().max() / (y - ref).abs().max()
    assert drift < 0.5, f"merged output moved by {drift:.2f} of the adapter's effect"
    model.unmerge_adapter()


_LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    {imports}
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    cases = json.loads(sys.argv[1])
    ids = torch.tensor({ids})
    for case in cases:
        auto = AutoModelForSequenceClassification if case["kind"] == "bert" else AutoModelForCausalLM
        base = auto.from_pretrained(case["base"]).eval()
        model = PeftModel.from_pretrained(base, case["adapter"]).eval()
        {check}
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits.float(), case["out"])
    """
)


def outputs_in_fresh_process(cases: list[dict[str, str]], with_sparse_peft: bool) -> list[torch.Tensor]:
    """Load each ``{"kind", "base", "adapter"}`` in a new interpreter and return its logits on :data:`INPUT_IDS`.

    ``with_sparse_peft=False`` proves the adapter is vanilla PEFT: the script never imports sparse_peft and asserts
    that nothing else did.
    """
    imports = "import sparse_peft" if with_sparse_peft else ""
    check = "" if with_sparse_peft else "assert not any(m.startswith('sparse_peft') for m in sys.modules)"
    script = _LOAD_SCRIPT.format(imports=imports, ids=INPUT_IDS.tolist(), check=check)
    for i, case in enumerate(cases):
        case["out"] = str(Path(case["adapter"]).parent / f"out-{i}.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(REPO_ROOT) if with_sparse_peft else ""
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True, env=env, cwd="/", timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(case["out"]) for case in cases]


def random_gates_to_zero(model: nn.Module, fraction: float = 0.5, seed: int = 0) -> None:
    """Switch off a random subset of ranks (gates for SoRA, A rows and B columns otherwise), one module entirely."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, layer in enumerate(layers(model)):
            r = layer.r["default"]
            off = torch.rand(r, generator=gen) < fraction if i else torch.ones(r, dtype=torch.bool)
            gate = layer.gate("default")
            if gate is not None:
                gate[off] = 0
            else:
                layer.weight_A("default")[off] = 0
                layer.weight_B("default")[:, off] = 0
