"""Smoke test of the quality and composition benchmarks (``benchmarks/quality.py``, ``benchmarks/composition.py``):
every method trains through TRL on the embedded SmolLM2 (a few steps), scores every skill, every composition method
runs on the kept adapters of LoRA and the sparse adapters, and the sections render into the report."""

from __future__ import annotations

import json

import pytest

from benchmarks import composition, quality, report

pytestmark = pytest.mark.slow  # end to end: see README, "Tests"


def test_quick_quality_run_covers_every_method(tmp_path, embedded_model_path):
    out = tmp_path / "quality.json"
    assert quality.main(["--quick", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    methods = {r["method"] for r in data["runs"]}
    assert methods == set(quality.METHODS)
    for run in data["runs"]:
        assert run["lr"] == quality.METHODS[run["method"]].lrs[0] and 0.0 <= run["validation"] <= 1.0
        assert 0.0 <= run["exact_match"] <= 1.0 and run["trainable_params"] > 0 and run["train_seconds"] > 0
    budget = {r["method"]: r["trainable_params"] for r in data["runs"]}
    lora = budget["LoRA (PEFT)"]
    for name in ("sparse_delta random", "sparse_delta gradient", "S2FT", "shira (PEFT)"):
        assert 0.9 * lora <= budget[name] <= 1.05 * lora, (name, budget[name], lora)  # the same budget
    assert budget["full FT"] > 10 * lora
    composed = {c["method"] for c in data["compositions"]}
    assert composed == {m.name for m in quality.METHODS.values() if m.composable}
    assert set(data["base_scores"]) == set(data["skills"])  # measured, not assumed
    assert quality.main(["--quick", "--out", str(out)]) == 0  # everything already there: nothing re-run
    assert json.loads(out.read_text())["runs"] == data["runs"]
    section = quality.render(data)
    assert "| LoRA (PEFT) |" in section and "| base model (no training) |" in section and "Composition" in section
    assert "quality" in report.SECTIONS
    # the composition benchmark on the adapters this run kept: every post-hoc family and method, scored and rendered
    # (the families trained to compose train more adapters: their helpers are tested in tests/test_composition.py)
    out = tmp_path / "composition.json"
    assert composition.main(["--quick", "--out", str(out), "--families", *composition.POST_HOC]) == 0
    entries = json.loads(out.read_text())["entries"]
    for family in composition.POST_HOC:
        methods = {e["method"] for e in entries if e["family"] == family}
        assert methods >= {*composition.methods_of(family), "all active", "single reverse", "single date"}
    assert all(0.0 <= v <= 1.0 for e in entries for v in e["test"].values())
    same = [e["max_logit_difference_to_sum"] for e in entries if "max_logit_difference_to_sum" in e]
    assert same and max(same) < 1e-3  # every sparse adapter active at once computes the sum
    assert "| S2FT | ties |" in composition.render(json.loads(out.read_text()))
    assert "composition" in report.SECTIONS


def test_the_learning_rate_is_the_best_mean_validation_score():
    sweep = [
        {"method": "m", "lr": 1e-3, "skill": "a", "validation": 0.9, "seed": 0},
        {"method": "m", "lr": 1e-3, "skill": "b", "validation": 0.1, "seed": 0},
        {"method": "m", "lr": 3e-3, "skill": "a", "validation": 0.6, "seed": 0},
        {"method": "m", "lr": 3e-3, "skill": "b", "validation": 0.6, "seed": 0},
        {"method": "m", "lr": 1e-2, "skill": "a", "validation": 0.6, "seed": 0},
        {"method": "m", "lr": 1e-2, "skill": "b", "validation": 0.6, "seed": 0},
        {"method": "other", "lr": 1.0, "skill": "a", "validation": 1.0, "seed": 0},
    ]
    assert quality.best_lr(sweep, "m") == 3e-3  # best mean; the tie with 1e-2 goes to the smaller lr
    assert quality.best_lr(sweep, "missing") is None
