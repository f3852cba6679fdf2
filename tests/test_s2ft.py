"""S2FT: the PEFT tuner contract, partial-backprop gradients, selection, architectures, budget, files, composition."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from contract import ARCHS, Arch, TunerCase, TunerContract, logits
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from test_sparse_delta_contract import calibrate  # S2FT layers are sparse-delta layers: the same helper
from transformers import (
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from sparse_peft import S2FTConfig, SparseMask, compose, select_masks, triton_ops
from sparse_peft.indices import InvalidSparseIndicesError
from sparse_peft.tuners.s2ft import S2FTLinear, UnknownArchitectureError, resolve_architecture
from sparse_peft.tuners.sparse_delta.layer import CalibrationRequiredError, SparseDeltaLayer

ATTENTION_ROLES = {"llama": "o_proj", "qwen2": "o_proj", "gpt2": "attn.c_proj", "bert": "attention.output.dense"}


def s2ft(arch: Arch, *, init_weights: bool, variant: int = 0, attention_only: bool = False, **kwargs):
    """Config factory: ``variant`` becomes the seed; ``attention_only`` trains heads of layer 1 only."""
    if attention_only:
        kwargs.update(target_modules=[ATTENTION_ROLES[arch.name]], layers_to_transform=[1])
    return S2FTConfig(init_weights=init_weights, seed=variant, **kwargs)


class TestS2FTContract(TunerContract):
    cases = [
        TunerCase(
            "ratios-fused", partial(s2ft, heads_ratio=0.5, channels_ratio=0.25), exact_unmerge=True, lr=0.1
        ),
        TunerCase(
            "r-rows-unfused",
            partial(s2ft, r=1, value_rows=True, up_gate_rows=True, fused=False),
            exact_unmerge=True,
        ),
        TunerCase("attention-layer1", partial(s2ft, attention_only=True, heads_ratio=0.5), exact_unmerge=True),
        TunerCase(
            "gradient-calibrated",
            partial(s2ft, heads_ratio=0.5, channels_ratio=0.25, selection="gradient"),
            exact_unmerge=True,
            prepare=calibrate,
        ),
    ]


# ------------------------------------------------------------------ gradients (partial backprop)
def _tiny(arch: str = "llama") -> torch.nn.Module:
    return ARCHS[arch].build()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("fused", [True, False])
def test_slice_gradients_match_masked_dense_gradient(arch, fused):
    """dL/dvalues equals the dense dL/dW (of the merged weight) gathered at the trained slice, to fp32 tolerance."""
    config = S2FTConfig(heads_ratio=0.5, channels_ratio=0.25, value_rows=True, up_gate_rows=True, fused=fused,
                        init_weights=False)
    model = get_peft_model(_tiny(arch), config)
    batch = ARCHS[arch].batch()
    model(**batch).loss.backward()
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, S2FTLinear)}
    grads = {n: m.support_values["default"].grad.clone() for n, m in layers.items()}

    reference = _tiny(arch)  # the same weights with the deltas merged in, trained densely
    merged = model.merge_and_unload()
    reference.load_state_dict(merged.state_dict())
    reference(**batch).loss.backward()
    modules = dict(reference.named_modules())
    checked = 0
    for name, layer in layers.items():
        dense = modules[name].weight.grad.reshape(-1)
        expected = dense[layer.support_indices["default"].long()]
        if expected.numel():
            torch.testing.assert_close(grads[name], expected, rtol=1e-4, atol=1e-6)
            checked += 1
    assert checked >= 4


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_structured_ops_gradcheck_fp64(axis, fan_in_fan_out):
    """Fused and separate structured kernels: fp64 gradcheck in x and the values, and forward == dense."""
    gen = torch.Generator().manual_seed(0)
    out_f, in_f = 5, 6
    storage = (in_f, out_f) if fan_in_fan_out else (out_f, in_f)
    channels = torch.tensor([1, 3, 4])
    indices = triton_ops.slice_flat_indices(storage, axis, channels)
    x = torch.randn(2, 3, in_f, dtype=torch.float64, generator=gen, requires_grad=True)
    values = torch.randn(indices.numel(), dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(storage, dtype=torch.float64, generator=gen)
    dense = torch.zeros(storage, dtype=torch.float64).reshape(-1).index_put((indices,), values.detach())
    dense = dense.view(storage)
    w_logical = (weight + dense).t() if fan_in_fan_out else weight + dense
    expected = x.detach() @ w_logical.t()

    def fused(x, v):
        return triton_ops.fused_sparse_linear(x, weight, None, v, indices, 1.0, fan_in_fan_out, axis, channels)

    def separate(x, v):
        return triton_ops.structured_delta_linear(x, v, axis, channels, storage, fan_in_fan_out)

    torch.testing.assert_close(fused(x, values), expected)
    torch.testing.assert_close(separate(x, values) + x.detach() @ (weight.t() if fan_in_fan_out else weight).t(),
                               expected)
    assert torch.autograd.gradcheck(fused, (x, values))
    assert torch.autograd.gradcheck(separate, (x, values))


def test_fused_path_saves_only_the_input_slice_and_no_weight_copy():
    """For o/down (input-side slices) backward keeps x[..., channels] and the live weight, nothing weight-sized new."""
    model = get_peft_model(_tiny("llama"), S2FTConfig(heads_ratio=0.25, channels_ratio=0.0))
    layer = next(m for m in model.modules() if isinstance(m, S2FTLinear) and m.s2ft_role == "o")
    weight = layer.get_base_layer().weight
    saved: list[torch.Tensor] = []
    x = torch.randn(2, 4, layer.in_features)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    n_channels = layer.channels("default").numel()
    assert 0 < n_channels < layer.in_features
    shapes = [tuple(t.shape) for t in saved]
    assert (2, 4, n_channels) in shapes and (2, 4, layer.in_features) not in shapes, shapes
    weight_sized = [t for t in saved if t.shape == weight.shape]
    assert all(t.data_ptr() == weight.data_ptr() for t in weight_sized)  # the weight itself, never a copy


# ------------------------------------------------------------------ selection
def _channels(model: PeftModel, adapter: str = "default") -> dict[str, list[int]]:
    return {n: m.channels(adapter).tolist() for n, m in model.named_modules() if isinstance(m, S2FTLinear)}


def test_random_selection_is_seeded():
    make = lambda seed: get_peft_model(_tiny(), S2FTConfig(heads_ratio=0.5, channels_ratio=0.25, seed=seed))  # noqa: E731
    assert _channels(make(3)) == _channels(make(3))
    assert _channels(make(3)) != _channels(make(4))


def _boost_head_and_channel(model: torch.nn.Module, head: int, channel: int, factor: float) -> None:
    """Make query head ``head`` (through its KV head's v rows and its o columns) and FFN channel ``channel`` stand out."""
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    kv = head // (cfg.num_attention_heads // cfg.num_key_value_heads)
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.v_proj.weight[kv * d:(kv + 1) * d] *= factor
            block.self_attn.o_proj.weight[:, head * d:(head + 1) * d] *= factor
            block.mlp.up_proj.weight[channel] *= factor
            block.mlp.down_proj.weight[:, channel] *= factor


@pytest.mark.parametrize("selection", ["weight", "activation", "gradient"])
def test_selection_picks_the_dominant_head_and_channel(selection):
    base = _tiny()
    _boost_head_and_channel(base, head=2, channel=37, factor=30.0)
    model = get_peft_model(base, S2FTConfig(heads_ratio=0.25, channels_ratio=1 / 64, selection=selection))
    if selection != "weight":
        with pytest.raises(CalibrationRequiredError):
            model.train()
            model(**ARCHS["llama"].batch()).loss.backward()
        select_masks(model, [ARCHS["llama"].batch()])
    d = 32 // 4
    # by weight the o columns of head 2 stand out; by its input, both query heads reading the boosted KV head do
    heads = [2] if selection == "weight" else [2, 3]
    for name, channels in _channels(model).items():
        if name.endswith("o_proj"):
            assert channels in [list(range(h * d, (h + 1) * d)) for h in heads], (name, channels)
        if name.endswith("down_proj"):
            assert channels == [37], (name, channels)


# ------------------------------------------------------------------ architectures and budget
@pytest.mark.parametrize(
    "config,roles,heads,kv,dim,offset",
    [
        (LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2), "o_proj", 8, 2, 8, 0),
        (Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=1), "o_proj", 4, 1, 16, 0),
        (MistralConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=4), "o_proj", 8, 4, 8, 0),
        (GemmaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=32), "o_proj", 4, 1, 32, 0),
        (GPT2Config(n_embd=64, n_head=4), "attn.c_proj", 4, 4, 16, 128),
    ],
)
def test_architecture_from_config(config, roles, heads, kv, dim, offset):
    arch = resolve_architecture(config)
    assert arch.roles["o"].endswith(roles)
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.value_offset) == (heads, kv, dim, offset)
    assert arch.kv_head(heads - 1) == kv - 1


