"""peftlab's methods equal Hugging Face peft's on a tiny Llama with the same weights.

peft is the independent reference here (a test dependency only). Outputs and
input gradients must agree within 1e-5 in fp32, and trainable counts exactly.
"""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_llama
from peftlab.methods import METHODS

peft = pytest.importorskip("peft")


def copy_adapter_weights(ours_model, ours_method, ref_model, adapter_names):
    """Copy peft's (randomly initialized, non-identity) adapter tensors into ours."""
    ref = dict(ref_model.named_parameters())
    with torch.no_grad():
        for module_name, layer in ours_method.layers(ours_model).items():
            for role, param in layer.adapter_parameters().items():
                key = f"base_model.model.{module_name}.{adapter_names[role]}"
                param.copy_(ref[key].reshape(param.shape))


def compare_forward_and_input_grad(ours, ref, base, atol=1e-5):
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 11))
    embeds = ours.get_input_embeddings()(ids).detach()
    x1 = embeds.clone().requires_grad_(True)
    x2 = embeds.clone().requires_grad_(True)
    out1 = ours(inputs_embeds=x1).logits
    out2 = ref(inputs_embeds=x2).logits
    torch.testing.assert_close(out1, out2, atol=atol, rtol=0)
    grad_out = torch.randn_like(out1)
    out1.backward(grad_out)
    out2.backward(grad_out)
    torch.testing.assert_close(x1.grad, x2.grad, atol=atol, rtol=0)
    with torch.no_grad():  # the adapter really changes the output, so agreement means something
        assert out1.sub(base(inputs_embeds=embeds).logits).abs().max() > 1e-3


@pytest.mark.parametrize("name,rslora", [("lora", False), ("rslora", True)])
def test_lora_equals_peft(name, rslora):
    base = tiny_llama()
    ref = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        use_rslora=rslora, init_lora_weights=False, lora_dropout=0.0),
    ).eval()
    method_cls = METHODS[name]
    method = method_cls(method_cls.config_class(r=4, alpha=8, targets=["q", "v", "down"]))
    ours = method.apply(copy.deepcopy(base), None).eval()
    copy_adapter_weights(ours, method, ref, {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight"})
    assert sum(p.numel() for p in method.trainable_parameters(ours).values()) == ref.get_nb_trainable_parameters()[0]
    compare_forward_and_input_grad(ours, ref, base)
