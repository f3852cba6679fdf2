"""Smoke test of the quality benchmark (``benchmarks/quality.py``): every method trains through TRL on the
embedded model, scores every skill, the composition test runs for LoRA and the sparse adapters, and the section
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
        assert 0.0 <= run["exact_match"] <= 1.0 and run["trainable_params"] > 0 and run["train_seconds"] > 0
    budget = {r["method"]: r["trainable_params"] for r in data["runs"]}
    lora = budget["LoRA (PEFT)"]
    for name in ("sparse_delta random", "sparse_delta gradient", "S2FT", "shira (PEFT)"):
        assert 0.9 * lora <= budget[name] <= 1.05 * lora, (name, budget[name], lora)  # the same budget
    assert budget["full FT"] > 10 * lora
    composed = {c["method"] for c in data["compositions"]}
    assert composed == {m.name for m in quality.METHODS.values() if m.composable}
    assert set(data["base_scores"]) == set(data["skills"])  # measured, not assumed
    section = quality.render(data)
    assert "| LoRA (PEFT) |" in section and "| base model (no training) |" in section and "Composition" in section
    assert "quality" in report.SECTIONS