def test_bert_roles_resolve_the_two_output_dense_layers():
    arch = resolve_architecture(ARCHS["bert"].build().config)
    assert arch.role_of("bert.encoder.layer.0.attention.output.dense") == "o"
    assert arch.role_of("bert.encoder.layer.0.output.dense") == "down"
    assert arch.block_of("bert.encoder.layer.0.output.dense", "down") == "bert.encoder.layer.0"


def test_unknown_architecture_needs_roles_and_override_works():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc_in, self.fc_out = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.fc_out(torch.relu(self.fc_in(x)))

    with pytest.raises(UnknownArchitectureError, match="module_roles"):
        get_peft_model(Net(), S2FTConfig(channels_ratio=0.5))
    with pytest.raises(UnknownArchitectureError, match="head"):
        get_peft_model(Net(), S2FTConfig(module_roles={"o": "fc_out"}, heads_ratio=0.5))
    with pytest.raises(ValueError, match="unknown roles"):
        get_peft_model(Net(), S2FTConfig(module_roles={"query": "fc_in"}))
    model = get_peft_model(Net(), S2FTConfig(module_roles={"down": "fc_out", "up": "fc_in"}, channels_ratio=0.25,
                                             up_gate_rows=True))
    assert model.get_nb_trainable_parameters()[0] == 4 * 8 + 4 * 8


