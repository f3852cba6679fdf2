"""The README's main job on the embedded SmolLM2-135M-Instruct, on a cheap configuration (fewer steps, a smaller
batch, fewer test prompts): skills improve from base to adapter, the composition and the merge behave, the outputs
are what the demo serves, and the evaluator is exact."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from demo_fixtures import free_port
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparse_peft.embedded import SKILLS, exact_match, skill_examples
from sparse_peft.hotswap import BASE
from sparse_peft.quickstart import COMPOSED, greedy_answers, run_quickstart
from sparse_peft.tuners.sparse_delta import SparseDeltaLayer
from tests.cores import all_cores

pytestmark = pytest.mark.slow  # end to end: see README, "Tests"

CHEAP = {"steps": 30, "batch_size": 8, "test_examples": 50, "compose_method": "ties", "lr": 1e-3}
"""``ties`` here: RegMean on these 30-step adapters failed in CI on a numerically singular Gram (commit b3d410e);
compose now falls back to direct solves there, but that fix is not yet re-verified on this configuration (RegMean
itself is tested on tiny models in tests/test_composition.py). ``lr`` 1e-3, the rate the quality benchmark's
validation chose for gradient-selected sparse deltas: at the quickstart's 3e-3 these 30 short steps trained date to
96% on an AMD EPYC but to 2% on an Intel Xeon (same code, same seed: the trajectory is that sensitive)."""
GAINS = {"reverse": 0.5, "date": 0.5, "sort": 0.3}
"""Minimum held-out exact-match gain of each skill's adapter over the base in the CHEAP configuration (seed 0).
Measured on 2 cores of an Intel Xeon: reverse 100%, date 100%, sort 90% (base 0% on each; about 2 min for the whole
run); the README's default (60 steps, batch 16, 200 prompts) reaches 100%, 100%, 97.5%."""


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, embedded_model_path):
    output = tmp_path_factory.mktemp("quickstart")
    with all_cores():
        return output, run_quickstart(output, **CHEAP, progress=False, say=lambda line: None)


def test_skills_improve_from_base_to_adapter(quickstart):
    _, result = quickstart
    assert set(result.accuracy) >= {"base", *SKILLS, "composed", "composed (all skills)"}
    for skill, margin in GAINS.items():
        assert result.accuracy["base"][skill] == 0.0
        assert result.gain(skill) >= margin, (skill, result.accuracy)


def test_composition_and_weights_weigh(quickstart):
    """The composed row is the composition of the two skill adapters by the run's method (recomputed from the saved
    adapters, it scores exactly what the table says), and compose's weights really weigh the deltas: (1, 0) answers
    exactly like the first skill's adapter. (How much of each skill it keeps is a
    measurement, over 3 seeds, in docs/benchmarks.md; this cheap configuration is not the place to assert it.)"""
    from sparse_peft import compose
    from sparse_peft.embedded.skills import skill_inputs

    output, result = quickstart
    assert set(result.accuracy["composed"]) == set(SKILLS) and result.compose_method == CHEAP["compose_method"]
    tokenizer = AutoTokenizer.from_pretrained(result.base_model)
    base = AutoModelForCausalLM.from_pretrained(result.base_model)
    first, second = COMPOSED
    model = PeftModel.from_pretrained(base, output / "adapters" / first, adapter_name=first)
    model.load_adapter(output / "adapters" / second, adapter_name=second)
    inputs = {name: skill_inputs(tokenizer, name) for name in COMPOSED} if result.compose_method == "regmean" else None
    compose(model, [first, second], new_adapter_name="again", method=result.compose_method, inputs=inputs)
    model.set_adapter("again")
    pairs = skill_examples(second, "test", CHEAP["test_examples"])
    assert exact_match(model, tokenizer, pairs) == result.accuracy["composed"][second]
    compose(model, [first, second], weights=[1.0, 0.0], new_adapter_name="first-only")  # the plain sum
    model.set_adapter("first-only")
    pairs = skill_examples(first, "test", CHEAP["test_examples"])
    assert exact_match(model, tokenizer, pairs) == result.accuracy[first][first]


def test_merged_model_gives_the_same_answers(quickstart):
    output, result = quickstart
    assert result.merged_same_answers == 1.0 and result.merge_max_abs_diff < 1e-4
    row = f"merged ({result.merged_skill})"
    assert result.accuracy[row] == result.accuracy[result.merged_skill]
    merged = AutoModelForCausalLM.from_pretrained(output / "merged")
    assert not any(isinstance(m, SparseDeltaLayer) for m in merged.modules())


