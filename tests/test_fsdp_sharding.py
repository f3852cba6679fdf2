"""The fused sparse path under FSDP's sharding variants (two gloo CPU processes each).

The fused path writes ``W0[idx] + v`` into the weight FSDP gathered for the step, in place. Each variant must train the
adapter to the values of a one-process run on the same data and leave the sharded base weights bit-identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["reshard", "keep_unsharded", "offload", "fsdp1"])
def test_fused_training_under_each_sharding_variant_equals_one_process(tmp_path, variant):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(ROOT / "tests/distributed/fsdp_variants_worker.py"), str(tmp_path), variant]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["sharded"], "the model was not sharded"
        assert result["base_unchanged"], "the in-place write reached the sharded base weights"
        assert result["values_diff"] < 1e-5, result
