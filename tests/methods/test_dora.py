"""DoRA: parity with peft, bad input, and what is particular to it.

peft is the independent reference (a test dependency only; mapping in
tests/peft_reference.py): same base weights, peft's non-identity adapter init
copied into ours, outputs within 1e-5 in fp32, trainable counts equal. Gradients
are compared to 1e-5 of their scale in fp32 (see the test) and to 1e-10 in fp64.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import layer_input, make, perturb, requires_peft, tiny_bert, tiny_gpt2, tiny_llama
from peft_reference import ADAPTER_NAMES, copy_adapter_weights, n_trainable_peft, peft_model
from peftlab.errors import ConfigError
from peftlab.methods.base import base_weight, count
from peftlab.methods.dora import DoRALayer

DORA_NAMES = ADAPTER_NAMES["dora"]  # role -> peft's parameter name


def dora_pair(base, dropout: float = 0.0):
    method = make("dora", r=4, alpha=8, targets=["q", "v", "down"], dropout=dropout)
    ref = peft_model(method, base, init_lora_weights=False)
    # peft sets m = ‖W0 + sBA‖ (so W' = W0 + sBA): move m off it by ~10% so m/‖·‖ ≠ 1 is exercised too
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=generator))
    ours = method.apply(copy.deepcopy(base), None).eval()
    copy_adapter_weights(ours, method, ref)
    return ours, method, ref


def forward_backward(model, dtype, param_names, ids):
    """Logits, input gradient and the named parameters' gradients of a dtype copy of ``model``."""
    model = copy.deepcopy(model).to(dtype)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    grad_out = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    logits.backward(grad_out.to(dtype))
    params = dict(model.named_parameters())
    return [logits.detach(), embeds.grad] + [params[n].grad for n in param_names]


@requires_peft
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dora_equals_peft_outputs_input_and_parameter_gradients(dtype):
    base = tiny_llama()
    ours, method, ref = dora_pair(base)
    assert count(method.trainable_parameters(ours)) == n_trainable_peft(ref) == method.expected_trainable(ours)
    names = [(f"{module}.{role}", f"base_model.model.{module}.{DORA_NAMES[role]}")
             for module, layer in method.layers(ours).items() for role in layer.adapter_parameters()]
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    mine = forward_backward(ours, dtype, [n for n, _ in names], ids)
    theirs = forward_backward(ref, dtype, [n for _, n in names], ids)
    with torch.no_grad():  # the adapter really changes the output, so agreement means something
        assert (mine[0].float() - base(input_ids=ids).logits).abs().max() > 1e-3
    torch.testing.assert_close(mine[0], theirs[0], atol=1e-5 if dtype == torch.float32 else 1e-10, rtol=0)
    for a, b in zip(mine[1:], theirs[1:]):
        # fp32: gradients here reach |g| ~ 100 and both peft and we are ~3e-5 from the float64 values, so
        # agreement is required to 1e-5 of the gradient's scale (we form the norm by a cheaper formula, so
        # the rounding differs from peft's). fp64: the two implementations agree to 1e-10 absolute.
        atol = 1e-5 * max(1.0, b.abs().max().item()) if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


@requires_peft
def test_dora_equals_peft_in_training_with_dropout():
    """With dropout x' ≠ x: y = W0 x + (m/n − 1) W0 x' + (m/n) sBA x' (peft's definition), same dropout masks."""
    base = tiny_llama()
    ours, _, ref = dora_pair(base, dropout=0.5)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    outputs = []
    for model in (ours.train(), ref.train()):
        torch.manual_seed(5)  # one dropout call per adapted layer, in the same order in both
        outputs.append(model(input_ids=ids).logits)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=0)
    torch.manual_seed(6)
    assert (ours(input_ids=ids).logits - outputs[0]).abs().max() > 1e-3  # dropout is really active


@pytest.mark.parametrize("builder", [tiny_bert, tiny_gpt2])
def test_dora_forward_equals_its_weight_on_biased_and_conv1d_layers(builder):
    method = make("dora", r=4, targets=["q", "down"])
    model = method.apply(builder())
    layers = method.layers(model)
    perturb([layer.base.bias for layer in layers.values()], scale=1.0)  # the tiny models init biases to 0
    perturb(method.trainable_parameters(model).values())
    for layer in layers.values():
        x = layer_input(layer)
        w = base_weight(layer.base) + layer.delta_weight()
        torch.testing.assert_close(layer(x), F.linear(x, w, layer.base.bias), atol=1e-5, rtol=1e-5)


