"""The PEFT tuner contract as reusable checks, for any adapter type, on tiny transformers models built from configs.

Usage: subclass :class:`TunerContract` in a ``test_*.py`` module and set ``cases`` (a list of :class:`TunerCase`;
the first one is the *main* case, used by the expensive checks) and optionally ``archs``. pytest then collects every
check parametrized over the architectures and cases (``case`` = all cases, ``main_case`` = the first one)::

    class TestMyAdapterContract(TunerContract):
        cases = [TunerCase("default", partial(tuner_config, MyConfig, r=4))]

Models (nothing is downloaded): Llama with grouped-query attention, Qwen2 (biased q/k/v), GPT-2 (``Conv1D``
layers, tied head) and a BERT encoder with a sequence-classification head; hidden 32, 2 layers, vocabulary 128,
dropout 0, all seeded, so two builds of one architecture are bit-identical and serve as the untouched reference.

"Exact" below means ``torch.equal``; "close" means :func:`assert_close` (rounding-level tolerance). A case declares
whether its merge is undone bit for bit (``exact_unmerge=True``, e.g. writing saved originals back) or only to float
rounding (LoRA-style ``W += ΔW`` / ``W -= ΔW`` in the weight dtype); the merge checks hold it to what it declares, in
fp32 and in half precision alike (see :func:`assert_base_intact`).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from sparse_peft.embedded import toy

TESTS_DIR = Path(__file__).resolve().parent
VOCAB, HIDDEN, LAYERS, HEADS, SEQ = 128, 32, 2, 4, 8
Batch = dict[str, torch.Tensor]


# ------------------------------------------------------------------ architectures
@dataclass(frozen=True)
class Arch:
    """A tiny model family: how to build it (seeded) and how its head is trained."""

    name: str
    build_fn: Callable[[], PreTrainedModel]
    task_type: str  # the PEFT task type for the modules_to_save check
    save_module: str | None  # module passed as modules_to_save (None: the task type adds the head itself)
    attention: tuple[str, ...]  # some attention projections, for cases that do not adapt every linear layer

    def build(self, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
        torch.manual_seed(0)
        return self.build_fn().to(dtype).eval()

    def batch(self) -> Batch:
        gen = torch.Generator().manual_seed(1)
        input_ids = torch.randint(1, VOCAB, (2, SEQ), generator=gen)
        labels = torch.tensor([0, 1]) if self.task_type == "SEQ_CLS" else input_ids.clone()
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def _decoder_sizes() -> dict[str, Any]:
    return {
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": HEADS // 2, "max_position_embeddings": 4 * SEQ,
        "tie_word_embeddings": False,
    }


ARCHS: dict[str, Arch] = {
    arch.name: arch
    for arch in (
        Arch(
            "llama", lambda: toy.tiny_llama(0, **_decoder_sizes()), "CAUSAL_LM", "lm_head",
            ("q_proj", "v_proj", "o_proj"),
        ),
        Arch(
            "qwen2", lambda: Qwen2ForCausalLM(Qwen2Config(**_decoder_sizes())), "CAUSAL_LM", "lm_head",
            ("q_proj", "v_proj", "o_proj"),
        ),
        Arch(
            "gpt2",
            lambda: GPT2LMHeadModel(GPT2Config(
                vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=4 * SEQ,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            )),
            "CAUSAL_LM",
            "ln_f",  # lm_head is tied to the embedding
            ("c_attn",),
        ),
        Arch(
            "bert",
            lambda: BertForSequenceClassification(BertConfig(
                vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, max_position_embeddings=4 * SEQ, num_labels=2,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            )),
            "SEQ_CLS",
            None,  # SEQ_CLS puts the classifier into modules_to_save
            ("query", "value"),
        ),
    )
}


# ------------------------------------------------------------------ the adapter under test
ConfigFactory = Callable[..., PeftConfig]
"""``make_config(arch, *, init_weights, variant=0, **overrides)`` → a fresh config.

