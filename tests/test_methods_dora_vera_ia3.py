"""DoRA, VeRA, (IA)³ and LoRA+: parity with peft, bad input, and what is particular to each.

peft 0.21 is the independent reference (a test dependency only): same base
weights, peft's non-identity adapter init copied into ours, outputs and input
gradients within 1e-5 in fp32, trainable counts equal. DoRA's gradients are
compared to 1e-5 of their scale in fp32 (see the test) and to 1e-10 in fp64.
LoRA+ has no peft model to compare with: its test is the optimizer step itself.
"""
from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import tiny_bert, tiny_gpt2, tiny_llama
from peftlab.errors import ConfigError
from peftlab.methods import METHODS
from peftlab.methods.base import base_weight, count
from peftlab.methods.dora import DoRALayer
from peftlab.methods.vera import SEED_KEY, VeRALayer
from test_peft_parity import compare_forward_and_input_grad, copy_adapter_weights

TARGETS = ["q_proj", "v_proj", "down_proj"]  # peft names of our ["q", "v", "down"] on Llama


def make(name: str, **config):
    cls = METHODS[name]
    return cls(cls.config_class(**config))


def n_trainable_peft(ref) -> int:
    return ref.get_nb_trainable_parameters()[0]


@torch.no_grad()
def perturb(params, scale: float = 0.1, seed: int = 7):
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=generator) * scale)


def layer_input(layer, seed: int = 0):
    torch.manual_seed(seed)
    return torch.randn(2, 5, layer.shape[1])


# --------------------------------------------------------------------------- #
# DoRA
# --------------------------------------------------------------------------- #
DORA_NAMES = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
              "magnitude": "lora_magnitude_vector.default.weight"}


def dora_pair(base, dropout: float = 0.0):
    ref = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True,
                        init_lora_weights=False, lora_dropout=dropout),
    ).eval()
    # peft sets m = ‖W0 + sBA‖ (so W' = W0 + sBA): move m off it by ~10% so m/‖·‖ ≠ 1 is exercised too
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=generator))
    method = make("dora", r=4, alpha=8, targets=["q", "v", "down"], dropout=dropout)
    ours = method.apply(copy.deepcopy(base), None).eval()
    copy_adapter_weights(ours, method, ref, DORA_NAMES)
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


# --------------------------------------------------------------------------- #
# VeRA
# --------------------------------------------------------------------------- #
VERA_NAMES = {"lambda_b": "vera_lambda_b.default", "lambda_d": "vera_lambda_d.default"}


@pytest.mark.parametrize("seed", [0, 7])
def test_vera_equals_peft_with_the_same_projections(seed):
    base = tiny_llama()
    ref = peft.get_peft_model(
        copy.deepcopy(base),
        peft.VeraConfig(r=4, target_modules=TARGETS, init_weights=False, projection_prng_key=seed),
    ).eval()
    method = make("vera", r=4, targets=["q", "v", "down"], projection_prng_key=seed)
    ours = method.apply(copy.deepcopy(base)).eval()
    # Same seed, same recipe, same draw order: the shared matrices are peft's, bit for bit (nothing copied).
    projections = method.projections(ours)
    assert torch.equal(projections.A, ref.base_model.vera_A["default"])  # (r, in_max) = (4, 64)
    assert torch.equal(projections.B, ref.base_model.vera_B["default"])  # (out_max, r) = (32, 4)
    copy_adapter_weights(ours, method, ref, VERA_NAMES)
    assert count(method.trainable_parameters(ours)) == n_trainable_peft(ref) == method.expected_trainable(ours)
    compare_forward_and_input_grad(ours, ref, base)


