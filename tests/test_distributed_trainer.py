"""Two processes through TRL's SFTTrainer, every adapter type: the saved adapter equals a single-process run on the
same data within fp32 tolerance, resuming from a multi-process checkpoint equals the uninterrupted run, and every
rank ends with the same supports (dynamic masks reselect identically).

Modes: ``ddp`` (gloo, torchrun); ``fsdp_cpu``: FSDP2 from the Trainer's ``fsdp=`` arguments (torchrun, checkpoints
as full state dicts); ``fsdp_cpu_launch``: FSDP2 from ``accelerate launch --use_fsdp ...`` (sharded checkpoints through
torch.distributed.checkpoint). accelerate only routes FSDP for GPU runs (on a CPU the same arguments silently give
DDP): these two modes make its state say FSDP (:mod:`tests.distributed.cpu_fsdp`) and run the real preparation
(``fully_shard``), checkpointing and resume. ``fsdp`` is the ``fsdp=`` check on two CUDA devices, unpatched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.trainer_parity_worker import LAUNCH, train
from tests.trl_helpers import SPARSE_METHODS

pytestmark = pytest.mark.slow  # end to end: see README, "Tests"
ROOT = Path(__file__).resolve().parents[1]
MODES = ["ddp", "fsdp_cpu", "fsdp_cpu_launch",
         pytest.param("fsdp", marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"))]


@pytest.fixture(scope="module", params=MODES)
def runs(request, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(request.param)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = (["-m", "accelerate.commands.launch", *LAUNCH] if request.param == "fsdp_cpu_launch"
                else ["-m", "torch.distributed.run", "--nproc_per_node", "2"])
    cmd = [sys.executable, *launcher, str(ROOT / "tests/distributed/trainer_parity_worker.py"), str(out), request.param]
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
    assert (sharded > 0) == mode.startswith("fsdp")  # FSDP really sharded; DDP did not
    train(tmp_path / method, method, batch=4)  # one process, the two ranks' rows in one batch
    _assert_same(_adapter(tmp_path / method / "final"), _adapter(out / method / "final"))


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_resuming_a_multi_process_checkpoint_equals_the_uninterrupted_run(runs, method):
    _, out = runs
    _assert_same(_adapter(out / method / "final"), _adapter(out / method / "resume" / "final"))


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_every_rank_ends_with_the_same_supports(runs, method):
    _, out = runs
    for final in (out / method / "final", out / method / "resume" / "final"):
        digests = {path.read_text() for path in final.glob("supports_rank*.txt")}
        assert len(list(final.glob("supports_rank*.txt"))) == 2 and len(digests) == 1, final
