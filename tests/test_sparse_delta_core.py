"""SPARSE_DELTA specifics beyond the generic tuner contract: registration, config and file validation,
bit-exact unmerge, fused vs separate paths, memory behaviour of the autograd functions, selection, quantized bases.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import peft
import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GPT2LMHeadModel, LlamaForCausalLM

import sparse_peft
from sparse_peft import SparseDeltaConfig, SparseDeltaLayer, select_masks
from sparse_peft.index_codec import decode_indices
from sparse_peft.indices import (
    CorruptAdapterFileError,
    InvalidSparseIndicesError,
    index_dtype,
    validate_indices,
)
from sparse_peft.registry import (
    UnsupportedPeftVersionError,
    check_peft_version,
    register_all,
)
from sparse_peft.tuners.sparse_delta import CalibrationRequiredError
from tests.contract import ARCHS


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return ARCHS["llama"].build_fn()


def tiny_gpt2() -> GPT2LMHeadModel:
    return ARCHS["gpt2"].build()


INPUT = torch.arange(16).view(2, 8) % 64


def logits(model: nn.Module, x: torch.Tensor = INPUT) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def named_sparse_layers(model: nn.Module) -> dict[str, SparseDeltaLayer]:
    return {
        n.removeprefix("base_model.model."): m
        for n, m in model.named_modules()
        if isinstance(m, SparseDeltaLayer)
    }


def sparse_layers(model: nn.Module) -> list[SparseDeltaLayer]:
    return [m for m in model.modules() if isinstance(m, SparseDeltaLayer)]


# ------------------------------------------------------------------ registration
def test_registration_is_idempotent_and_known_to_peft():
    register_all()
    register_all()
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert peft.PeftType.SPARSE_DELTA.value == "SPARSE_DELTA"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[peft.PeftType.SPARSE_DELTA] is SparseDeltaConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[peft.PeftType.SPARSE_DELTA] is sparse_peft.SparseDeltaModel
    for name in ("SORA", "S2FT", "GROUP_SPARSE_LORA"):
        assert peft.PeftType(name).name == name


def test_unsupported_peft_version_gives_clear_error(monkeypatch):
    monkeypatch.setattr(peft, "__version__", "0.30.0")
    with pytest.raises(UnsupportedPeftVersionError, match=r"supports peft>=0\.21\.0,<0\.22\.0"):
        check_peft_version()


@pytest.mark.slow
def test_config_roundtrip_in_fresh_process(tmp_path):
    config = SparseDeltaConfig(target_modules=["q_proj", "v_proj"], r=2, selection="magnitude", seed=3)
    config.save_pretrained(tmp_path)
    code = (
        "import sparse_peft, sys; from peft import PeftConfig; "
        f"c = PeftConfig.from_pretrained({str(tmp_path)!r}); "
        "print(type(c).__name__, c.r, c.selection, *sorted(c.target_modules), c.peft_type.value)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["SparseDeltaConfig", "2", "magnitude", "q_proj", "v_proj", "SPARSE_DELTA"]
    assert isinstance(PeftConfig.from_pretrained(tmp_path), SparseDeltaConfig)


# ------------------------------------------------------------------ config validation
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"density": 0.1, "r": 2}, "either `density` or `r`"),
        ({"density": 0.0}, "`density` must be a number in \\(0, 1\\]"),
        ({"density": 1.5}, "`density` must be a number"),
        ({"density": "0.1"}, "`density` must be a number"),
        ({"r": 0}, "`r` must be a positive integer"),
        ({"r": 2.5}, "`r` must be a positive integer"),
        ({"selection": "topk"}, "`selection` must be one of"),
        ({"seed": "x"}, "`seed` must be an integer"),
    ],
)
def test_bad_config_values_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparseDeltaConfig(**kwargs)


def test_budget_r_too_large_and_unmatched_or_unsupported_targets():
    with pytest.raises(ValueError, match="asks for .* entries"):
        get_peft_model(tiny_llama(), SparseDeltaConfig(target_modules=["q_proj"], r=100))
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(tiny_llama(), SparseDeltaConfig(target_modules=["no_such_module"]))
    with pytest.raises(TypeError, match="cannot adapt a torch.nn.modules.sparse.Embedding"):
        get_peft_model(tiny_llama(), SparseDeltaConfig(target_modules=["embed_tokens"]))


def test_budget_counts_and_int32_indices():
    model = get_peft_model(tiny_llama(), SparseDeltaConfig(target_modules=["q_proj", "down_proj"], r=1))
    for name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, SparseDeltaLayer)):
        expected = layer.in_features + layer.out_features
        assert layer.support_values["default"].numel() == expected, name
        assert layer.support_indices["default"].dtype == torch.int32
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == sum(layer.support_values["default"].numel() for layer in sparse_layers(model))
    assert index_dtype(2**31) == torch.int32 and index_dtype(2**31 + 1) == torch.int64


# ------------------------------------------------------------------ index validation
@pytest.mark.parametrize(
    "indices, message",
    [
        (torch.tensor([0, 5, 100], dtype=torch.int32), "out of range"),
        (torch.tensor([-1, 5], dtype=torch.int64), "out of range"),
        (torch.tensor([3, 1, 2], dtype=torch.int32), "not sorted"),
        (torch.tensor([1, 2, 2], dtype=torch.int32), "duplicates"),
        (torch.tensor([1.0, 2.0]), "must be int32 or int64"),
        (torch.tensor([1, 2], dtype=torch.int16), "must be int32 or int64"),
        (torch.tensor([[1, 2]], dtype=torch.int32), "must be 1-D"),
    ],
)
def test_validate_indices_rejects(indices, message):
    with pytest.raises(InvalidSparseIndicesError, match=message):
        validate_indices(indices, numel=50)


def test_validate_indices_count_must_match_values():
    with pytest.raises(InvalidSparseIndicesError, match="3 indices but values have shape"):
        validate_indices(torch.tensor([1, 2, 3]), numel=50, values=torch.zeros(2))


def _saved_adapter(tmp_path):
    model = get_peft_model(
        tiny_llama(), SparseDeltaConfig(target_modules=["q_proj"], density=0.1, init_weights=False)
    )
    model.save_pretrained(tmp_path)
    return tmp_path / "adapter_model.safetensors"


def _as_plain_indices(tensors: dict[str, torch.Tensor]) -> str:
    """Rewrite the compact index code of the first module as plain int32 indices (the other accepted format)."""
    code_key = next(k for k in tensors if k.endswith("sparse_delta_codes"))
    key = code_key.replace("sparse_delta_codes", "sparse_delta_indices")
    tensors[key] = decode_indices(tensors.pop(code_key)).to(torch.int32)
    return key


def _corrupt(tensors: dict[str, torch.Tensor], how: str) -> None:
    key = _as_plain_indices(tensors)
    idx = tensors[key]
    if how == "out_of_range":
        idx[-1] = 10**6
    elif how == "unsorted":
        idx[0], idx[1] = idx[1].clone(), idx[0].clone()
    elif how == "duplicated":
        idx[1] = idx[0]
    elif how == "float":
        tensors[key] = idx.float()
    elif how == "count":
        tensors[key] = idx[:-1].contiguous()
    elif how == "missing":
        del tensors[key]


@pytest.mark.parametrize(
    "how, message",
    [
        ("out_of_range", "out of range"),
        ("unsorted", "not sorted"),
        ("duplicated", "duplicates"),
        ("float", "must be int32 or int64"),
        ("count", "indices but values have shape"),
        ("missing", "has no indices for this module"),
    ],
)
def test_corrupt_adapter_file_is_rejected_and_base_untouched(tmp_path, how, message):
    path = _saved_adapter(tmp_path)
    tensors = load_file(path)
    _corrupt(tensors, how)
    save_file(tensors, path)
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(
        InvalidSparseIndicesError, match=f"module 'model.layers.0.self_attn.q_proj'.*{message}"
    ):
        PeftModel.from_pretrained(base, tmp_path)
    after = {
        k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "sparse_delta_" not in k
    }
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_importing_sparse_peft_leaves_pefts_file_reader_alone():
    from peft.utils import save_and_load
    from safetensors.torch import load_file as safetensors_load_file

    assert save_and_load.safe_load_file is safetensors_load_file


def test_truncated_adapter_file_names_the_file(tmp_path):
    path = _saved_adapter(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptAdapterFileError, match="adapter_model.safetensors: it is truncated"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


# ------------------------------------------------------------------ exact restore
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ten_thousand_merge_unmerge_cycles_leave_zero_drift(dtype):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 24)).to(dtype)
    model = get_peft_model(base, SparseDeltaConfig(target_modules=["0"], density=0.3, init_weights=False))
    layer = sparse_layers(model)[0]
    original = layer.get_base_layer().weight.detach().clone()
    for _ in range(10_000):
        layer.merge()
        layer.unmerge()
    assert torch.equal(layer.get_base_layer().weight, original)


def test_switching_adapters_and_fused_training_leave_zero_drift():
    base = tiny_llama()
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(
        base, SparseDeltaConfig(target_modules="all-linear", density=0.1, init_weights=False)
    )
    model.add_adapter(
        "other", SparseDeltaConfig(target_modules="all-linear", density=0.1, init_weights=False, seed=1)
    )
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(30):
        model.set_adapter("default" if step % 2 else "other")
        model.train()
        model(input_ids=INPUT, labels=INPUT).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with model.disable_adapter():
            logits(model)
    base_state = model.get_base_model().state_dict()
    for key, value in reference.items():
        peft_key = next(k for k in base_state if k.replace(".base_layer", "") == key)
        assert torch.equal(base_state[peft_key], value), key
    assert torch.equal(logits(model.unload()), logits(tiny_llama()))


# ------------------------------------------------------------------ fused vs separate
@pytest.mark.parametrize(
    "factory, targets", [(tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn", "c_proj", "c_fc"])]
)
def test_fused_and_separate_paths_agree(factory, targets):
    results = {}
    for fused in (True, False):
        model = get_peft_model(
            factory(), SparseDeltaConfig(target_modules=targets, density=0.1, init_weights=False, fused=fused)
        )
        model.train()
        out = model(input_ids=INPUT, labels=INPUT)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[fused] = (out.logits.detach(), grads)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
    assert results[True][1].keys() == results[False][1].keys() and results[True][1]
    for name in results[True][1]:
        torch.testing.assert_close(results[True][1][name], results[False][1][name], rtol=1e-4, atol=1e-6)


def test_values_gradient_matches_masked_dense_gradient():
    torch.manual_seed(0)
    linear = nn.Linear(12, 10)
    model = get_peft_model(
        nn.Sequential(linear), SparseDeltaConfig(target_modules=["0"], density=0.2, init_weights=False)
    )
    layer = sparse_layers(model)[0]
    x = torch.randn(5, 12)
    model(x).pow(2).sum().backward()
    dense = nn.Linear(12, 10)
    with torch.no_grad():
        dense.weight.copy_(layer.get_base_layer().weight + layer.get_delta_weight("default"))
        dense.bias.copy_(layer.get_base_layer().bias)
    dense(x).pow(2).sum().backward()
    idx = layer.support_indices["default"].long()
    torch.testing.assert_close(layer.support_values["default"].grad, dense.weight.grad.flatten()[idx])


@pytest.mark.parametrize("fused", [True, False])
def test_forward_saves_no_dense_weight_copy(fused):
    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Linear(64, 48)), SparseDeltaConfig(target_modules=["0"], density=0.05, fused=fused)
    )
    weight = sparse_layers(model)[0].get_base_layer().weight
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(4, 64)).sum()
    dense = [t for t in saved if t.numel() >= weight.numel()]
    # the fused path may reference the weight itself (no copy); nothing else weight-sized is kept
    assert all(t.data_ptr() == weight.data_ptr() for t in dense), [tuple(t.shape) for t in dense]
    if not fused:
        assert not dense


def test_base_weight_never_holds_the_delta_outside_the_kernel():
    model = get_peft_model(
        tiny_llama(), SparseDeltaConfig(target_modules="all-linear", density=0.2, init_weights=False)
    )
    reference = tiny_llama()
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(input_ids=INPUT, labels=INPUT)
    for name, layer in named_sparse_layers(model).items():  # after the forward, before the backward
        assert torch.equal(layer.get_base_layer().weight, reference.get_submodule(name).weight), name
    out.loss.backward()
    optimizer.step()
    for name, layer in named_sparse_layers(model).items():
        assert torch.equal(layer.get_base_layer().weight, reference.get_submodule(name).weight), name


# ------------------------------------------------------------------ selection
def test_random_selection_is_seeded():
    def indices(seed):
        model = get_peft_model(
            tiny_llama(), SparseDeltaConfig(target_modules=["q_proj"], density=0.1, seed=seed)
        )
        return sparse_layers(model)[0].support_indices["default"]

    assert torch.equal(indices(0), indices(0))
    assert not torch.equal(indices(0), indices(1))


def test_magnitude_selection_picks_largest_weights():
    model = get_peft_model(
        tiny_llama(), SparseDeltaConfig(target_modules=["q_proj"], density=0.1, selection="magnitude")
    )
    layer = sparse_layers(model)[0]
    weight = layer.get_base_layer().weight.abs().flatten()
    chosen = layer.support_indices["default"].long()
    assert weight[chosen].min() >= weight[~torch.isin(torch.arange(weight.numel()), chosen)].max()


@pytest.mark.parametrize("selection", ["gradient", "snip"])
def test_gradient_selection_matches_dense_reference(selection):
    batches = [{"input_ids": INPUT, "labels": INPUT}, {"input_ids": INPUT.flip(1), "labels": INPUT.flip(1)}]
    reference = tiny_llama()
    for p in reference.parameters():
        p.requires_grad_(False)
    q_proj = reference.model.layers[1].self_attn.q_proj
    q_proj.weight.requires_grad_(True)
    score = torch.zeros_like(q_proj.weight)
    for batch in batches:
        reference(**batch).loss.backward()
        score += (q_proj.weight.grad * (q_proj.weight if selection == "snip" else 1)).abs()
        q_proj.weight.grad = None

    model = get_peft_model(
        tiny_llama(), SparseDeltaConfig(target_modules=["q_proj"], density=0.1, selection=selection)
    )
    model.train()
    with pytest.raises(CalibrationRequiredError, match="select_masks"):
        model(**batches[0])
    select_masks(model, batches, layers_per_pass=1)
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    chosen = layer.support_indices["default"].long()
    expected = torch.topk(score.flatten(), chosen.numel()).indices.sort().values
    assert torch.equal(chosen, expected)
    assert torch.count_nonzero(layer.support_values["default"]) == 0
    model(**batches[0]).loss.backward()  # calibrated: training is allowed now


# ------------------------------------------------------------------ quantized bases
@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A tiny Llama whose linear layers all have >= 64 inputs: bitsandbytes 0.50's CPU 4-bit inference path (taken
    on CPUs with AVX512-BF16) fails on layers narrower than its 64-wide quantization block."""
    from sparse_peft.embedded.toy import tiny_llama as quantizable_llama

    path = tmp_path_factory.mktemp("llama")
    quantizable_llama().save_pretrained(path)
    return path


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_train_disable_merge_unmerge(saved_llama, bits):
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8)
    base = LlamaForCausalLM.from_pretrained(saved_llama, quantization_config=quant)
    base_logits = logits(base)
    model = get_peft_model(
        base, SparseDeltaConfig(target_modules="all-linear", density=0.1, init_weights=False)
    )
    model.train()
    loss = model(input_ids=INPUT, labels=INPUT).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(layer.support_values["default"].grad is not None for layer in sparse_layers(model))
    model.eval()
    adapted = logits(model)
    assert not torch.equal(adapted, base_logits)
    with model.disable_adapter():
        assert torch.equal(logits(model), base_logits)
    with pytest.warns(UserWarning, match="re-quantizes the weight"):
        model.merge_adapter()
    torch.testing.assert_close(logits(model), adapted, atol=0.3, rtol=0)  # merge into 4/8-bit is lossy
    model.unmerge_adapter()
    assert torch.equal(logits(model), adapted)
    with model.disable_adapter():
        assert torch.equal(logits(model), base_logits)


