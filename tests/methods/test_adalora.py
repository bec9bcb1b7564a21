"""AdaLoRA: bad input, behaviour peft does not cover, and parity with peft.

Parity: tiny Llama, the same base weights, adapter tensors copied from peft's
non-identity init into ours; outputs and input gradients within 1e-5 in fp32,
trainable counts equal. Also: the orthogonality regularizer's value and the
rank allocator (importance EMAs, masks, budget schedule) step by step on the
same fake gradients. (peft mapping: tests/peft_reference.py.)
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import assert_supports_conv1d_bases, make, requires_peft, tiny_llama
from peft_reference import ADAPTER_NAMES, assert_matches_peft, copy_adapter_weights, n_trainable_peft, peft_model
from peftlab.errors import ConfigError
from peftlab.methods import METHODS
from peftlab.methods.adalora import budget_schedule
from peftlab.methods.base import count

OUR_TARGETS = ["q", "v", "down"]
ADALORA_ROLES = ADAPTER_NAMES["adalora"]  # ours -> peft: P = lora_B, Λ = lora_E, Q = lora_A


def ids(seed: int = 0, shape=(2, 9)) -> torch.Tensor:
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def test_adalora_target_r_above_init_r_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^method\.target_r: got 16; allowed: an integer in \[1, 12\]"):
        make("adalora", init_r=12, target_r=16)


def test_adalora_init_r_above_layer_size_fails_before_modifying_the_model():
    model = tiny_llama()
    with pytest.raises(ConfigError, match=r"^method\.init_r: got 40; .*min\(d, k\)"):
        make("adalora", init_r=40, target_r=8).apply(model)
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen, nothing wrapped
    assert METHODS["adalora"].layer_class not in {type(m) for m in model.modules()}


@pytest.mark.parametrize("tinit,tfinal", [(60, 40), (100, 0), (0, 100)])
def test_adalora_schedule_without_budget_phase_fails_at_train_start(tinit, tfinal):
    model = tiny_llama()
    method = make("adalora", init_r=4, target_r=2, tinit=tinit, tfinal=tfinal)
    method.apply(model)
    with pytest.raises(ConfigError, match=r"^method\.tinit: .*method\.tfinal.*allowed: .*< total steps \(100\)"):
        method.on_train_start(model, 100)


def test_adalora_after_backward_needs_total_steps():
    model = tiny_llama()
    method = make("adalora", init_r=4, target_r=2)
    method.apply(model)
    with pytest.raises(RuntimeError, match="on_train_start"):
        method.after_backward(model, 1)


def adalora_pair(total_step=30, tinit=5, tfinal=5, deltaT=1, orth_reg_weight=0.5, seed=0):
    """(base, peft model, our model, our method) with identical, non-identity adapters."""
    base = tiny_llama()
    method = make("adalora", init_r=4, target_r=2, alpha=8, targets=OUR_TARGETS, tinit=tinit, tfinal=tfinal,
                  deltaT=deltaT, orth_reg_weight=orth_reg_weight)
    ref = peft_model(method, base, total_steps=total_step)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # peft's init has Λ = 0 (identity): make every factor non-trivial
        for n, p in ref.named_parameters():
            if "lora_E" in n:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
            elif "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    ours = method.apply(copy.deepcopy(base)).eval()
    copy_adapter_weights(ours, method, ref)
    return base, ref, ours, method


@requires_peft
def test_adalora_equals_peft_forward_input_grad_and_count():
    base, ref, ours, method = adalora_pair()
    trainable = count(method.trainable_parameters(ours))
    assert trainable == n_trainable_peft(ref) == method.expected_trainable(ours)
    assert trainable == sum(4 * (o + i + 1) for o, i in [(32, 32), (16, 32), (32, 64)] * 2)

    def peft_scaling(model):  # peft divides by (init_r + 1e-5), we by init_r: a 2.5e-6 relative gap
        for layer in method.layers(model).values():
            layer.scaling = 8 / (4 + 1e-5)

    assert_matches_peft(ours, ref, base, peft_scaling)


@requires_peft
def test_adalora_orthogonality_regularizer_equals_peft():
    base, ref, ours, method = adalora_pair(orth_reg_weight=0.3)
    tokens = ids(3)
    with torch.no_grad():  # peft adds the regularizer inside forward when labels are given
        with_reg = ref.base_model(input_ids=tokens, labels=tokens).loss  # AdaLoraModel.forward
        without = ref.base_model.model(input_ids=tokens, labels=tokens).loss
    ours_reg = method.extra_loss(ours)
    assert ours_reg.requires_grad and ours_reg.item() > 0.1
    # peft's value is a difference of two fp32 losses of size ~6: rounding up to ~1e-6
    torch.testing.assert_close(ours_reg.detach(), with_reg - without, atol=2e-6, rtol=0)
    assert make("adalora", orth_reg_weight=0.0).extra_loss(ours) is None


@requires_peft
def test_adalora_budget_schedule_equals_peft():
    _, ref, ours, method = adalora_pair(total_step=40, tinit=6, tfinal=7, deltaT=3)
    allocator = ref.base_model.rankallocator
    init_budget, target_budget = method.budgets(ours)
    assert (init_budget, target_budget) == (allocator.init_bgt, allocator.target_bgt) == (24, 12)
    for step in range(0, 45):
        assert budget_schedule(step, 40, 6, 7, 3, init_budget, target_budget) == allocator.budget_schedule(step)


@requires_peft
@pytest.mark.parametrize("deltaT", [1, 3])
def test_adalora_rank_allocator_equals_peft_step_by_step(deltaT):
    """Same fake gradients and the same simulated updates into both; compare EMAs, Λ and masks."""
    total, tinit, tfinal = 30, 5, 5
    _, ref, ours, method = adalora_pair(total_step=total, tinit=tinit, tfinal=tfinal, deltaT=deltaT)
    ref_params = dict(ref.base_model.model.named_parameters())
    allocator = ref.base_model.rankallocator
    layers = method.layers(ours)
    method.on_train_start(ours, total)
    generator = torch.Generator().manual_seed(11)
    pairs = [(f"{name}.{role}", f"{name}.{ADALORA_ROLES[role]}", p)
             for name, layer in layers.items() for role, p in layer.adapter_parameters().items()]
    budgets_seen = set()
    for step in range(1, total + 1):
        for _, peft_key, p in pairs:
            grad = torch.randn(ref_params[peft_key].shape, generator=generator)
            ref_params[peft_key].grad, p.grad = grad.clone(), grad.reshape(p.shape).clone()
        ref.base_model.update_and_allocate(step)
        method.after_backward(ours, step)

        for key, peft_key, p in pairs:
            torch.testing.assert_close(p.detach(), ref_params[peft_key].detach().reshape(p.shape), atol=0, rtol=0)
            if peft_key not in allocator.exp_avg_ipt:  # both reset after the final allocation
                assert step >= total - tfinal and not method.allocator.sensitivity
                continue
            for ours_ema, peft_ema in [(method.allocator.sensitivity, allocator.exp_avg_ipt),
                                       (method.allocator.uncertainty, allocator.exp_avg_unc)]:
                torch.testing.assert_close(ours_ema[key], peft_ema[peft_key].reshape(p.shape), atol=1e-9, rtol=1e-6)
        rank_pattern = ref.peft_config["default"].rank_pattern
        if rank_pattern:
            for name, layer in layers.items():
                assert layer.rank_mask.tolist() == rank_pattern[f"{name}.lora_E.default"], (step, name)
        budgets_seen.add(sum(layer.rank for layer in layers.values()))

        with torch.no_grad():  # an optimizer step, identical in both (it can revive masked λ)
            for _, peft_key, p in pairs:
                update = torch.randn(ref_params[peft_key].shape, generator=generator) * 0.05
                ref_params[peft_key].add_(update)
                p.add_(update.reshape(p.shape))

    assert max(budgets_seen) == 24 and min(budgets_seen) == 12 and len(budgets_seen) > 3
    summary = method.summary(ours)
    assert summary["total_rank"] == summary["target_budget"] == 12
    assert summary["ranks"] == {n: sum(rank_pattern[f"{n}.lora_E.default"]) for n in layers}


def adalora_train(model, method, steps, tokens, lr=1e-2):
    """peftlab.training.trainer's order and step numbers (0 .. steps-1): loss + extra_loss, backward,
    after_backward, optimizer step."""
    optimizer = torch.optim.AdamW(list(method.trainable_parameters(model).values()), lr=lr)
    method.on_train_start(model, steps)
    model.train()
    for step in range(steps):
        logits = model(input_ids=tokens).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        (loss + method.extra_loss(model)).backward()
        method.after_backward(model, step)
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_adalora_first_allocation_without_importance_prunes_nothing():
    model = tiny_llama()
    method = make("adalora", init_r=4, target_r=2, targets=OUR_TARGETS, tinit=0)
    method.apply(model)
    method.on_train_start(model, 20)
    tokens = ids(5)
    loss = model(input_ids=tokens).logits.pow(2).mean()
    loss.backward()  # Λ = 0: P and Q get no gradient, every sensitivity is 0
    method.after_backward(model, 1)
    assert budget_schedule(1, 20, 0, 0, 1, 24, 12) == (22, True)  # a masking step that wants to prune 2
    assert all(layer.rank == 4 for layer in method.layers(model).values())


def test_adalora_training_reaches_target_budget_and_mask_holds(tmp_path):
    model = tiny_llama()
    method = make("adalora", init_r=4, target_r=2, targets=OUR_TARGETS, tinit=2, tfinal=3, deltaT=1)
    method.apply(model)
    tokens = ids(6, (4, 12))
    adalora_train(model, method, 12, tokens)
    summary = method.summary(model)
    assert summary["total_rank"] == summary["target_budget"] == 12
    assert summary["total_steps"] == 12 and set(summary["ranks"]) == set(method.layers(model))
    for layer in method.layers(model).values():
        assert torch.linalg.matrix_rank(layer.delta_weight()).item() == layer.rank
        b, a = layer.factors()
        torch.testing.assert_close(b @ a, layer.delta_weight())

    # a masked triplet stays out of the model whatever its raw λ holds
    masked = [layer for layer in method.layers(model).values() if layer.rank < layer.r]
    assert masked
    with torch.no_grad():
        before = model(input_ids=tokens).logits
        for layer in masked:
            layer.lora_E[~layer.rank_mask] = 5.0
        torch.testing.assert_close(model(input_ids=tokens).logits, before, atol=0, rtol=0)

    # the adapter file carries the masks: a fresh model reproduces the outputs
    save_file(method.state_dict(model), tmp_path / "adapter.safetensors")
    fresh_method = make("adalora", init_r=4, target_r=2, targets=OUR_TARGETS)
    fresh = fresh_method.apply(tiny_llama())
    fresh_method.load_state_dict(fresh, load_file(tmp_path / "adapter.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=tokens).logits, before, atol=0, rtol=0)
    assert fresh_method.summary(fresh)["ranks"] == summary["ranks"]


def test_adalora_on_gpt2_conv1d_bases():
    assert_supports_conv1d_bases("adalora", init_r=4, target_r=2)
