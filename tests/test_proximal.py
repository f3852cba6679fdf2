"""The shared proximal operators, the λ schedule, weight-decay grouping and the Trainer callback's dispatch."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from lowrank_contract import layers, tiny_llama
from peft import get_peft_model
from sparse_peft.trainers import SparseHook, SparseUpdateCallback
from sparse_peft.trainers.callbacks import _learning_rates
from torch import nn

import sparse_peft  # noqa: F401
from sparse_peft import SoraConfig
from sparse_peft.proximal import (
    LambdaSchedule,
    block_soft_threshold_,
    group_norms,
    no_weight_decay_parameters,
    param_groups,
    soft_threshold_,
)


# ------------------------------------------------------------------------------------------ soft-threshold
def test_soft_threshold_below_is_exactly_zero_above_shrinks_by_exactly_the_threshold():
    lr, lam = 0.5, 0.5  # lr·λ = 0.25, exact in binary floating point
    g = torch.tensor([0.75, -0.75, 0.25, -0.25, 0.0, 1.5, -2.0, 0.1])
    soft_threshold_(g, lr * lam)
    assert torch.equal(g, torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0, 1.25, -1.75, 0.0]))


def test_soft_threshold_is_not_the_reference_three_way_rule():
    # the reference SoRA code zeroes ξ < |g| < 2ξ instead of shrinking them; a true soft-threshold keeps them
    g = torch.tensor([0.15, -0.15])
    soft_threshold_(g, 0.1)
    torch.testing.assert_close(g, torch.tensor([0.05, -0.05]), atol=1e-7, rtol=0)


def test_soft_threshold_half_precision_keeps_small_thresholds():
    g = torch.ones(4, dtype=torch.bfloat16)
    soft_threshold_(g, 0.25)
    assert g.dtype == torch.bfloat16 and torch.equal(g, torch.full((4,), 0.75, dtype=torch.bfloat16))
    with pytest.raises(ValueError):
        soft_threshold_(g, -1.0)


# ------------------------------------------------------------------------------------------ block soft-threshold
def test_block_soft_threshold_over_groups_spanning_two_tensors():
    a = torch.tensor([[3.0, 0.0], [0.3, 0.0], [0.0, 0.0]])  # rows are groups ...
    b = torch.tensor([[4.0, 0.4, 0.0]])  # ... together with the columns of b
    norms = block_soft_threshold_([(a, 0), (b, 1)], threshold=1.0)
    torch.testing.assert_close(norms, torch.tensor([4.0, 0.0, 0.0]))  # ‖(3, 4)‖ = 5 → 4; ‖(0.3, 0.4)‖ = 0.5 → 0
    torch.testing.assert_close(a[0], torch.tensor([2.4, 0.0]))  # direction kept: (3, 4)·4/5
    torch.testing.assert_close(b[0, 0], torch.tensor(3.2))
    assert torch.equal(a[1:], torch.zeros(2, 2)) and torch.equal(b[0, 1:], torch.zeros(2))  # 0 stays 0, no NaN


def test_block_soft_threshold_whole_tensor_group_and_norms():
    a, b = torch.full((2, 2), 1.0), torch.full((2, 2), 1.0)  # one group, norm √8
    assert torch.allclose(group_norms([(a, None), (b, None)]), torch.tensor([math.sqrt(8)]))
    block_soft_threshold_([(a, None), (b, None)], threshold=math.sqrt(8) / 2)
    torch.testing.assert_close(a, torch.full((2, 2), 0.5))
    block_soft_threshold_([(a, None), (b, None)], threshold=10.0)
    assert not a.any() and not b.any()


# ------------------------------------------------------------------------------------------ λ schedule
def test_lambda_schedules():
    assert LambdaSchedule(0.1).value(10**6) == 0.1
    lin = LambdaSchedule(0.1, "linear", 0.5, num_stages=5, stage_steps=10)
    assert [lin.value(s) for s in (0, 9, 10, 25, 49, 10**6)] == pytest.approx([0.1, 0.1, 0.2, 0.3, 0.5, 0.5])
    exp = LambdaSchedule(0.01, "exponential", 1.0, num_stages=3, stage_steps=1)
    assert [exp.value(s) for s in range(3)] == pytest.approx([0.01, 0.1, 1.0])  # geometric
    log = LambdaSchedule(0.0, "log_linear", 1.0, num_stages=3, stage_steps=1)
    assert log.value(1) == pytest.approx(math.log((1 + math.e) / 2))  # concave: rises fast, then flattens
    assert log.value(1) - log.value(0) > log.value(2) - log.value(1)
    by_total = LambdaSchedule(1.0, "linear", 3.0, num_stages=3)  # stages split the Trainer's max_steps
    assert [by_total.value(s, total_steps=30) for s in (0, 10, 29)] == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="total number of steps"):
        by_total.value(5)
    with pytest.raises(ValueError):
        LambdaSchedule(0.0, "exponential", 1.0, num_stages=2)
    with pytest.raises(ValueError):
        LambdaSchedule(0.1, "cosine", 1.0)


# ------------------------------------------------------------------------------------------ weight decay
def test_param_groups_keep_gates_out_of_weight_decay():
    model = get_peft_model(tiny_llama(0), SoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    gates = {id(p) for p in no_weight_decay_parameters(model)}
    assert gates == {id(layer.sora_gate["default"]) for layer in layers(model)}
    decay, no_decay = param_groups(model, 0.1, lr=1e-3)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0 and decay["lr"] == 1e-3
    assert gates <= {id(p) for p in no_decay["params"]} and not gates & {id(p) for p in decay["params"]}
    assert len(decay["params"]) == 2 * len(gates)  # A and B of every layer
    torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)  # a valid optimizer spec


# ------------------------------------------------------------------------------------------ callback dispatch
def test_learning_rate_lookup_reads_the_parameters_own_group():
    p, q, frozen = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.1}, {"params": [q], "lr": torch.tensor(0.3)}], lr=1.0)
    lr = _learning_rates(opt)
    assert (lr(p), lr(q), lr(frozen)) == (pytest.approx(0.1), pytest.approx(0.3), 0.0)


class _Recorder(SparseHook):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_optimizer_step(self, model, lr, step, total_steps):
        self.calls.append(("opt", step, total_steps, lr(self.param)))

    def on_step_end(self, model, step, total_steps):
        self.calls.append(("end", step))

    def logs(self, model):
        return {"rec/x": 1.0}


def test_callback_dispatches_to_hooks_and_extends_logs():
    hook = _Recorder()
    hook.param = nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([hook.param], lr=0.25)
    cb = SparseUpdateCallback(hooks=[hook])
    state = SimpleNamespace(global_step=3, max_steps=10, log_history=[{"loss": 1.0, "step": 3}])
    kwargs = {"model": nn.Linear(1, 1), "optimizer": opt}
    cb.on_optimizer_step(None, state, None, **kwargs)
    cb.on_step_end(None, state, None, **kwargs)
    logs = {"loss": 1.0}
    cb.on_log(None, state, None, logs=logs, **kwargs)
    assert hook.calls == [("opt", 3, 10, 0.25), ("end", 3)]
    assert logs["rec/x"] == 1.0 and state.log_history[-1]["rec/x"] == 1.0
    opt.step_was_skipped = True  # e.g. an fp16 overflow: no update, so no proximal step
    cb.on_optimizer_step(None, state, None, **kwargs)
    assert len(hook.calls) == 2


def test_default_callback_runs_the_proximal_hook():
    from sparse_peft.trainers import ProximalHook

    assert any(isinstance(h, ProximalHook) for h in SparseUpdateCallback().hooks)


def test_training_without_any_proximal_step_warns_and_a_step_resets_the_count():
    from peft import get_peft_model

    from sparse_peft import SoraConfig
    from sparse_peft.embedded.toy import tiny_llama
    from sparse_peft.proximal import FORWARDS_BEFORE_WARNING, apply_proximal_step

    model = get_peft_model(tiny_llama(0), SoraConfig(target_modules=["q_proj"], r=2)).train()
    ids = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(FORWARDS_BEFORE_WARNING - 1):
            model(input_ids=ids)
        apply_proximal_step(model, lr=1e-3)  # a driven loop: the count starts again
        for _ in range(FORWARDS_BEFORE_WARNING - 1):
            model(input_ids=ids)
        assert not [w for w in caught if "without a proximal step" in str(w.message)]
        model(input_ids=ids)
    assert [w for w in caught if "without a proximal step" in str(w.message)]  # one per penalised layer at most
