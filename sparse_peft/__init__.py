"""sparse-peft: sparse parameter-efficient fine-tuning methods for Hugging Face PEFT.

``import sparse_peft`` registers the new PEFT types (see :mod:`sparse_peft.registry`); afterwards
``get_peft_model``, ``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` accept them.
"""

import logging as _logging


class _OptionalKernelNotice(_logging.Filter):
    """Drops bitsandbytes' one CPU notice that an optional hub kernel is missing ("Failed to load CPU
    gemm_4bit_forward ... pip install kernels"): it prints on every import of PEFT, reads like an error, and its
    fallback is what runs here anyway. Every other bitsandbytes message passes."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "gemm_4bit_forward" not in str(record.msg)


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OptionalKernelNotice())

from .registry import register_all as _register_all  # noqa: E402

_register_all()

from .compose import compose  # noqa: E402
from .export import export_to_lora  # noqa: E402
from .extraction import ExtractionReport, extract_sparse_delta  # noqa: E402
from .indices import CorruptAdapterFileError, InvalidSparseIndicesError  # noqa: E402
from .masks import SparseMask  # noqa: E402
from .proximal import apply_proximal_step  # noqa: E402
from .selection import select_from_changes, select_masks  # noqa: E402
from .tuners.group_sparse_lora import GroupSparseLoraConfig  # noqa: E402
from .tuners.s2ft import S2FTConfig, S2FTModel  # noqa: E402
from .tuners.sora import SoraConfig  # noqa: E402
from .tuners.sparse_delta import SparseDeltaConfig, SparseDeltaLayer, SparseDeltaModel  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CorruptAdapterFileError",
    "ExtractionReport",
    "InvalidSparseIndicesError",
    "SparseMask",
    "compose",
    "extract_sparse_delta",
    "GroupSparseLoraConfig",
    "S2FTConfig",
    "S2FTModel",
    "SoraConfig",
    "apply_proximal_step",
    "export_to_lora",
    "SparseDeltaConfig",
    "SparseDeltaLayer",
    "SparseDeltaModel",
    "select_from_changes",
    "select_masks",
]