def test_dora_magnitude_starts_at_row_norm_of_w0():
    base = tiny_llama()
    method = make("dora", r=4, targets=["q", "down"])
    model = method.apply(copy.deepcopy(base))
    for name, layer in method.layers(model).items():
        w0 = base.get_submodule(name).weight
        torch.testing.assert_close(layer.magnitude, w0.norm(dim=1), atol=1e-6, rtol=1e-6)
        assert layer.factors() is None  # ΔW = (m/n − 1)W0 + (m/n)sBA is not low rank


def test_dora_norm_formula_equals_norm_of_the_formed_sum():
    """The closed form ‖w‖² + 2<w, sBA> + ‖sBA‖² equals the norm of W0 + sBA, also for a large update."""
    method = make("dora", r=4, alpha=8, targets=["down"])
    model = method.apply(tiny_llama())
    layer = next(iter(method.layers(model).values()))
    for scale in (0.01, 1.0):  # s·BA small, then as large as W0 itself
        perturb([layer.lora_A, layer.lora_B], scale=scale)
        w = base_weight(layer.base) + layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
        torch.testing.assert_close(layer.weight_norm(), w.norm(dim=1), atol=0, rtol=1e-5)


def test_dora_forward_never_forms_an_out_by_in_tensor():
    """Forward and backward work with (out, r) and (r, in) pieces, never W0 + sBA (out, in)."""

    class Shapes(TorchDispatchMode):
        """Shapes of the tensors each op allocates (views of its inputs, such as W0.t(), are not counted)."""

        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    self.seen.add(tuple(t.shape))
            return out

    for detach_norm in (True, False):
        method = make("dora", r=4, targets=["down"], detach_norm=detach_norm)
        model = method.apply(tiny_llama())
        layer = next(iter(method.layers(model).values()))
        perturb(layer.adapter_parameters().values())
        out_in = tuple(layer.shape)  # (32, 64): no other tensor here has this shape
        x = layer_input(layer).requires_grad_(True)
        with Shapes() as shapes:
            layer(x).sum().backward()
        assert out_in not in shapes.seen, (detach_norm, sorted(shapes.seen))
        assert (out_in[0], 4) in shapes.seen  # the W0 Aᵀ product is really computed


def dora_reference(layer, x):
    """W' = m (W0 + sBA) / ‖W0 + sBA‖_row formed explicitly, with the norm's gradient."""
    w = base_weight(layer.base) + layer.scaling * layer.lora_B @ layer.lora_A
    return F.linear(x, layer.magnitude.unsqueeze(1) * w / w.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("detach_norm", [True, False])
def test_dora_detach_norm_flag_controls_the_norm_gradient(detach_norm):
    method = make("dora", r=4, targets=["down"], detach_norm=detach_norm)
    model = method.apply(tiny_llama())
    layer = next(iter(method.layers(model).values()))
    perturb(layer.adapter_parameters().values(), scale=0.3)
    x = layer_input(layer)
    grad_out = torch.randn(2, 5, layer.shape[0])

    layer(x).backward(grad_out)
    ours = {role: p.grad.clone() for role, p in layer.adapter_parameters().items()}
    layer.zero_grad()
    dora_reference(layer, x).backward(grad_out)  # gradient through the norm as well
    full = {role: p.grad.clone() for role, p in layer.adapter_parameters().items()}

    torch.testing.assert_close(ours["magnitude"], full["magnitude"], atol=1e-5, rtol=1e-5)  # m: no norm path
    for role in ("lora_A", "lora_B"):
        if detach_norm:  # the detached norm drops the term through ‖·‖: gradients differ from the full ones
            assert (ours[role] - full[role]).abs().max() > 1e-4
        else:
            torch.testing.assert_close(ours[role], full[role], atol=1e-5, rtol=1e-5)


def test_dora_delta_weight_is_the_same_while_merged():
    method = make("dora", r=4, targets=["q", "v"])
    model = method.apply(tiny_llama())
    perturb(method.trainable_parameters(model).values())
    before = {n: layer.delta_weight() for n, layer in method.layers(model).items()}
    method.merge(model)
    for n, layer in method.layers(model).items():
        torch.testing.assert_close(layer.delta_weight(), before[n], atol=1e-6, rtol=0)


def test_dora_rank_too_large_fails_before_any_change():
    model = tiny_llama()
    method = make("dora", r=20, targets=["q", "v"])  # q is 32 × 32, v 16 × 32
    with pytest.raises(ConfigError, match=r"^method\.r: got 20; allowed: an integer in \[1, 16\]"):
        method.apply(model)
    assert not any(isinstance(m, DoRALayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
