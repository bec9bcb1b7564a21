"""VeRA: parity with peft (the same shared projections, bit for bit), saving and loading, bad input.

peft is the independent reference (a test dependency only; mapping in
tests/peft_reference.py): same base weights, peft's non-identity init copied
into ours, outputs and input gradients within 1e-5 in fp32, trainable counts equal.
"""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make, perturb, requires_peft, tiny_llama
from peft_reference import compare_forward_and_input_grad, copy_adapter_weights, n_trainable_peft, peft_model
from peftlab.errors import ConfigError
from peftlab.methods.base import count
from peftlab.methods.vera import SEED_KEY, VeRALayer


@requires_peft
@pytest.mark.parametrize("seed", [0, 7])
def test_vera_equals_peft_with_the_same_projections(seed):
    base = tiny_llama()
    method = make("vera", r=4, targets=["q", "v", "down"], projection_prng_key=seed)
    ref = peft_model(method, base, init_weights=False)
    ours = method.apply(copy.deepcopy(base)).eval()
    # Same seed, same recipe, same draw order: the shared matrices are peft's, bit for bit (nothing copied).
    projections = method.projections(ours)
    assert torch.equal(projections.A, ref.base_model.vera_A["default"])  # (r, in_max) = (4, 64)
    assert torch.equal(projections.B, ref.base_model.vera_B["default"])  # (out_max, r) = (32, 4)
    copy_adapter_weights(ours, method, ref)
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