@pytest.mark.parametrize("bad", [{"r": 0}, {"r": 4, "heads_ratio": 0.5}, {"channels_ratio": 1.5},
                                 {"selection": "magnitude"}, {"attention_fraction": -0.1}])
def test_bad_config_values_are_refused(bad):
    with pytest.raises(ValueError):
        S2FTConfig(**bad)


@pytest.mark.parametrize("model_cls,config_cls", [(LlamaForCausalLM, LlamaConfig), (Qwen2ForCausalLM, Qwen2Config)])
@pytest.mark.parametrize("r", [4, 16])
def test_r_budget_matches_all_linear_lora(model_cls, config_cls, r):
    config = config_cls(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2)
    torch.manual_seed(0)
    lora = get_peft_model(model_cls(config), LoraConfig(r=r, target_modules="all-linear"))
    for extra in ({}, {"value_rows": True, "up_gate_rows": True}):
        ours = get_peft_model(model_cls(config), S2FTConfig(r=r, **extra))
        ratio = ours.get_nb_trainable_parameters()[0] / lora.get_nb_trainable_parameters()[0]
        assert 0.95 <= ratio <= 1.0, (extra, ratio)  # whole heads/channels: never over, a few % under


# ------------------------------------------------------------------ files
def _saved(tmp_path, arch: str = "llama") -> tuple[PeftModel, dict[str, torch.Tensor]]:
    model = get_peft_model(_tiny(arch), S2FTConfig(heads_ratio=0.5, channels_ratio=0.25, init_weights=False))
    model.save_pretrained(tmp_path)
    return model, load_file(tmp_path / "adapter_model.safetensors")


def test_file_holds_values_and_channel_ids_only(tmp_path):
    """Values, channel ids and a 4-int integrity header (shape + checksums) per module: no flat indices."""
    model, tensors = _saved(tmp_path)
    n_values = model.get_nb_trainable_parameters()[0]
    assert {k.rsplit(".", 1)[-1] for k in tensors} == {"s2ft_values", "s2ft_channels", "s2ft_header"}
    value_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.endswith("values"))
    assert value_bytes == 4 * n_values
    index_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if not k.endswith("values"))
    assert index_bytes < 0.1 * value_bytes
    reloaded = PeftModel.from_pretrained(_tiny(), tmp_path)
    batch = ARCHS["llama"].batch()
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch))


