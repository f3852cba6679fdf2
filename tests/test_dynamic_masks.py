"""Dynamic sparse masks (SpIEL prune/regrow) in a custom loop: schedule, invariants, optimizer state, quality."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from sparse_peft import SparseDeltaConfig
from sparse_peft.dynamic import replace_support
from sparse_peft.embedded.toy import chain_batch, evaluate, successor_table, tiny_llama, train_on_task
from sparse_peft.masks import sparse_delta_layers


def test_replace_fraction_schedules():
    linear = SparseDeltaConfig(reselect_every=10, reselect_fraction=0.2, reselect_schedule="linear")
    assert linear.replace_fraction(0, 100, first=False) == pytest.approx(0.2)
    assert linear.replace_fraction(50, 100, first=False) == pytest.approx(0.1)
    assert linear.replace_fraction(100, 100, first=False) == 0.0
    cosine = SparseDeltaConfig(reselect_every=10, reselect_fraction=0.2, reselect_schedule="cosine")
    assert cosine.replace_fraction(50, 100, first=False) == pytest.approx(0.1)
    assert cosine.replace_fraction(25, 100, first=False) == pytest.approx(0.1 * (1 + 2**-0.5))
    full = SparseDeltaConfig(reselect_every=10, reselect_first_full=True)
    assert full.replace_fraction(10, 100, first=True) == 1.0
    with pytest.raises(ValueError, match="reselect_every"):
        SparseDeltaConfig(reselect_every=0)
    with pytest.raises(ValueError, match="regrow"):
        SparseDeltaConfig(reselect_every=5, regrow="random")


def test_replace_support_keeps_values_and_resets_optimizer_state():
    model = get_peft_model(
        nn.Sequential(nn.Linear(6, 5)), SparseDeltaConfig(target_modules=["0"], density=0.4)
    )
    layer = sparse_delta_layers(model)["0"]
    values = layer.support_values["default"]
    optimizer = torch.optim.Adam([values], lr=0.1)
    model(torch.randn(3, 6)).sum().backward()
    optimizer.step()
    old = layer.support_indices["default"].long().clone()
    old_values = values.detach().clone()
    old_state = {k: v.clone() for k, v in optimizer.state[values].items()}
    inactive = torch.tensor([i for i in range(30) if i not in set(old.tolist())])
    new = torch.cat([old[2:], inactive[:2]]).sort().values
    assert replace_support(layer, "default", new, optimizer) == 2
    assert values is layer.support_values["default"] and torch.equal(
        layer.support_indices["default"].long(), new
    )
    kept = torch.isin(new, old)
    position = torch.searchsorted(old, new[kept])
    assert torch.equal(values.detach()[kept], old_values[position])
    assert torch.count_nonzero(values.detach()[~kept]) == 0
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(optimizer.state[values][key][kept], old_state[key][position])
        assert torch.count_nonzero(optimizer.state[values][key][~kept]) == 0
    assert torch.equal(optimizer.state[values]["step"], old_state["step"])


def _train(config: SparseDeltaConfig, steps: int, seed: int = 0):
    table = successor_table(seed)
    gen = torch.Generator().manual_seed(seed)
    batches = [chain_batch(32, table, gen) for _ in range(8)]
    heldout = [chain_batch(64, table, gen) for _ in range(2)]
    model = get_peft_model(tiny_llama(seed), config)
    _, history = train_on_task(model, batches, steps)
    return model, history, evaluate(model, heldout)


@pytest.mark.parametrize("regrow", ["gradient", "momentum"])
def test_reselection_invariants(regrow):
    config = SparseDeltaConfig(
        target_modules="all-linear",
        density=0.02,
        reselect_every=5,
        regrow=regrow,
        regrow_window=2,
        reselect_fraction=0.5,
        reselect_schedule="constant",
    )
    model, history, _ = _train(config, steps=10)
    assert [h.step for h in history] == [5, 10]
    for name, layer in sparse_delta_layers(model).items():
        idx = layer.support_indices["default"].long()
        assert idx.numel() == layer.support_values["default"].numel()
        assert bool((idx[1:] > idx[:-1]).all()) and 0 <= int(idx.min()) and int(idx.max()) < layer.numel
        assert history[0].replaced[name] == round(0.5 * idx.numel())
    # the base weights are untouched once the adapter is left
    with model.disable_adapter():
        reference = tiny_llama(0)
        for name, layer in sparse_delta_layers(model).items():
            assert torch.equal(layer.get_base_layer().weight, reference.get_submodule(name).weight)


def test_dynamic_mask_beats_static_at_equal_budget():
    """Measured: static 0.92 vs dynamic 0.97 held-out accuracy (seed 0, 120 steps); margin asserted: 0.02."""
    static = SparseDeltaConfig(target_modules="all-linear", density=0.02)
    dynamic = SparseDeltaConfig(
        target_modules="all-linear", density=0.02, reselect_every=10, reselect_fraction=0.3
    )
    _, _, (_, static_acc) = _train(static, steps=120)
    _, history, (_, dynamic_acc) = _train(dynamic, steps=120)
    assert history and dynamic_acc > static_acc + 0.02


@pytest.mark.slow
def test_ddp_ranks_hold_identical_masks(tmp_path):
    """Two gloo CPU processes under ``accelerate launch``, different data per rank."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    # `--multi_gpu` selects the torchrun launcher; with no GPU, Accelerate runs DDP over gloo on the CPU
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(root / "tests/distributed/dynamic_ddp_worker.py"),
        str(tmp_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]["indices"]) == 3
    assert ranks[0]["indices"] == ranks[1]["indices"]
    assert ranks[0]["indices"][0] != ranks[0]["indices"][-1]  # the masks really moved
    for name, values in ranks[0]["values"].items():
        torch.testing.assert_close(torch.tensor(values), torch.tensor(ranks[1]["values"][name]))


@pytest.mark.slow
def test_fsdp2_sharded_values_reselect_identically_on_every_rank(tmp_path):
    """Two gloo CPU processes with FSDP2 (``fully_shard``): values and Adam state are DTensors, yet every
    reselection leaves identical indices and full values on both ranks, and training goes on."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(root / "tests/distributed/dynamic_fsdp_worker.py"), str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["sharded"] for r in ranks)  # the values really were DTensors
    assert len(ranks[0]["indices"]) == 3
    assert ranks[0]["indices"] == ranks[1]["indices"]
    assert ranks[0]["indices"][0] != ranks[0]["indices"][-1]  # the masks moved
    assert ranks[0]["values"] == ranks[1]["values"]
    assert all(v == v for r in ranks for v in r["losses"])  # finite (no NaN) after every reselection
