"""Everything the demo does, as plain functions on a :class:`DemoState` (the Gradio app only wires them up).

Adapters are discovered in a directory (the quickstart's ``manifest.json``, else every folder with an
``adapter_config.json`` up to two levels deep), grouped by PEFT type (a PeftModel holds one type), and each
group gets its own copy of the base model and an :class:`~sparse_peft.hotswap.AdapterSwitcher`. A bad folder,
an adapter for another architecture or a corrupt file becomes a message; the other adapters still load.
"""

from __future__ import annotations

import json
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel

import sparse_peft  # noqa: F401 - registers the sparse adapter types
from sparse_peft.hotswap import BASE, AdapterSwitcher
from sparse_peft.masks import sparse_delta_layers

from .batching import BatchedGreedy

SPARSE_TYPES = ("SPARSE_DELTA", "S2FT")
COMPOSE_METHODS = {
    "regmean": "RegMean: each layer best reproduces both adapters' outputs on their own tasks' inputs (needs "
    "examples of each task: the demo has them for the quickstart's skill adapters; on the embedded model it keeps "
    "every skill)",
    "ties": "TIES: keep each adapter's largest entries, elect a sign per entry, average where adapters overlap "
    "(on the embedded model it keeps most of both skills where the plain sum loses one)",
    "sum": "the exact sum of the two deltas (LT-SFT; both adapters active at once computes the same)",
    "dare_ties": "DARE: drop entries at random, rescale the rest, then TIES",
    "magnitude_prune": "keep each adapter's largest entries, then sum",
    "dare_linear": "DARE: drop entries at random, rescale the rest, then sum",
}
"""The composition methods the demo offers (``sparse_peft.compose``), best first, with what each does."""


class DemoError(ValueError):
    """A user-facing problem (bad directory, unknown adapter, ...): shown in the app, the server keeps running."""


@dataclass
class AdapterEntry:
    name: str
    path: Path
    peft_type: str = ""
    error: str | None = None


def discover(adapters_dir: str | Path) -> tuple[dict[str, AdapterEntry], dict[str, Any]]:
    """Adapters in ``adapters_dir`` and the manifest (base model, example prompt), if there is one."""
    root = Path(adapters_dir).expanduser()
    if not root.is_dir():
        raise DemoError(
            f"Adapter directory {str(root)!r} does not exist. Run `sparse-peft quickstart` first, or pass "
            "--adapters DIR with folders holding adapter_config.json."
        )
    manifest = root / "manifest.json"
    data: dict[str, Any] = {}
    entries: dict[str, AdapterEntry] = {}
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        for name, rel in data.get("adapters", {}).items():
            entries[name] = AdapterEntry(name, (root / rel).resolve())
    else:
        for config in sorted([*root.glob("*/adapter_config.json"), *root.glob("*/*/adapter_config.json")]):
            folder = config.parent
            name = folder.relative_to(root).as_posix()
            entries[name] = AdapterEntry(name, folder)
        if (root / "adapter_config.json").is_file():
            entries[root.name] = AdapterEntry(root.name, root)
    if not entries:
        raise DemoError(f"No adapters in {str(root)!r}: no folder with adapter_config.json found.")
    return entries, data


def _read_results(root: Path, name: str | None) -> str:
    """The results file the manifest names (empty when there is none or it cannot be read)."""
    try:
        return (root / name).read_text() if name else ""
    except OSError:
        return ""


