"""LoKr: peft's factorization, parity with peft, bad input, GPT-2 Conv1D bases.

Parity: tiny Llama, the same base weights, peft's non-identity init copied into
ours (the same factors with the same shapes); fp32 outputs within 1e-5, input
gradients within 1e-5 of their scale, fp64 within 1e-9; trainable counts equal.
(peft mapping: tests/peft_reference.py.)
"""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import assert_supports_conv1d_bases, make, requires_peft, tiny_llama
from peft_reference import ADAPTER_NAMES, assert_matches_peft, copy_adapter_weights, n_trainable_peft, peft_model
from peftlab.errors import ConfigError
from peftlab.methods import METHODS
from peftlab.methods.base import count
from peftlab.methods.lokr import LoKrConfig, factorization

OUR_TARGETS = ["q", "v", "down"]


@requires_peft
def test_lokr_factorization_equals_peft():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dimension in range(1, 400):
        assert factorization(dimension) == peft_factorization(dimension), dimension
        for factor in (1, 2, 3, 4, 8, 16, 24):
            if dimension % factor == 0:
                assert factorization(dimension, factor) == peft_factorization(dimension, factor)


LOKR_CASES = {
    "w2 full": dict(r=8),
    "both decomposed, mixed": dict(r=3, decompose_both=True),
    "factor 8 (w1 larger)": dict(r=2, decompose_factor=8),
}


@requires_peft
@pytest.mark.parametrize("config", LOKR_CASES.values(), ids=LOKR_CASES.keys())
def test_lokr_equals_peft(config):
    base = tiny_llama()
    method = make("lokr", alpha=8, targets=OUR_TARGETS, **config)
    ref = peft_model(method, base, init_weights=False)
    ours = method.apply(copy.deepcopy(base)).eval()
    roles = ADAPTER_NAMES["lokr"]
    ref_names = {n for n, _ in ref.named_parameters()}
    for name, layer in method.layers(ours).items():  # the same factors exist, with the same shapes
        assert {f"base_model.model.{name}.{roles[role]}" for role in layer.adapter_parameters()} == {
            n for n in ref_names if n.startswith(f"base_model.model.{name}.lokr_")}
    copy_adapter_weights(ours, method, ref)
    trainable = count(method.trainable_parameters(ours))
    assert trainable == n_trainable_peft(ref) == method.expected_trainable(ours)
    assert_matches_peft(ours, ref, base)


def test_lokr_factor_that_does_not_divide_fails_before_modifying_the_model():
    model = tiny_llama()
    reference = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"^method\.decompose_factor: got 3, which does not divide "
                                          r"model\.layers\.0\.self_attn\.q_proj .*allowed: -1 or .*\[1, 2, 4, 8, 16\]"):
        make("lokr", decompose_factor=3, targets=OUR_TARGETS).apply(model)
    assert all(p.requires_grad for p in model.parameters())
    assert METHODS["lokr"].layer_class not in {type(m) for m in model.modules()}
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("factor", [0, -2, 1.5])
def test_lokr_bad_factor_value_is_a_config_error(factor):
    with pytest.raises(ConfigError, match=r"^method\.decompose_factor: got .*allowed: -1 \(automatic\) or an integer"):
        METHODS["lokr"](LoKrConfig(decompose_factor=factor))


def test_lokr_on_gpt2_conv1d_bases():  # peft's LoKr refuses Conv1D; ours wraps any linear-like layer
    assert_supports_conv1d_bases("lokr", r=2)