def test_vera_projections_are_shared_frozen_and_not_saved():
    method = make("vera", r=4, targets=["q", "v", "down"])
    model = method.apply(tiny_llama())
    layers = list(method.layers(model).values())
    assert len(layers) == 6
    assert len({id(layer.projections) for layer in layers}) == 1  # one A, one B for the whole model
    assert tuple(layers[0].projections.A.shape) == (4, 64) and tuple(layers[0].projections.B.shape) == (32, 4)
    shared = (layers[0].projections.A, layers[0].projections.B)
    assert not any(t.requires_grad for t in shared)  # frozen buffers, not parameters
    assert {id(t) for t in shared}.isdisjoint(id(p) for p in model.parameters())
    state = method.state_dict(model)
    assert int(state[SEED_KEY]) == 0
    assert max(t.numel() for t in state.values()) <= 32  # b (≤ 32), d (4), seed, shape, fingerprint: no A, B
    assert method.summary(model)["projection_shape"] == [4, 64, 32]
    for layer in layers:  # ΔW = diag(b) B diag(d) A from the top-left slice of the shared pair
        perturb(layer.adapter_parameters().values())
        out_f, in_f = layer.shape
        a, b = layer.projections.A[:, :in_f], layer.projections.B[:out_f]
        expected = torch.diag(layer.lambda_b) @ b @ torch.diag(layer.lambda_d) @ a
        torch.testing.assert_close(layer.delta_weight(), expected.detach(), atol=1e-6, rtol=0)


def saved_vera(tmp_path, **config):
    method = make("vera", **{"r": 4, "targets": ["q", "v"], **config})
    model = method.apply(tiny_llama())
    perturb(method.trainable_parameters(model).values())
    save_file(method.state_dict(model), tmp_path / "adapter.safetensors")
    return load_file(tmp_path / "adapter.safetensors")


@pytest.mark.parametrize("config,key", [
    ({"projection_prng_key": 1}, "method.projection_prng_key"),  # other random matrices
    ({"r": 8}, "method.r"),                                       # other rank
    ({"targets": ["q", "v", "down"]}, "method.r"),               # in_max 64 instead of 32: other slices
])
def test_vera_load_refuses_an_adapter_from_other_projections(tmp_path, config, key):
    state = saved_vera(tmp_path)
    method = make("vera", **{"r": 4, "targets": ["q", "v"], **config})
    model = method.apply(tiny_llama())
    before = {n: p.clone() for n, p in method.trainable_parameters(model).items()}
    with pytest.raises(ConfigError) as err:
        method.load_state_dict(model, state)
    assert err.value.key == key and "\n" not in str(err.value) and "allowed:" in str(err.value)
    assert all(torch.equal(p, before[n]) for n, p in method.trainable_parameters(model).items())


def test_vera_load_refuses_a_changed_generator_and_a_foreign_adapter(tmp_path):
    state = saved_vera(tmp_path)
    method = make("vera", r=4, targets=["q", "v"])
    model = method.apply(tiny_llama())
    tampered = {**state, "vera_projection_fingerprint": state["vera_projection_fingerprint"] * 1.01}
    with pytest.raises(ConfigError, match="other random projections"):
        method.load_state_dict(model, tampered)
    with pytest.raises(ConfigError, match="not a VeRA adapter"):
        method.load_state_dict(model, {k: v for k, v in state.items() if k != SEED_KEY})
    method.load_state_dict(model, state)  # the untouched file loads


@pytest.mark.parametrize("config,key", [
    ({"d_initial": 0.0}, "method.d_initial"),
    ({"r": 0}, "method.r"),
    ({"projection_prng_key": -1}, "method.projection_prng_key"),
    ({"dropout": 1.0}, "method.dropout"),
])
def test_vera_bad_config(config, key):
    with pytest.raises(ConfigError) as err:
        make("vera", **config)
    assert err.value.key == key


def test_vera_rank_above_a_target_dimension_fails_before_any_change():
    model = tiny_llama()
    method = make("vera", r=20, targets=["q", "v"])  # v is 16 × 32
    with pytest.raises(ConfigError, match=r"^method\.r: got 20; allowed: an integer in \[1, 16\]"):
        method.apply(model)
    assert not any(isinstance(m, VeRALayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------- #
# (IA)³
# --------------------------------------------------------------------------- #
def test_ia3_equals_peft():
    base = tiny_llama()
    ref = peft.get_peft_model(
        copy.deepcopy(base),
        peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                       init_ia3_weights=False),  # l ~ N(0, 1): far from identity
    ).eval()
    method = make("ia3")  # defaults: k, v, down with down on the input side
    ours = method.apply(copy.deepcopy(base)).eval()
    copy_adapter_weights(ours, method, ref, {"scale": "ia3_l.default"})
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


# --------------------------------------------------------------------------- #
# LoRA+
# --------------------------------------------------------------------------- #
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