# ------------------------------------------------------------------ command line
@pytest.mark.slow
def test_cli_help_and_bad_arguments():
    run = [sys.executable, "-m", "sparse_peft.cli"]
    help_text = subprocess.run(
        run + ["quickstart", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for option in ("--output", "--steps", "--seed", "--no-demo"):
        assert option in help_text
    bad = subprocess.run(run + ["quickstart", "--steps", "-3"], capture_output=True, text=True)
    assert bad.returncode != 0 and "must be a positive integer" in bad.stderr
    assert subprocess.run(run + ["nonsense"], capture_output=True, text=True).returncode != 0


def test_model_copy_keeps_adapter_independent():
    model = get_peft_model(
        tiny_llama(), SparseDeltaConfig(target_modules=["q_proj"], density=0.1, init_weights=False)
    )
    clone = copy.deepcopy(model)
    assert torch.equal(logits(clone), logits(model))


@pytest.mark.parametrize("fused", [True, False])
def test_cpu_autocast_bf16_forward_backward(fused):
    model = get_peft_model(
        nn.Sequential(nn.Linear(16, 8)),
        SparseDeltaConfig(target_modules=["0"], density=0.3, init_weights=False, fused=fused),
    )
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.float32
    assert torch.isfinite(sparse_layers(model)[0].support_values["default"].grad).all()


@pytest.mark.slow
def test_fused_training_under_torch_compile_matches_eager_and_leaves_the_base_weight():
    """The fused path writes ``W0[idx] + v`` into the weight inside its autograd function; compiled (AOTAutograd
    traces through it) the training steps equal eager ones and the base weights stay bit-identical."""

    def run(compiled: bool) -> tuple[list[float], bool]:
        model = get_peft_model(tiny_llama(0), SparseDeltaConfig(target_modules="all-linear", density=0.1,
                                                                 init_weights=False, seed=1))
        base = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
        losses = []
        for _ in range(3):
            loss = forward(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses, all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)

    eager, compiled = run(False), run(True)
    assert eager[1] and compiled[1]
    assert compiled[0] == pytest.approx(eager[0], rel=1e-6)
    assert eager[0][-1] < eager[0][0]  # it trained


@pytest.mark.parametrize("tokens", [1, 64])
def test_inference_picks_the_cheaper_unmerged_path_and_matches_the_merged_model(tokens):
    """Without autograd a few tokens (generation's one per step) run the base product plus the delta's own product,
    many tokens the transient fused copy; both never write the weight and equal the merged model's output."""
    model = get_peft_model(
        tiny_llama(), SparseDeltaConfig(target_modules="all-linear", density=0.05, init_weights=False)
    ).eval()
    x = torch.arange(tokens).view(1, tokens) % 64
    layer = next(iter(named_sparse_layers(model).values()))
    hidden = torch.zeros(1, tokens, layer.in_features)
    assert layer._few_tokens("default", hidden) == (tokens == 1)
    base = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = logits(model, x)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    model.merge_adapter()
    torch.testing.assert_close(unmerged, logits(model, x), rtol=1e-5, atol=1e-5)
