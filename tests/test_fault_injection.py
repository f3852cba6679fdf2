"""Fault injection: nothing corrupts the base weights and nothing loads wrong.

Concurrent forwards on one fused model, adapter files for another model size, randomly damaged files (indices,
values, integrity headers, the safetensors header), non-finite or non-float values, a file that is bad only in a
later module: each is either refused with an error naming the problem or handled exactly, and the base weights are
bit-identical afterwards."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import sparse_peft  # noqa: F401
from sparse_peft import S2FTConfig, SparseDeltaConfig
from sparse_peft.embedded import toy
from sparse_peft.embedded.toy import VOCAB, tiny_llama
from sparse_peft.indices import CorruptAdapterFileError, InvalidSparseIndicesError

REFUSED = (InvalidSparseIndicesError, CorruptAdapterFileError)
CONFIGS = {
    "sparse_delta": lambda seed=0: SparseDeltaConfig(
        target_modules="all-linear", density=0.2, init_weights=False, seed=seed
    ),
    "s2ft": lambda seed=0: S2FTConfig(heads_ratio=0.5, channels_ratio=0.5, init_weights=False, seed=seed),
}


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every base-layer tensor of a (wrapped or plain) model, cloned."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items()
            if "sparse_delta" not in k and "s2ft" not in k}


def assert_bit_identical(before: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    after = base_state(model)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"base weights changed: {changed[:5]}"


def assert_untouched(before: dict[str, torch.Tensor], base: torch.nn.Module) -> None:
    """A failed ``PeftModel.from_pretrained`` leaves the user's model unwrapped, trainable and bit-identical."""
    assert not any(isinstance(m, sparse_peft.SparseDeltaLayer) for m in base.modules()), "left wrapped"
    assert all(p.requires_grad for p in base.parameters()), "trainable flags changed"
    assert not hasattr(base, "peft_config")
    assert_bit_identical(before, base)


def llama(hidden: int) -> LlamaForCausalLM:
    return toy.tiny_llama(0, vocab_size=VOCAB, hidden_size=hidden)


# ------------------------------------------------------------------ threads
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_concurrent_inference_forwards_are_exact_and_leave_the_base_bit_identical(kind):
    model = get_peft_model(tiny_llama(), CONFIGS[kind]()).eval()
    inputs = [torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with torch.no_grad():
        expected = [model(x).logits for x in inputs]
    with model.disable_adapter(), torch.no_grad():
        base_expected = model(inputs[0]).logits
    before = base_state(model)
    weight = model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight
    pristine = weight.detach().clone()
    seen_fused = []
    stop = threading.Event()

    def watch() -> None:  # anyone else reading the weight while forwards run must see W0
        while not stop.is_set():
            seen_fused.append(not torch.equal(weight.detach(), pristine))

    def forward(i: int) -> bool:
        with torch.no_grad():
            return all(torch.equal(model(inputs[(i + j) % 8]).logits, expected[(i + j) % 8]) for j in range(5))

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(forward, range(8)))
    stop.set()
    watcher.join()
    assert all(results) and seen_fused and not any(seen_fused)
    assert_bit_identical(before, model)
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(inputs[0]).logits, base_expected)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_concurrent_training_forwards_serialise_and_leave_the_base_bit_identical(kind):
    model = get_peft_model(tiny_llama(), CONFIGS[kind]()).train()
    before = base_state(model)

    def step(i: int) -> float:
        x = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(i))
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss.item()

    with ThreadPoolExecutor(4) as pool:
        losses = list(pool.map(step, range(12)))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert_bit_identical(before, model)


