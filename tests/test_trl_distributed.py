"""Two gloo CPU processes under ``accelerate launch`` train every adapter type through TRL (and SparsePO's learned
masks): both ranks end with identical adapters, and dynamic masks really moved."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trl_helpers import SPARSE_METHODS

pytestmark = pytest.mark.slow  # end to end: see README, "Tests"


def test_two_process_training_keeps_ranks_identical(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    # `--multi_gpu` selects the torchrun launcher; with no GPU, Accelerate runs DDP over gloo on the CPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [str(root / "tests/distributed/trl_ddp_worker.py"), str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for run in [*SPARSE_METHODS, "sparsepo"]:
        assert ranks[0][run].keys() == ranks[1][run].keys() and ranks[0][run], run
        for name, tensor in ranks[0][run].items():
            torch.testing.assert_close(tensor, ranks[1][run][name], rtol=0, atol=0, msg=f"{run}: {name}")
        if run == "sparsepo":
            continue
        initial = ranks[0][f"{run}@initial"]
        assert any(not torch.equal(t, initial[n]) for n, t in ranks[0][run].items() if n in initial), run
    dynamic, initial = ranks[0]["sparse_delta_dynamic"], ranks[0]["sparse_delta_dynamic@initial"]
    moved = [n for n in dynamic if "indices" in n and not torch.equal(dynamic[n], initial[n])]
    assert moved, "the dynamic masks were never reselected"
