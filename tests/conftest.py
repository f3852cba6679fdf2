"""Test-wide set-up: never reach the Hugging Face Hub (every model is built from a config), one CPU thread."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Tiny matrices gain nothing from threads, and on shared CI cores OpenMP spinning made them ~50x slower;
# subprocesses started by tests inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# `import sparse_peft` must work without an installed package (plain `pytest` does not put the root on sys.path)
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def embedded_model_path():
    """The embedded SmolLM2-135M-Instruct folder, converted once (cached across runs in ``$SPARSE_PEFT_CACHE``)."""
    from sparse_peft.embedded import base_model_path
    from tests.cores import all_cores

    with all_cores():
        return base_model_path(progress=False)
