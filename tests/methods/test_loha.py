"""LoHa: parity with peft (dense and Khatri-Rao forwards), bad input, GPT-2 Conv1D bases.

Parity: tiny Llama, the same base weights, peft's non-identity init copied into
ours; fp32 outputs within 1e-5, input gradients within 1e-5 of their scale, fp64
within 1e-9; trainable counts equal. (peft mapping: tests/peft_reference.py.)
"""
from __future__ import annotations

import copy

import pytest

from conftest import assert_supports_conv1d_bases, make, requires_peft, tiny_llama
from peft_reference import assert_matches_peft, copy_adapter_weights, n_trainable_peft, peft_model
from peftlab.errors import ConfigError
from peftlab.methods.base import count

OUR_TARGETS = ["q", "v", "down"]


@requires_peft
@pytest.mark.parametrize("r,khatri_rao", [(8, {False}), (2, {True}), (4, {False, True})])
def test_loha_equals_peft(r, khatri_rao):
    base = tiny_llama()
    method = make("loha", r=r, alpha=8, targets=OUR_TARGETS)
    ref = peft_model(method, base, init_weights=False)
    ours = method.apply(copy.deepcopy(base)).eval()
    # both forward forms are exercised: dense ΔW, and the rank-r² Khatri-Rao product
    assert {layer.khatri_rao for layer in method.layers(ours).values()} == khatri_rao
    copy_adapter_weights(ours, method, ref)
    assert count(method.trainable_parameters(ours)) == n_trainable_peft(ref)
    assert_matches_peft(ours, ref, base)


def test_loha_bad_rank_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^method\.r: got 0; allowed"):
        make("loha", r=0)


def test_loha_on_gpt2_conv1d_bases():  # peft's LoHa refuses Conv1D; ours wraps any linear-like layer
    assert_supports_conv1d_bases("loha", r=2)