``init_weights=True``: the adapter starts as the identity; False: a random non-identity adapter. Distinct ``variant``
values must give distinct adapters (e.g. another seed). ``overrides`` (``task_type``, ``modules_to_save``) are
config fields to pass through."""


@dataclass(frozen=True)
class TunerCase:
    """One configuration of the adapter type under test, and what the contract may expect of it."""

    id: str
    make_config: ConfigFactory
    exact_unmerge: bool = False  # unmerge restores base weights and outputs bit for bit (else: to float rounding)
    additive: bool = True  # several active adapters act as the sum of their deltas (= merging them in turn)
    prepare: Callable[[PeftModel, str, list[Batch]], None] | None = None  # e.g. calibrate masks of a new adapter
    lr: float = 1e-2  # Adam learning rate for the training checks


def tuner_config(
    config_cls: type[PeftConfig], arch: Arch, *, init_weights: bool, variant: int = 0, attention_only: bool = False,
    **kwargs: Any,
) -> PeftConfig:
    """A :data:`ConfigFactory` for ``config_cls`` once bound with :func:`functools.partial` (with fixed fields).

    Adapts every linear layer, or with ``attention_only`` the :attr:`Arch.attention` projections of layer 1 only.
    ``variant`` is not passed on: enough for adapters that draw fresh random weights for every new adapter; wrap
    this to turn it into e.g. a seed.
    """
    if attention_only:
        kwargs.update(target_modules=list(arch.attention), layers_to_transform=[1])
    kwargs.setdefault("target_modules", "all-linear")
    return config_cls(init_weights=init_weights, **kwargs)


# ------------------------------------------------------------------ helpers
def assert_close(actual: torch.Tensor, expected: torch.Tensor, tight: bool = True) -> None:
    """Rounding-level agreement; ``tight=False`` for half precision."""
    tol = {"rtol": 1e-4, "atol": 1e-5} if tight else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(actual.float(), expected.float(), **tol)


def assert_differs(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Far above fp32 rounding noise of the same computation (tiny BERT's logits are only ~1e-2)."""
    assert (actual.float() - expected.float()).abs().max() > 1e-5, "the adapter has no visible effect"