def test_outputs_and_results_table(quickstart):
    output, result = quickstart
    for skill in [*SKILLS, "composed", "composed-all"]:
        assert (output / "adapters" / skill / "adapter_model.safetensors").is_file()
    saved = json.loads((output / "results.json").read_text())
    assert saved["accuracy"] == result.accuracy
    table = (output / "results.md").read_text()
    assert all(name in table for name in ("| base |", "| composed |", *SKILLS))
    manifest = json.loads((output / "manifest.json").read_text())
    assert set(manifest["adapters"]) == {*SKILLS, "composed", "composed-all"}
    assert set(manifest["example_prompts"]) == set(SKILLS)


def test_exact_match_equals_generating_and_comparing(quickstart):
    """The one-pass evaluator agrees with real greedy generation, on models that are right, wrong and in between."""
    output, result = quickstart
    tokenizer = AutoTokenizer.from_pretrained(result.base_model)
    tokenizer.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(result.base_model)
    model = PeftModel.from_pretrained(base, output / "adapters" / "sort", adapter_name="sort")
    model.load_adapter(output / "adapters" / "date", adapter_name="date")
    seen = set()
    for adapter in ("sort", "date"):
        model.set_adapter(adapter)
        for skill in ("sort", "date"):
            pairs = skill_examples(skill, "test", 40)
            answers = greedy_answers(model, tokenizer, [p for p, _ in pairs])
            generated = sum(a == c for a, (_, c) in zip(answers, pairs, strict=True)) / len(pairs)
            assert exact_match(model, tokenizer, pairs) == generated
            seen.add(generated)
    assert len(seen) >= 2  # not all 0 or all 1


def test_the_demo_serves_the_quickstart_output(quickstart):
    from sparse_peft.demo.state import DemoState

    output, _ = quickstart
    state = DemoState.load(output)
    assert set(state.names) == {*SKILLS, "composed", "composed-all"}
    prompt, completion = skill_examples("date", "test", 1)[0]
    assert state.example_prompts["date"].endswith("->")
    # the page opens on a skill adapter with that skill's prompt, offers two skills to compose, shows the results
    first = next(iter(SKILLS))
    assert state.default_choice() == (first, state.example_prompts[first])
    assert state.default_pair() == tuple(list(SKILLS)[:2]) and "| base |" in state.results
    assert state.generate(prompt, "date", max_new_tokens=16)[0] == completion
    assert state.generate(prompt, BASE, max_new_tokens=16)[0] != completion


def test_cli_train_on_an_embedded_skill(tmp_path, embedded_model_path):
    """``sparse-peft train`` defaults to the embedded model and takes ``--data skill:NAME``."""
    out = tmp_path / "adapter"
    run = subprocess.run(
        [sys.executable, "-m", "sparse_peft.cli", "train", "sft", "--data", "skill:date", "--steps", "2",
         "--batch-size", "4", "--no-progress", "--output", str(out)],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["model"] == str(embedded_model_path) and summary["steps"] == 2
    bad = subprocess.run(
        [sys.executable, "-m", "sparse_peft.cli", "train", "dpo", "--data", "skill:sum", "--output", str(out)],
        capture_output=True, text=True,
    )
    assert bad.returncode == 2 and "unknown skill" in bad.stderr and "reverse" in bad.stderr


def test_cli_quickstart_ends_with_the_results_and_the_demo_serving(tmp_path, embedded_model_path):
    """The README's first command end to end (a couple of steps per skill): the results table is written, then the
    demo serves the quickstart's adapters and answers a client with the adapter it asked for."""
    from gradio_client import Client

    port = free_port()
    out = tmp_path / "out"
    log = (tmp_path / "log.txt").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparse_peft.cli", "quickstart", "--steps", "2", "--test-examples", "10",
         "--output", str(out), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 600
        while "Serving the demo" not in (out_text := (tmp_path / "log.txt").read_text()):
            assert proc.poll() is None, out_text[-3000:]
            assert time.monotonic() < deadline, out_text[-3000:]
            time.sleep(1)
        assert "| base |" in out_text and "Traceback" not in out_text and (out / "results.md").is_file()
        for _ in range(120):  # the server takes a moment after the line
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.5)
        else:
            pytest.fail("the demo did not answer within a minute")
        prompt = skill_examples("date", "test", 1)[0][0]
        base_text, adapter_text, info = client.predict(prompt, "date", 8, False, 1.0, 1.0, 0, api_name="/generate")
        assert "Adapter **date**" in info and isinstance(adapter_text, str) and isinstance(base_text, str)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
