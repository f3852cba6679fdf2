"""Two processes through TRL's SFTTrainer, every adapter type: the saved adapter equals a single-process run on the
same data within fp32 tolerance, and resuming from a multi-process checkpoint equals the uninterrupted run.

On this CPU the processes run DDP (gloo): accelerate only routes FSDP for GPU runs (``fsdp=`` with ``use_cpu``
silently gives ``DistributedType.MULTI_CPU``). The FSDP2 variant of the same check runs where two CUDA devices are;
FSDP2 itself on CPU (``fully_shard``, sharded DTensor values) is covered by ``test_dynamic_masks.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.trainer_parity_worker import train
from tests.trl_helpers import SPARSE_METHODS

pytestmark = pytest.mark.slow  # end to end: see README, "Tests"
ROOT = Path(__file__).resolve().parents[1]
MODES = ["ddp", pytest.param("fsdp", marks=pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                                reason="FSDP through accelerate needs 2 CUDA devices"))]


@pytest.fixture(scope="module", params=MODES)
def runs(request, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(request.param)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(ROOT / "tests/distributed/trainer_parity_worker.py"), str(out), request.param]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return request.param, out


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def _assert_same(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        if name.endswith("header"):  # shape + CRC-32s: values equal within tolerance may have other checksums
            assert torch.equal(value[:2], got[name][:2]), name
        elif value.is_floating_point():
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)
        else:  # indices, channel ids: exactly
            assert torch.equal(value, got[name]), name


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_two_processes_equal_a_single_process_run(runs, tmp_path, method):
    mode, out = runs
    sharded = int((out / method / "final" / "dtensor_parameters.txt").read_text())
    assert (sharded > 0) == (mode == "fsdp")  # FSDP really sharded; DDP did not
    train(tmp_path / method, method, batch=4)  # one process, the two ranks' rows in one batch
    _assert_same(_adapter(tmp_path / method / "final"), _adapter(out / method / "final"))


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_resuming_a_multi_process_checkpoint_equals_the_uninterrupted_run(runs, method):
    _, out = runs
    _assert_same(_adapter(out / method / "final"), _adapter(out / method / "resume" / "final"))