def model_inputs(batch: Batch) -> Batch:
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Eval-mode output (the training flag is restored)."""
    was_training = model.training
    model.eval()
    out = model(**model_inputs(batch)).logits
    model.train(was_training)
    return out


def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(**batch).loss


def adapter_params(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if model.prefix in n}


def base_params(model: PeftModel) -> dict[str, torch.Tensor]:
    """The base model's parameters as stored right now, under the plain model's names, with adapters disabled."""
    with model.disable_adapter():
        params = {}
        for name, param in model.get_base_model().named_parameters():
            if model.prefix in name or ".modules_to_save." in name:
                continue
            clean = name.replace(".base_layer.", ".").replace(".original_module.", ".")
            params[clean] = param.detach().clone()
    return params


def assert_restored(actual: torch.Tensor, expected: torch.Tensor, exact: bool, tight: bool = True) -> None:
    """An output after merge/unmerge against the one before: bit for bit for an exact unmerge, else close."""
    if exact:
        assert torch.equal(actual, expected), "unmerging did not restore the output bit for bit"
    else:
        assert_close(actual, expected, tight)


def assert_base_intact(
    model: PeftModel,
    arch: Arch,
    dtype: torch.dtype,
    exact: bool = True,
    merged: Sequence[str] = ("default",),
    round_trips: int = 1,
) -> None:
    """The base model's parameters against a fresh build of ``arch`` in ``dtype``.

    ``exact``: every parameter bit for bit. Otherwise the ``merged`` adapters went through ``round_trips``
    LoRA-style merge/unmerge round trips (``W ± ΔW`` in ``dtype``), so the parameters of an adapted module's base
    layer may differ by that rounding: ``2 · round_trips`` roundings per merged adapter it holds, each at most
    ``eps(dtype) / 2`` at the scale ``max|W| + Σ max|ΔW|``, allowed twice over (``ΔW`` from the layer's
    ``get_delta_weight``, which such an adapter's layers provide like LoRA's). Every other
    parameter (embeddings, norms, heads, layers without an adapter) is never written by a merge and must still be
    bit for bit.
    """
    reference = dict(arch.build(dtype).named_parameters())
    current = base_params(model)
    assert current.keys() == reference.keys()
    atol = {} if exact else _unmerge_atol(model, reference, dtype, merged, round_trips)
    for name, param in current.items():
        if name in atol:
            torch.testing.assert_close(
                param.float(), reference[name].float(), rtol=0, atol=atol[name],
                msg=lambda m, name=name: f"base parameter {name} after unmerging: {m}",
            )
        else:
            assert torch.equal(param, reference[name]), f"base parameter {name} changed"


@torch.no_grad()
def _unmerge_atol(
    model: PeftModel, reference: dict[str, torch.Tensor], dtype: torch.dtype, merged: Sequence[str], round_trips: int
) -> dict[str, float]:
    """Per base-layer parameter of each adapted module: the rounding :func:`assert_base_intact` allows."""
    eps = torch.finfo(dtype).eps
    atol = {}
    for module_name, layer in model.get_base_model().named_modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        adapters = [a for a in merged if a in layer._get_available_adapters()]
        delta = sum(float(layer.get_delta_weight(a).abs().max()) for a in adapters)
        for param_name, _ in layer.get_base_layer().named_parameters():
            name = f"{module_name}.{param_name}"
            scale = float(reference[name].abs().max()) + delta
            atol[name] = 2 * round_trips * len(adapters) * eps * scale
    return atol


def train(model: nn.Module, batch: Batch, steps: int, optimizer: torch.optim.Optimizer) -> list[float]:
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        value = loss(model, batch)
        value.backward()
        optimizer.step()
        losses.append(value.item())
    return losses


def tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def backward_counting_calls(model: nn.Module, batch: Batch) -> int:
    """Forward + backward of the loss; returns how often the first adapted layer ran (2x under checkpointing)."""
    calls = 0

    def hook(*_: Any) -> None:
        nonlocal calls
        calls += 1

    handle = tuner_layers(model)[0].register_forward_hook(hook)
    loss(model, batch).backward()
    handle.remove()
    return calls


# ------------------------------------------------------------------ the contract
class TunerContract:
    """The PEFT tuner contract; subclasses set ``cases`` (first = main) and may narrow ``archs``."""

    cases: list[TunerCase] = []
    archs: tuple[str, ...] = tuple(ARCHS)

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """``arch``: every architecture; ``case``: every case; ``main_case``: the first case only."""
        cls = metafunc.cls
        if "arch" in metafunc.fixturenames:
            metafunc.parametrize("arch", [ARCHS[a] for a in cls.archs], ids=list(cls.archs))
        for argname, cases in (("case", cls.cases), ("main_case", cls.cases[:1])):
            if argname in metafunc.fixturenames:
                metafunc.parametrize(argname, cases, ids=[c.id for c in cases])

    # ---------------------------------------------------------- building
    @staticmethod
    def prepare(model: PeftModel, case: TunerCase, adapter_name: str, arch: Arch) -> None:
        """Run the case's preparation (e.g. mask calibration) on a new adapter while it is the active one."""
        if case.prepare is None:
            return
        previous = model.active_adapter
        model.set_adapter(adapter_name)
        case.prepare(model, adapter_name, [arch.batch()])
        model.set_adapter(previous)

    def make(
        self, arch: Arch, case: TunerCase, init_weights: bool = False, dtype: torch.dtype = torch.float32, **overrides
    ) -> PeftModel:
        model = get_peft_model(arch.build(dtype), case.make_config(arch, init_weights=init_weights, **overrides))
        self.prepare(model, case, "default", arch)
        return model.eval()

    def add(self, model: PeftModel, arch: Arch, case: TunerCase, name: str, variant: int) -> None:
        model.add_adapter(name, case.make_config(arch, init_weights=False, variant=variant))
        self.prepare(model, case, name, arch)

    # ---------------------------------------------------------- forward
    def test_forward_finite_and_not_base(self, arch, case):
        batch = arch.batch()
        base = logits(arch.build(), batch)
        model = self.make(arch, case)
        assert tuner_layers(model), "no layer was adapted"
        out = logits(model, batch)
        assert torch.isfinite(out).all()
        assert_differs(out, base)
        assert torch.equal(logits(model, batch), out), "a repeated forward drifted"

    def test_identity_init_gives_exact_base_output(self, arch, case):
        batch = arch.batch()
        model = self.make(arch, case, init_weights=True)
        assert torch.equal(logits(model, batch), logits(arch.build(), batch))

    def test_disable_adapter_is_exact_and_restores(self, arch, case):
        batch = arch.batch()
        model = self.make(arch, case)
        out = logits(model, batch)
        with model.disable_adapter():
            assert torch.equal(logits(model, batch), logits(arch.build(), batch))
        assert torch.equal(logits(model, batch), out)

    # ---------------------------------------------------------- merging
    def test_merge_unmerge(self, arch, case):
        batch = arch.batch()
        model = self.make(arch, case)
        out = logits(model, batch)
        model.merge_adapter()
        assert_close(logits(model, batch), out)
        model.unmerge_adapter()
        assert_base_intact(model, arch, torch.float32, exact=case.exact_unmerge)
        assert_restored(logits(model, batch), out, exact=case.exact_unmerge)

    def test_merge_and_unload_gives_plain_model(self, arch, case):
        batch = arch.batch()
        model = self.make(arch, case)
        out = logits(model, batch)
        merged = model.merge_and_unload()
        assert type(merged) is type(arch.build())
        assert not tuner_layers(merged)
        assert not any(model.prefix in n for n, _ in merged.named_parameters())
        assert_close(logits(merged, batch), out)

    def test_unload_gives_exact_base(self, arch, case):
        batch = arch.batch()
        model = self.make(arch, case)
        logits(model, batch)  # lets an adapter that writes into the weights do so before unloading
        plain = model.unload()
        assert not tuner_layers(plain)
        assert torch.equal(logits(plain, batch), logits(arch.build(), batch))
        reference = arch.build().state_dict()
        assert plain.state_dict().keys() == reference.keys()
        assert all(torch.equal(t, reference[k]) for k, t in plain.state_dict().items())

    # ---------------------------------------------------------- saving and loading
    def test_save_load_and_load_adapter_under_another_name(self, arch, case, tmp_path):
        batch = arch.batch()
        model = self.make(arch, case)
        out = logits(model, batch)
        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(arch.build(), tmp_path)
        assert_close(logits(loaded, batch), out)
        other = self.make(arch, case, init_weights=True)
        other.load_adapter(tmp_path, adapter_name="loaded")
        assert "loaded" in other.peft_config
        assert torch.equal(logits(other, batch), logits(arch.build(), batch))  # still on the identity adapter
        other.set_adapter("loaded")
        assert_close(logits(other, batch), out)

    @pytest.mark.slow
    def test_fresh_process_from_pretrained(self, main_case, tmp_path):
        """``import sparse_peft`` + ``PeftModel.from_pretrained`` in a new interpreter, all architectures at once."""
        for name in self.archs:
            arch = ARCHS[name]
            batch = arch.batch()
            model = self.make(arch, main_case)
            model.save_pretrained(tmp_path / name)
            expected = {"adapter": logits(model, batch), "base": logits(arch.build(), batch)}
            torch.save(expected, tmp_path / name / "expected.pt")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(TESTS_DIR.parent),
                                                             os.environ.get("PYTHONPATH", "")])}
        code = "import sys, sparse_peft, contract; contract.check_saved_adapters(sys.argv[1:])"
        dirs = [str(tmp_path / name) for name in self.archs]
        result = subprocess.run([sys.executable, "-c", code, *dirs], env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.split().count("ok") == len(dirs)

    # ---------------------------------------------------------- several adapters
    def test_set_adapter_switches(self, arch, case):
        batch = arch.batch()
        model = self.make(arch, case)
        out_default = logits(model, batch)
        self.add(model, arch, case, "other", variant=1)
        assert torch.equal(logits(model, batch), out_default)  # adding does not activate
        model.set_adapter("other")
        assert_differs(logits(model, batch), out_default)
        model.set_adapter("default")
        assert torch.equal(logits(model, batch), out_default)

    def test_several_active_adapters(self, arch, case):
        batch = arch.batch()
        model = self.make(arch, case)
        self.add(model, arch, case, "other", variant=1)
        out_default = logits(model, batch)
        model.set_adapter("other")
        out_other = logits(model, batch)
        model.base_model.set_adapter(["default", "other"])
        both = logits(model, batch)
        assert_differs(both, out_default)
        assert_differs(both, out_other)
        if case.additive:
            model.set_adapter("default")
            model.merge_adapter(adapter_names=["default", "other"])
            assert_close(logits(model, batch), both)
            model.unmerge_adapter()
            assert_base_intact(model, arch, torch.float32, exact=case.exact_unmerge, merged=["default", "other"])
            assert_restored(logits(model, batch), out_default, exact=case.exact_unmerge)

    def test_delete_adapter(self, arch, case):
        batch = arch.batch()
        model = self.make(arch, case)
        out_default = logits(model, batch)
        self.add(model, arch, case, "other", variant=1)
        model.set_adapter("other")
        logits(model, batch)
        model.delete_adapter("other")  # the active one
        assert model.active_adapters == ["default"]
        self.add(model, arch, case, "third", variant=2)
        model.delete_adapter("third")  # an inactive one
        assert set(model.peft_config) == {"default"}
        assert not [k for k in model.state_dict() if ".other" in k or ".third" in k]
        assert torch.equal(logits(model, batch), out_default)
        with model.disable_adapter():
            assert torch.equal(logits(model, batch), logits(arch.build(), batch))

    # ---------------------------------------------------------- training
    def test_trainable_parameters_are_the_adapter(self, arch, case, capsys):
        model = self.make(arch, case)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and set(trainable) == set(adapter_params(model))
        n_trainable, n_all = model.get_nb_trainable_parameters()
        assert n_trainable == sum(p.numel() for p in trainable.values())
        assert n_all == n_trainable + sum(p.numel() for p in arch.build().parameters())
        model.print_trainable_parameters()
        assert f"trainable params: {n_trainable:,}" in capsys.readouterr().out

    def test_only_adapter_is_trained(self, arch, case):
        batch = arch.batch()
        model = self.make(arch, case)
        before = {n: p.detach().clone() for n, p in adapter_params(model).items()}
        model.train()
        loss(model, batch).backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad == set(before)
        assert all(p.grad.abs().sum() > 0 for p in adapter_params(model).values())
        train(model, batch, 3, torch.optim.SGD(model.parameters(), lr=0.1))
        assert all(not torch.equal(p, before[n]) for n, p in adapter_params(model).items())
        assert_base_intact(model, arch, torch.float32)

    def test_training_lowers_loss(self, arch, main_case):
        model = self.make(arch, main_case)
        losses = train(model, arch.batch(), 20, torch.optim.Adam(model.parameters(), lr=main_case.lr))
        assert losses[-1] < 0.95 * losses[0], losses

    def test_gradient_checkpointing(self, arch, main_case):
        batch = arch.batch()
        plain = self.make(arch, main_case).train()
        ckpt = copy.deepcopy(plain)
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        ckpt.enable_input_require_grads()
        calls = {"plain": backward_counting_calls(plain, batch), "ckpt": backward_counting_calls(ckpt, batch)}
        assert calls["ckpt"] == 2 * calls["plain"], f"the checkpointed forward was not recomputed: {calls}"
        grads = {n: p.grad for n, p in adapter_params(plain).items()}
        for name, param in adapter_params(ckpt).items():
            assert_close(param.grad, grads[name])
        before = {n: p.detach().clone() for n, p in adapter_params(ckpt).items()}
        torch.optim.SGD(ckpt.parameters(), lr=0.1).step()
        assert all(not torch.equal(p, before[n]) for n, p in adapter_params(ckpt).items())

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
    def test_half_precision(self, arch, main_case, dtype):
        """Training step and merge/unmerge in fp16/bf16: an inexact unmerge is held to half-precision rounding."""
        batch = arch.batch()
        model = self.make(arch, main_case, dtype=dtype).train()
        value = loss(model, batch)
        value.backward()
        assert torch.isfinite(value)
        assert all(torch.isfinite(p.grad).all() for p in adapter_params(model).values())
        out = logits(model, batch)
        assert torch.isfinite(out).all()
        round_trips = 3
        for _ in range(round_trips):
            model.merge_adapter()
            assert_close(logits(model, batch), out, tight=False)
            model.unmerge_adapter()
        assert_base_intact(model, arch, dtype, exact=main_case.exact_unmerge, round_trips=round_trips)
        assert_restored(logits(model, batch), out, exact=main_case.exact_unmerge, tight=False)

    def test_modules_to_save(self, arch, main_case, tmp_path):
        batch = arch.batch()
        extra = {"modules_to_save": [arch.save_module]} if arch.save_module else {}
        model = self.make(arch, main_case, task_type=arch.task_type, **extra)
        wrappers = {n: m for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
        assert wrappers, "modules_to_save did not wrap anything"
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if ".modules_to_save." in n}
        assert trained and all(model.get_parameter(n).requires_grad for n in trained)
        train(model, batch, 3, torch.optim.Adam(model.parameters(), lr=main_case.lr))
        assert all(not torch.equal(model.get_parameter(n), p) for n, p in trained.items())
        assert_base_intact(model, arch, torch.float32)  # the original copies are untouched
        out = logits(model, batch)
        model.save_pretrained(tmp_path)
        saved = load_file(tmp_path / "adapter_model.safetensors")
        for name in wrappers:
            assert any(k.startswith(name + ".") for k in saved), f"{name} was not saved"
        loaded = PeftModel.from_pretrained(arch.build(), tmp_path)
        assert_close(logits(loaded, batch), out)


def check_saved_adapters(dirs: list[str]) -> None:
    """Child side of ``test_fresh_process_from_pretrained``: reload each saved adapter and compare outputs."""
    for directory in map(Path, dirs):
        arch = ARCHS[directory.name]
        expected = torch.load(directory / "expected.pt")
        model = PeftModel.from_pretrained(arch.build(), directory)
        assert type(model.peft_config["default"]).__module__.startswith("sparse_peft"), model.peft_config
        batch = arch.batch()
        assert_close(logits(model, batch), expected["adapter"])
        with model.disable_adapter():
            assert torch.equal(logits(model, batch), expected["base"])
        print(directory.name, "ok")
