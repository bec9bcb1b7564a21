"""(IA)³: parity with peft, the input/output sides, biased and Conv1D bases, bad input.

peft is the independent reference (a test dependency only; mapping in
tests/peft_reference.py): same base weights, peft's non-identity init copied
into ours, outputs and input gradients within 1e-5 in fp32, trainable counts equal.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import layer_input, make, perturb, requires_peft, tiny_bert, tiny_gpt2, tiny_llama
from peft_reference import compare_forward_and_input_grad, copy_adapter_weights, n_trainable_peft, peft_model
from peftlab.errors import ConfigError
from peftlab.methods.base import base_weight, count


@requires_peft
def test_ia3_equals_peft():
    base = tiny_llama()
    method = make("ia3")  # defaults: k, v, down with down on the input side
    ref = peft_model(method, base, init_ia3_weights=False)  # l ~ N(0, 1): far from identity
    ours = method.apply(copy.deepcopy(base)).eval()
    copy_adapter_weights(ours, method, ref)
    assert count(method.trainable_parameters(ours)) == n_trainable_peft(ref) == method.expected_trainable(ours)
    compare_forward_and_input_grad(ours, ref, base)


def test_ia3_sides_and_sizes():
    method = make("ia3")
    model = method.apply(tiny_llama())
    layers = method.layers(model)
    assert len(layers) == 6
    for name, layer in layers.items():
        assert layer.feedforward == name.endswith("down_proj")
        assert layer.scale.shape == ((64,) if layer.feedforward else (16,))  # down: intermediate; k, v: kv dim
        assert torch.equal(layer.scale, torch.ones_like(layer.scale))
    assert method.summary(model)["input_side"] == sorted(n for n in layers if n.endswith("down_proj"))


@pytest.mark.parametrize("family,builder", [("bert", tiny_bert), ("gpt2", tiny_gpt2)])
def test_ia3_is_exactly_its_weight_delta_on_biased_and_conv1d_layers(family, builder):
    """Biases are not rescaled, so y = (W0 + ΔW) x + b holds on BERT and GPT-2 (Conv1D) too, and merging agrees."""
    method = make("ia3")
    model = method.apply(builder())
    perturb(method.trainable_parameters(model).values(), scale=0.3)
    layers = method.layers(model)
    assert {layer.feedforward for layer in layers.values()} == {True, False}
    perturb([layer.base.bias for layer in layers.values()], scale=1.0)  # the tiny models init biases to 0
    for layer in layers.values():
        x = layer_input(layer)
        w = base_weight(layer.base) + layer.delta_weight()
        torch.testing.assert_close(layer(x), F.linear(x, w, layer.base.bias), atol=1e-5, rtol=1e-5)
        unmerged = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
        layer.unmerge()


def test_ia3_delta_weight_is_the_same_while_merged():
    method = make("ia3")
    model = method.apply(tiny_llama())
    perturb(method.trainable_parameters(model).values())
    before = {n: layer.delta_weight() for n, layer in method.layers(model).items()}
    method.merge(model)
    for n, layer in method.layers(model).items():
        torch.testing.assert_close(layer.delta_weight(), before[n], atol=0, rtol=0)


def test_ia3_feedforward_must_be_a_subset_of_targets():
    with pytest.raises(ConfigError) as err:
        make("ia3", targets=["k", "v"], feedforward=["down"])
    assert err.value.key == "method.feedforward" and "allowed: a subset of ['k', 'v']" in str(err.value)
    method = make("ia3", targets=["k", "v", "down"], feedforward=[])  # every target on the output side
    model = method.apply(tiny_llama())
    assert not any(layer.feedforward for layer in method.layers(model).values())