@dataclass
class DemoState:
    """Loaded base model copies, adapters and their switchers."""

    adapters_dir: Path
    base_model: str
    tokenizer: Any
    entries: dict[str, AdapterEntry]
    switchers: dict[str, AdapterSwitcher] = field(default_factory=dict)  # peft type -> switcher
    example_prompt: str | None = None
    example_prompts: dict[str, str] = field(default_factory=dict)  # adapter name -> a prompt it answers
    results: str = ""  # the quickstart's results table (markdown), when the manifest names one
    batchers: dict[int, BatchedGreedy] = field(default_factory=dict)  # id(switcher) -> its greedy batcher
    _batchers_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, adapters_dir: str | Path, model: str | None = None) -> DemoState:
        from transformers import AutoTokenizer

        entries, manifest = discover(adapters_dir)
        manifest_base = manifest.get("base_model")
        for entry in entries.values():
            try:
                entry.peft_type = str(PeftConfig.from_pretrained(entry.path).peft_type.value)
            except Exception as exc:  # noqa: BLE001 - any unreadable config is reported, not fatal
                entry.error = f"unreadable adapter_config.json: {exc}"
        base = model or manifest_base or next(
            (PeftConfig.from_pretrained(e.path).base_model_name_or_path for e in entries.values() if not e.error),
            None,
        )
        if not base:
            raise DemoError("No base model: pass --model, or use adapters whose config names base_model_name_or_path.")
        try:
            tokenizer = AutoTokenizer.from_pretrained(base)
        except Exception as exc:  # noqa: BLE001
            raise DemoError(f"Cannot load the tokenizer of base model {base!r}: {exc}") from exc
        state = cls(
            Path(adapters_dir),
            str(base),
            tokenizer,
            entries,
            example_prompt=manifest.get("example_prompt"),
            example_prompts=dict(manifest.get("example_prompts", {})),
            results=_read_results(Path(adapters_dir), manifest.get("results")),
        )
        for entry in entries.values():
            if not entry.error:
                state._attach(entry)
        if not state.names:
            problems = "; ".join(f"{e.name}: {e.error}" for e in entries.values())
            raise DemoError(f"No adapter could be loaded: {problems}")
        return state

    def _new_base(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.base_model).eval()

    def _attach(self, entry: AdapterEntry) -> None:
        """Load one adapter into the switcher of its type; failures become the entry's error."""
        try:
            switcher = self.switchers.get(entry.peft_type)
            if switcher is None:
                model = PeftModel.from_pretrained(self._new_base(), entry.path, adapter_name=entry.name)
                self.switchers[entry.peft_type] = AdapterSwitcher(model.eval())
            else:
                with switcher.lock:
                    switcher.activate(BASE)
                    switcher.model.load_adapter(entry.path, adapter_name=entry.name)
                    switcher.model.eval()
        except Exception as exc:  # noqa: BLE001 - wrong architecture, corrupt file, ...: report and go on
            entry.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]

    # ------------------------------------------------------------------ queries
    @property
    def names(self) -> list[str]:
        return [n for n, e in self.entries.items() if not e.error]

    @property
    def choices(self) -> list[str]:
        return [BASE, *self.names]

    def summary(self) -> str:
        lines = [f"Base model: `{self.base_model}`; adapters from `{self.adapters_dir}`."]
        for e in self.entries.values():
            lines.append(f"- **{e.name}** ({e.peft_type or '?'})" + (f": not loaded: {e.error}" if e.error else ""))
        return "\n".join(lines)

    def switcher_for(self, name: str) -> AdapterSwitcher:
        if name == BASE:
            return next(iter(self.switchers.values()))
        entry = self.entries.get(name)
        if entry is None or entry.error:
            raise DemoError(f"Unknown adapter {name!r}; choose one of {self.choices}.")
        return self.switchers[entry.peft_type]

    # ------------------------------------------------------------------ actions
    def generate(
        self,
        prompt: str,
        adapter: str,
        max_new_tokens: int = 16,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> tuple[str, float]:
        """Text generated with ``adapter`` (or the base) and the switch time it needed (seconds)."""
        if not prompt.strip():
            raise DemoError("Enter a prompt.")
        switcher = self.switcher_for(adapter)
        inputs = self.tokenizer(prompt, return_tensors="pt")
        kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "do_sample": bool(do_sample)}
        if do_sample:
            kwargs.update(temperature=float(temperature), top_p=float(top_p))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        if not do_sample:  # greedy: batched with whoever asks at the same time, each row with its own adapter
            batcher = self._batcher(switcher, pad)
            new_tokens, _ = batcher.generate(inputs["input_ids"][0].tolist(), adapter, int(max_new_tokens))
            return self.tokenizer.decode(new_tokens, skip_special_tokens=True), 0.0
        with switcher.lock:
            switch_s = switcher.activate(adapter)
            with switcher.using(adapter) as model, torch.no_grad():
                torch.manual_seed(int(seed))
                out = model.generate(**inputs, pad_token_id=pad, **kwargs)
        text = self.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return text, switch_s

    def _batcher(self, switcher: AdapterSwitcher, pad_token_id: int) -> BatchedGreedy:
        with self._batchers_lock:
            key = id(switcher)
            if key not in self.batchers:
                self.batchers[key] = BatchedGreedy(switcher, pad_token_id)
            return self.batchers[key]

    def default_choice(self) -> tuple[str, str | None]:
        """The adapter the page opens with and a prompt it answers: the first skill adapter with an example
        prompt (so the first Generate shows that skill), else the first adapter and the manifest's prompt."""
        for name in self.names:
            if name in self.example_prompts:
                return name, self.example_prompts[name]
        return (self.names[0] if self.names else BASE), self.example_prompt

    def default_pair(self) -> tuple[str | None, str | None]:
        """Two adapters to offer for composition: two single-skill sparse adapters of one type when there are."""
        by_type: dict[str, list[str]] = {}
        for name in self.names:
            if self.entries[name].peft_type in SPARSE_TYPES:
                by_type.setdefault(self.entries[name].peft_type, []).append(name)
        for names in by_type.values():
            skills = [n for n in names if n in self.example_prompts] or names
            if len(skills) >= 2:
                return skills[0], skills[1]
        names = self.names
        return (names[0] if names else None), (names[1] if len(names) > 1 else None)

    def compose(
        self, first: str, second: str, w_first: float, w_second: float, name: str, method: str = "ties",
        density: float | None = None,
    ) -> str:
        """Add ``name``, the composition of w1·first and w2·second by ``method`` (sparse adapters of one type; see
        :func:`sparse_peft.compose`), and make it selectable."""
        name = name.strip()
        if method not in COMPOSE_METHODS:
            raise DemoError(f"Unknown composition method {method!r}; choose one of {list(COMPOSE_METHODS)}.")
        density = None if method in ("sum", "regmean") else density
        if density is not None and not 0.0 < density <= 1.0:
            raise DemoError(f"The density is the fraction of each adapter's entries kept: in (0, 1], got {density}.")
        if not name or name in self.entries or name == BASE:
            raise DemoError(f"Choose a new, non-empty name for the composed adapter (got {name!r}).")
        types = {self.entries[a].peft_type for a in (first, second) if a in self.entries}
        if any(a not in self.names for a in (first, second)) or len(types) != 1 or not types <= set(SPARSE_TYPES):
            raise DemoError("Compose needs two loaded sparse adapters of the same type (sparse_delta or S2FT).")
        switcher = self.switcher_for(first)
        with switcher.lock:
            switcher.activate(BASE)
            sparse_peft.compose(switcher.model, [first, second], [w_first, w_second], new_adapter_name=name,
                                method=method, density=density, inputs=self._task_inputs(method, first, second))
        self.entries[name] = AdapterEntry(name, self.adapters_dir, peft_type=types.pop())
        kept = "" if density is None else f", keeping {density:.0%} of each adapter's entries"
        return f"Composed **{name}** = {method}({w_first:g} x {first}, {w_second:g} x {second}{kept})."

    def _task_inputs(self, method: str, *adapters: str) -> dict[str, list[dict[str, torch.Tensor]]] | None:
        """RegMean's examples of each adapter's task: the embedded skills' training examples, for adapters named
        after a skill (the quickstart's)."""
        if method != "regmean":
            return None
        from sparse_peft.embedded import SKILLS
        from sparse_peft.embedded.skills import skill_inputs

        unknown = [a for a in adapters if a not in SKILLS]
        if unknown:
            raise DemoError(
                f"RegMean needs examples of each adapter's task; the demo has them for the skill adapters "
                f"{list(SKILLS)}, not for {unknown}. Choose ties for these."
            )
        return {a: skill_inputs(self.tokenizer, a) for a in adapters}

    def merge_and_save(self, adapter: str, out_dir: str) -> str:
        """Write the base model with ``adapter`` merged (plus the tokenizer) to ``out_dir``."""
        if adapter == BASE or adapter not in self.names:
            raise DemoError("Pick an adapter to merge.")
        if not out_dir.strip():
            raise DemoError("Give an output directory.")
        target = Path(out_dir).expanduser()
        switcher = self.switcher_for(adapter)
        with switcher.lock:
            switcher.activate(adapter)  # merged in place
            merged = switcher.serving_model()  # the bare architecture sharing the merged weights
            merged.save_pretrained(target)
        self.tokenizer.save_pretrained(target)
        return f"Saved the base model with **{adapter}** merged to `{target}`."

    def layer_plot(self, adapter: str) -> str:
        """PNG path of a per-layer bar chart: density (sparse), selected channels (S2FT) or active rank."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if adapter == BASE:
            raise DemoError("Pick an adapter to plot.")
        switcher = self.switcher_for(adapter)
        labels, values, what = _layer_stats(switcher.model, adapter, self.entries[adapter].peft_type)
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.bar(range(len(values)), values)
        ax.set_xticks(range(len(values)), labels, rotation=90, fontsize=6)
        ax.set_ylabel(what)
        ax.set_title(f"{adapter}: {what} per layer")
        fig.tight_layout()
        path = Path(tempfile.mkdtemp(prefix="sparse-peft-demo-")) / f"{adapter.replace('/', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return str(path)


def _layer_stats(model: PeftModel, adapter: str, peft_type: str) -> tuple[list[str], list[float], str]:
    if peft_type in SPARSE_TYPES:
        layers = {n: m for n, m in sparse_delta_layers(model).items() if adapter in m.support_values}
        short = [n.replace("model.layers.", "L").replace(".self_attn", "").replace(".mlp", "") for n in layers]
        if peft_type == "S2FT":
            return short, [float(m.channels(adapter).numel()) for m in layers.values()], "selected channels"
        return short, [m.support_values[adapter].numel() / m.numel for m in layers.values()], "density"
    from peft.tuners.tuners_utils import BaseTunerLayer

    labels, ranks = [], []
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        gate = getattr(module, "sora_gate", None)
        if gate is not None and adapter in gate:
            ranks.append(float((gate[adapter] != 0).sum()))
        elif hasattr(module, "r") and adapter in getattr(module, "r", {}):
            ranks.append(float(module.r[adapter]))
        else:
            continue
        labels.append(name.rsplit("model.", 1)[-1])
    return labels, ranks, "active rank"
