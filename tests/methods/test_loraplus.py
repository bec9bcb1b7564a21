"""LoRA+: its two learning rates. peft has no LoRA+ model to compare with (only an optimizer
factory): the test is the optimizer step itself."""
from __future__ import annotations

import pytest
import torch

from conftest import make, perturb, tiny_llama
from peftlab.errors import ConfigError


def test_loraplus_param_groups_partition_the_trainable_parameters():
    method = make("loraplus", r=4, targets=["q", "v", "down"])
    model = method.apply(tiny_llama())
    groups = method.param_groups(model, lr=2e-4, weight_decay=0.01)
    assert [g["name"] for g in groups] == ["lora_A", "lora_B"]
    assert [g["lr"] for g in groups] == pytest.approx([2e-4, 2e-4 * 16])
    assert all(g["weight_decay"] == 0.01 for g in groups)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))  # disjoint
    assert set(ids) == {id(p) for p in method.trainable_parameters(model).values()}  # and complete
    for layer in method.layers(model).values():
        assert any(p is layer.lora_A for p in groups[0]["params"]) and any(p is layer.lora_B for p in groups[1]["params"])
    summary = method.summary(model)
    assert summary["lr_ratio"] == 16.0
    assert summary["param_groups"] == [
        {"name": "lora_A", "tensors": 6, "parameters": 2 * (4 * 32 + 4 * 32 + 4 * 64),
         "lr": 2e-4, "weight_decay": 0.01},
        {"name": "lora_B", "tensors": 6, "parameters": 2 * 32 * 4 + 2 * 16 * 4 + 2 * 32 * 4,
         "lr": 2e-4 * 16, "weight_decay": 0.01},
    ]
    assert sum(g["parameters"] for g in summary["param_groups"]) == method.expected_trainable(model)


def adam_step(groups_of, lr: float):
    """One AdamW step on a perturbed LoRA+ model; returns (ΔA, ΔB) per layer."""
    method = make("loraplus", r=4, targets=["q", "v"])
    model = method.apply(tiny_llama())
    perturb(method.trainable_parameters(model).values())  # so A gets a gradient as well
    layers = method.layers(model)
    before = {n: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for n, layer in layers.items()}
    optimizer = torch.optim.AdamW(groups_of(method, model, lr))
    torch.manual_seed(0)
    model(input_ids=torch.randint(0, 128, (2, 9))).logits.pow(2).mean().backward()
    optimizer.step()
    return {n: (layer.lora_A.detach() - before[n][0], layer.lora_B.detach() - before[n][1])
            for n, layer in layers.items()}


def test_loraplus_moves_b_ratio_times_further_than_single_lr_adamw():
    lr = 1e-2
    plus = adam_step(lambda method, model, lr: method.param_groups(model, lr, 0.0), lr)
    single = adam_step(lambda method, model, lr: [{"params": list(method.trainable_parameters(model).values()),
                                                   "lr": lr, "weight_decay": 0.0}], lr)
    for name in plus:
        delta_a, delta_b = plus[name]
        assert delta_b.abs().max() > 0 and delta_a.abs().max() > 0
        # Adam's first step is lr · g / (|g| + eps): same gradients, so A moves the same and B 16× as far
        torch.testing.assert_close(delta_a, single[name][0], atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(delta_b, 16 * single[name][1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("ratio", [0, -1.0, True])
def test_loraplus_bad_ratio(ratio):
    with pytest.raises(ConfigError) as err:
        make("loraplus", lr_ratio=ratio)
    assert err.value.key == "method.lr_ratio"