# ------------------------------------------------------------------ shapes
@pytest.mark.parametrize("saved, loaded", [(64, 96), (96, 64)])
def test_an_adapter_for_another_model_size_is_refused_naming_both_shapes(tmp_path, saved, loaded):
    get_peft_model(llama(saved), CONFIGS["sparse_delta"]()).save_pretrained(tmp_path)
    base = llama(loaded)
    before = base_state(base)
    with pytest.raises(InvalidSparseIndicesError, match=rf"made for a \d+x{saved} weight .* is \d+x{loaded}"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_untouched(before, base)


@pytest.mark.parametrize("saved, loaded", [(64, 96), (96, 64)])
def test_s2ft_for_another_model_size_is_refused(tmp_path, saved, loaded):
    get_peft_model(llama(saved), CONFIGS["s2ft"]()).save_pretrained(tmp_path)
    base = llama(loaded)
    before = base_state(base)
    with pytest.raises(InvalidSparseIndicesError, match=rf"made for a .*{saved}.* weight .* is .*{loaded}"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_untouched(before, base)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_a_failed_load_under_a_new_name_leaves_the_model_as_it_was(tmp_path, kind):
    """An intact file for another model size, loaded next to an existing adapter: the new name is not registered,
    the existing layers keep exactly their adapters, values and trainable flags."""
    get_peft_model(llama(96), CONFIGS[kind]()).save_pretrained(tmp_path)
    model = get_peft_model(llama(64), CONFIGS[kind](seed=3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    layers = {k: type(m) for k, m in model.named_modules()}
    with pytest.raises(InvalidSparseIndicesError, match="made for a"):
        model.load_adapter(tmp_path, adapter_name="other")
    assert set(model.peft_config) == {"default"}
    assert {k: type(m) for k, m in model.named_modules()} == layers
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert flags == {k: p.requires_grad for k, p in model.named_parameters()}


# ------------------------------------------------------------------ damaged files
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved sparse-delta adapter, its tensors, and the logits it gives on a probe."""
    folder = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(tiny_llama(), CONFIGS["sparse_delta"]()).eval()
    model.save_pretrained(folder)
    probe = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(probe).logits
    return folder, load_file(folder / "adapter_model.safetensors"), probe, logits


def _load_outcome(folder, probe, expected) -> str:
    """Load the adapter in ``folder`` on a fresh base: 'refused' (a clear error) or 'exact' (same logits);
    anything else fails the test. The base must be bit-identical after a refusal."""
    base = tiny_llama()
    before = base_state(base)
    try:
        model = PeftModel.from_pretrained(base, folder).eval()
    except REFUSED:
        assert_bit_identical(before, base)
        return "refused"
    with torch.no_grad():
        assert torch.equal(model(probe).logits, expected), "a damaged file loaded with different outputs"
    return "exact"


@pytest.mark.parametrize("part", ["sparse_delta_codes", "sparse_delta_values", "sparse_delta_header"])
def test_random_byte_edits_of_every_tensor_class_are_refused(tmp_path, saved, part):
    folder, tensors, probe, logits = saved
    (tmp_path / "adapter_config.json").write_bytes((folder / "adapter_config.json").read_bytes())
    keys = sorted(k for k in tensors if k.endswith(part))
    assert keys
    outcomes = []
    for seed in range(40):
        rng = random.Random(seed)
        damaged = {k: v.clone() for k, v in tensors.items()}
        key = rng.choice(keys)
        raw = damaged[key].reshape(-1).view(torch.uint8)
        for _ in range(rng.choice((1, 1, 2, 5))):
            position = rng.randrange(raw.numel())
            raw[position] = (int(raw[position]) + rng.randrange(1, 256)) % 256  # always a different byte
        save_file(damaged, tmp_path / "adapter_model.safetensors")
        outcomes.append(_load_outcome(tmp_path, probe, logits))
    assert set(outcomes) == {"refused"}, outcomes


def test_random_byte_edits_of_the_raw_file_are_refused_or_harmless(tmp_path, saved):
    folder, _, probe, logits = saved
    raw = (folder / "adapter_model.safetensors").read_bytes()
    (tmp_path / "adapter_config.json").write_bytes((folder / "adapter_config.json").read_bytes())
    outcomes = []
    for seed in range(60):
        rng = random.Random(seed)
        data = bytearray(raw)
        position = rng.randrange(len(data)) if seed % 3 else rng.randrange(min(len(data), 400))  # JSON header too
        data[position] = (data[position] + rng.randrange(1, 256)) % 256
        (tmp_path / "adapter_model.safetensors").write_bytes(bytes(data))
        try:
            outcomes.append(_load_outcome(tmp_path, probe, logits))
        except (ValueError, OSError, RuntimeError) as exc:  # any other clear error names the file or the problem
            assert str(exc), type(exc)
            outcomes.append("refused")
    assert outcomes.count("refused") >= 50, outcomes  # an edit of JSON padding or of key order can be harmless


def test_files_without_integrity_headers_still_load(tmp_path, saved):
    folder, tensors, probe, logits = saved
    (tmp_path / "adapter_config.json").write_bytes((folder / "adapter_config.json").read_bytes())
    save_file({k: v for k, v in tensors.items() if not k.endswith("sparse_delta_header")},
              tmp_path / "adapter_model.safetensors")
    assert _load_outcome(tmp_path, probe, logits) == "exact"


@pytest.mark.parametrize("edit", ["extra module", "header only", "unknown tensor", "missing module"])
def test_tensors_that_do_not_fit_the_adapted_modules_are_named(tmp_path, saved, edit):
    """A file edited to cover other modules than the config targets, or carrying tensors nobody reads, is refused
    naming the module, and the base model is left unwrapped."""
    folder, tensors, probe, logits = saved
    (tmp_path / "adapter_config.json").write_bytes((folder / "adapter_config.json").read_bytes())
    first = next(k for k in tensors if k.endswith("sparse_delta_header")).removesuffix(".sparse_delta_header")
    edited = dict(tensors)
    module = [k for k in tensors if k.startswith(first + ".")]
    if edit == "extra module":
        edited |= {k.replace("layers.0", "layers.7"): tensors[k].clone() for k in module}
        message = "modules this model does not adapt.*layers.7"
    elif edit == "header only":
        edited[module[0].replace("layers.0", "layers.7")] = tensors[module[0]].clone()
        message = "layers.7"
    elif edit == "unknown tensor":
        edited[first + ".sparse_delta_scale"] = torch.ones(1)
        message = "unknown tensors.*sparse_delta_scale"
    else:
        edited = {k: v for k, v in tensors.items() if k not in module}
        message = "no tensors for 1 adapted module"
    save_file(edited, tmp_path / "adapter_model.safetensors")
    base = tiny_llama()
    with pytest.raises(InvalidSparseIndicesError, match=message):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, sparse_peft.SparseDeltaLayer) for m in base.modules())


# ------------------------------------------------------------------ values
@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("bad", ["nan", "inf", "int", "bool"])
def test_non_finite_or_non_float_values_are_refused_naming_the_module(tmp_path, kind, bad):
    get_peft_model(tiny_llama(), CONFIGS[kind]()).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(k for k in tensors if k.endswith("_values"))[-1]
    if bad == "nan":
        tensors[key][0] = float("nan")
    elif bad == "inf":
        tensors[key][-1] = float("inf")
    else:
        tensors[key] = tensors[key].to(torch.int32 if bad == "int" else torch.bool)
    tensors = {k: v for k, v in tensors.items() if not k.endswith("sparse_delta_header")}  # reach the value check
    save_file(tensors, path)
    base = tiny_llama()
    before = base_state(base)
    module = key.removeprefix("base_model.model.").rsplit(".", 1)[0]
    with pytest.raises(InvalidSparseIndicesError, match=rf"{module}.*(NaN or infinite|floating point)"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_bit_identical(before, base)


# ------------------------------------------------------------------ partial loads
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_a_file_bad_only_in_a_later_module_changes_nothing(tmp_path, kind):
    """Loading into an existing adapter name: every module is checked before any layer changes."""
    trained = get_peft_model(tiny_llama(), CONFIGS[kind]())
    trained.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(k for k in tensors if k.endswith("_values"))[-1]  # the last module only
    tensors[key][0] = float("nan")
    tensors = {k: v for k, v in tensors.items() if not k.endswith("sparse_delta_header")}
    save_file(tensors, path)
    model = get_peft_model(tiny_llama(), CONFIGS[kind](seed=5))  # the same modules, another support and values
    probe = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        expected = model(probe).logits
    adapter_state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidSparseIndicesError, match="NaN"):
        model.load_adapter(tmp_path, adapter_name="default")
    assert all(torch.equal(adapter_state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(probe).logits, expected)


# ------------------------------------------------------------------ configs and the CLI
def test_an_s2ft_config_that_selects_nothing_is_refused():
    with pytest.raises(ValueError, match="select no head and no channel"):
        S2FTConfig(heads_ratio=0, channels_ratio=0)
    assert S2FTConfig(heads_ratio=0, channels_ratio=0.1).channels_ratio == 0.1  # channels only is fine


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n', "cannot be read as json"),
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": null}\n', "'completion' is empty"),
    ],
)
@pytest.mark.slow
def test_cli_train_bad_data_files_give_one_line_and_exit_2(tmp_path, content, message):
    import subprocess
    import sys

    data = tmp_path / "train.jsonl"
    data.write_text(content)
    run = subprocess.run(
        [sys.executable, "-m", "sparse_peft.cli", "train", "sft", "--model", str(tmp_path / "no-model"), "--data",
         str(data), "--output", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]


def test_a_damaged_file_is_refused_before_the_model_is_wrapped_or_the_name_registered(tmp_path, saved):
    folder, tensors, _, _ = saved
    (tmp_path / "adapter_config.json").write_bytes((folder / "adapter_config.json").read_bytes())
    damaged = {k: v.clone() for k, v in tensors.items()}
    key = next(k for k in damaged if k.endswith("sparse_delta_values"))
    damaged[key][0] += 1.0  # a finite, plausible value: only the checksum can tell
    save_file(damaged, tmp_path / "adapter_model.safetensors")
    base = tiny_llama()
    with pytest.raises(InvalidSparseIndicesError, match="checksum"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, sparse_peft.SparseDeltaLayer) for m in base.modules())  # not wrapped
    model = PeftModel.from_pretrained(tiny_llama(), folder)
    with pytest.raises(InvalidSparseIndicesError, match="checksum"):
        model.load_adapter(tmp_path, adapter_name="x")
    assert "x" not in model.peft_config and set(model.peft_config) == {"default"}


def test_s2ft_files_carry_an_integrity_header_that_a_changed_channel_trips(tmp_path):
    """Moving one channel id to another valid, unused one keeps the file well-formed: only the checksum tells."""
    model = get_peft_model(tiny_llama(), CONFIGS["s2ft"]())
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    assert any(k.endswith("s2ft_header") for k in tensors)
    key = next(k for k in tensors if k.endswith("s2ft_channels"))
    channels = tensors[key]
    gaps = sorted(set(range(int(channels.max()))) - set(channels.tolist()))
    channels[0] = gaps[0]  # channels_ratio 0.5 leaves gaps below the largest id
    tensors[key] = channels.sort().values
    save_file(tensors, path)
    base = tiny_llama()
    with pytest.raises(InvalidSparseIndicesError, match="checksum"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, sparse_peft.SparseDeltaLayer) for m in base.modules())
