"""Smoke test of the quality benchmark (``benchmarks/quality.py``): every method trains through TRL on the
embedded SmolLM2 (a few steps), scores every skill, the composition test runs for LoRA and the sparse adapters, and the section
renders into the report."""

from __future__ import annotations

import json

from benchmarks import quality, report


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
