"""LoRA and rsLoRA equal Hugging Face peft's on a tiny Llama with the same weights.

peft is the independent reference here (a test dependency only; the mapping is
tests/peft_reference.py). Outputs and input gradients must agree within 1e-5 in
fp32, and trainable counts exactly.
"""
from __future__ import annotations

import copy

import pytest

from conftest import make, requires_peft, tiny_llama
from peft_reference import compare_forward_and_input_grad, copy_adapter_weights, n_trainable_peft, peft_model


@requires_peft
@pytest.mark.parametrize("name", ["lora", "rslora"])
def test_lora_equals_peft(name):
    base = tiny_llama()
    method = make(name, r=4, alpha=8, targets=["q", "v", "down"])
    ref = peft_model(method, base, init_lora_weights=False)  # peft's random, non-identity B
    ours = method.apply(copy.deepcopy(base), None).eval()
    copy_adapter_weights(ours, method, ref)
    assert sum(p.numel() for p in method.trainable_parameters(ours).values()) == n_trainable_peft(ref)
    compare_forward_and_input_grad(ours, ref, base)