def test_loading_other_channels_into_a_live_model_keeps_its_parameters():
    """A Trainer under FSDP builds its optimizer before it loads the checkpoint: the load must write the file's
    channels and values into the parameters the optimizer holds, not replace them."""
    saved = get_peft_model(_tiny(), S2FTConfig(heads_ratio=0.5, channels_ratio=0.25, init_weights=False, seed=1))
    state = get_peft_model_state_dict(saved)
    model = get_peft_model(_tiny(), S2FTConfig(heads_ratio=0.5, channels_ratio=0.25, seed=2))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    set_peft_model_state_dict(model, state)
    live = [p for p in model.parameters() if p.requires_grad]
    assert len(live) == len(params) and all(a is b for a, b in zip(live, params, strict=True))  # the same objects
    batch = ARCHS["llama"].batch()
    torch.testing.assert_close(logits(model, batch), logits(saved, batch))
    model(**batch).loss.backward()
    before = [p.detach().clone() for p in params]
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, params, strict=True))  # the optimizer still trains them


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda c: c.clone().fill_(10_000), "out of range"),
        (lambda c: c.flip(0), "not sorted"),
        (lambda c: torch.cat([c[:1], c[:-1]]), "channel ids contain duplicates"),
        (lambda c: c.float(), "channel ids must be int32 or int64"),
        (lambda c: c[:-1], "values"),
    ],
)
def test_bad_channel_ids_are_refused_and_base_untouched(tmp_path, corrupt, message):
    _, tensors = _saved(tmp_path)
    key = next(k for k in tensors if k.endswith("o_proj.s2ft_channels"))
    tensors[key] = corrupt(tensors[key])
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    base = _tiny()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(InvalidSparseIndicesError, match=message) as info:
        PeftModel.from_pretrained(base, tmp_path)
    assert "o_proj" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items() if k in before)


# ------------------------------------------------------------------ sparse-delta machinery
def test_compose_masks_and_switching_use_the_sparse_delta_core():
    model = get_peft_model(_tiny(), S2FTConfig(heads_ratio=0.25, channels_ratio=0.125, init_weights=False, seed=1))
    model.add_adapter("other", S2FTConfig(heads_ratio=0.25, channels_ratio=0.125, init_weights=False, seed=2))
    batch = ARCHS["llama"].batch()
    assert all(isinstance(m, SparseDeltaLayer) for m in model.modules() if isinstance(m, S2FTLinear))
    mask = SparseMask.from_model(model, "default") | SparseMask.from_model(model, "other")
    compose(model, ["default", "other"], new_adapter_name="both")
    assert SparseMask.from_model(model, "both").nnz == mask.nnz
    for layer in (m for m in model.modules() if isinstance(m, S2FTLinear)):  # still a structured slice
        union = torch.unique(torch.cat([layer.channels("default"), layer.channels("other")]))
        assert torch.equal(layer.channels("both"), union)
    model.base_model.set_adapter(["default", "other"])
    together = logits(model, batch)
    model.set_adapter("both")
    torch.testing.assert_close(logits(model, batch), together)
    with model.disable_adapter():
        base = logits(model, batch)
    for _ in range(3):
        model.set_adapter("default")
        model.merge_adapter()
        model.unmerge_adapter()
    with model.disable_adapter():
        assert torch.equal(logits(model, batch), base)


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_autocast_forward_backward(fused):
    """TRL trains under bf16 autocast by default (also on CPU): half output grads meet fp32 saved inputs."""
    model = get_peft_model(_tiny(), S2FTConfig(heads_ratio=0.5, channels_ratio=0.25, fused=fused, init_weights=False))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**ARCHS["llama"].batch()).loss
    loss.backward()
    grads = [m.support_values["default"].grad for m in model.modules() if isinstance(m, S2FTLinear)]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
