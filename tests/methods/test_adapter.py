"""Bottleneck adapters: placement per family, the formula, sizing, exact identity at init,
saving and loading, bad input. (peft has no bottleneck adapter to compare with.)"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import batch, logits, make, tiny_bert, tiny_gpt2, tiny_llama
from peftlab.errors import ConfigError
from peftlab.methods.base import count


@torch.no_grad()
def perturb(method, model, scale: float = 0.1, seed: int = 7):
    generator = torch.Generator().manual_seed(seed)
    for p in method.trainable_parameters(model).values():
        p.add_(torch.randn(p.shape, generator=generator) * scale)


@pytest.mark.parametrize("tiny,placement,suffixes", [
    (tiny_llama, "houlsby", ("self_attn.o_proj", "mlp.down_proj")),
    (tiny_llama, "pfeiffer", ("mlp.down_proj",)),
    (tiny_bert, "houlsby", ("attention.output.dense", "layer.0.output.dense", "layer.1.output.dense")),
    (tiny_bert, "pfeiffer", ("layer.0.output.dense", "layer.1.output.dense")),
    (tiny_gpt2, "houlsby", ("attn.c_proj", "mlp.c_proj")),
], ids=["llama-houlsby", "llama-pfeiffer", "bert-houlsby", "bert-pfeiffer", "gpt2-houlsby"])
def test_adapter_placement(tiny, placement, suffixes):
    method = make("adapter", placement=placement)
    model = method.apply(tiny())
    wrapped = sorted(method.layers(model))
    per_block = 2 if placement == "houlsby" else 1
    assert len(wrapped) == 2 * per_block
    assert all(name.endswith(suffixes) for name in wrapped), wrapped
    assert not any("attention.self" in n or "intermediate" in n for n in wrapped)


@pytest.mark.parametrize("nonlinearity", ["relu", "gelu", "silu", "tanh"])
def test_adapter_formula(nonlinearity):
    acts = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
    method = make("adapter", nonlinearity=nonlinearity, bottleneck=3, reduction_factor=None)
    model = method.apply(tiny_gpt2())  # Conv1D sublayers: the adapter acts on their (out) features
    perturb(method, model)
    torch.manual_seed(0)
    for layer in method.layers(model).values():
        x = torch.randn(2, 4, layer.base.weight.shape[0])
        h = layer.base(x)
        expected = h + F.linear(acts[nonlinearity](F.linear(h, layer.down.weight, layer.down.bias)),
                                layer.up.weight, layer.up.bias)
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
        assert (layer(x) - h).abs().max() > 1e-3


@pytest.mark.parametrize("sizing,width", [({"reduction_factor": 8}, 4), ({"bottleneck": 5, "reduction_factor": None}, 5)])
def test_adapter_sizing_and_count(sizing, width):
    method = make("adapter", **sizing)
    model = method.apply(tiny_llama())
    assert {layer.bottleneck for layer in method.layers(model).values()} == {width}
    assert count(method.trainable_parameters(model)) == method.expected_trainable(model) == 4 * (2 * 32 * width + width + 32)


def test_adapter_is_exact_identity_at_init_and_learns_from_step_0():
    base = tiny_bert()
    inputs = batch()
    # 8 ReLU units: with 2, every unit can be negative at the [CLS] position the head reads,
    # leaving `up` of the last layer without a gradient by chance
    method = make("adapter", bottleneck=8, reduction_factor=None)
    model = method.apply(copy.deepcopy(base))
    torch.testing.assert_close(logits(model, inputs), logits(base, inputs), atol=0, rtol=0)
    model(**inputs).logits.pow(2).sum().backward()
    for layer in method.layers(model).values():
        assert layer.down.weight.abs().max() > 0 and layer.down.weight.abs().max() <= 0.02  # truncated at 2σ
        assert layer.up.weight.grad.abs().max() > 0  # up gets a gradient though it starts at 0


@pytest.mark.parametrize("tiny", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
def test_adapter_round_trip(tiny, tmp_path):
    method = make("adapter", placement="houlsby")
    model = method.apply(tiny())
    perturb(method, model)
    inputs = batch()
    save_file(method.state_dict(model), tmp_path / "adapter.safetensors")
    fresh_method = make("adapter", placement="houlsby")
    fresh = fresh_method.apply(tiny())
    fresh_method.load_state_dict(fresh, load_file(tmp_path / "adapter.safetensors"))
    torch.testing.assert_close(logits(fresh, inputs), logits(model, inputs), atol=0, rtol=0)


@pytest.mark.parametrize("config,key", [
    ({"bottleneck": 8, "reduction_factor": 16}, "method.bottleneck"),
    ({"bottleneck": None, "reduction_factor": None}, "method.bottleneck"),
    ({"placement": "parallel"}, "method.placement"),
    ({"nonlinearity": "swish"}, "method.nonlinearity"),
    ({"reduction_factor": 0.5}, "method.reduction_factor"),
])
def test_adapter_bad_config(config, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        make("adapter", **config)


def test_adapter_too_narrow_fails_before_the_model_changes():
    model = tiny_llama()
    method = make("adapter", reduction_factor=64)  # 32 // 64 = 0
    with pytest.raises(ConfigError, match=r"^method.reduction_factor: gives bottleneck 0"):
        method.apply(model)
    assert all(p.requires_grad for p in model.parameters()) and not method.layers(model)
