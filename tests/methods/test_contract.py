"""Every registered method passes the same checks (methods join automatically).

- the adapted model equals the base at init (where the method defines an identity init)
- only the method's own parameters (and nothing of the frozen base) change in training
- the trainable count equals the method's closed form
- weight-space layers: forward == F.linear(x, W0 + delta_weight()); merged == unmerged;
  unmerge() restores W0 bit for bit; merging twice changes nothing
- the adapter's state dict round-trips through safetensors to identical outputs
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import TINY
from peftlab.methods import METHODS
from peftlab.methods.base import WeightDeltaLayer, base_weight, count

# Which tiny model each method is checked on (default: llama) and config overrides.
MODEL_FOR = {"bitfit": "bert"}
CONFIG_FOR: dict[str, dict] = {
    "vera": {"r": 8},  # paper r=256 exceeds the tiny model's 16-wide v projection
    # paper r=64 exceeds the tiny model's 16-wide k/v; fp32 compute so forward == F.linear(x, dequant(W0) + ΔW) exactly
    "qlora": {"r": 8, "compute_dtype": "float32"},
}


def build(name: str, seed: int = 0):
    model = TINY[MODEL_FOR.get(name, "llama")](seed)
    method_cls = METHODS[name]
    method = method_cls(method_cls.config_class(**CONFIG_FOR.get(name, {})))
    return model, method


def inputs(model):
    torch.manual_seed(123)
    return {"input_ids": torch.randint(0, 128, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@torch.no_grad()
def perturb(method, model, scale: float = 0.1, seed: int = 7):
    """A non-identity state, so merge / delta tests can fail."""
    generator = torch.Generator().manual_seed(seed)
    for p in method.trainable_parameters(model).values():
        p.add_(torch.randn(p.shape, generator=generator) * scale)


ALL = sorted(METHODS)
WEIGHT_LAYER_METHODS = [n for n in ALL if METHODS[n].layer_class is not None
                        and issubclass(METHODS[n].layer_class, WeightDeltaLayer)]


@pytest.mark.parametrize("name", [n for n in ALL if METHODS[n].identity_at_init])
def test_identity_at_init(name):
    model, method = build(name)
    batch = inputs(model)
    before = logits(model, batch)
    method.apply(model)
    torch.testing.assert_close(logits(model, batch), before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_trainable_count_is_closed_form(name):
    model, method = build(name)
    method.apply(model)
    own = method.trainable_parameters(model)
    assert count(own) == method.expected_trainable(model) > 0
    requires_grad = {id(p) for p in model.parameters() if p.requires_grad}
    assert requires_grad == {id(p) for p in own.values()}


@pytest.mark.parametrize("name", ALL)
def test_only_method_parameters_change(name):
    model, method = build(name)
    method.apply(model)
    model.train()
    own = {id(p) for p in method.trainable_parameters(model).values()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = inputs(model)
    for _ in range(3):
        out = model(**batch)
        loss = out.logits.float().pow(2).mean()
        extra = method.extra_loss(model)
        (loss + (extra if extra is not None else 0)).backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    params = dict(model.named_parameters())
    assert changed, "nothing trained"
    assert all(id(params[n]) in own for n in changed), sorted(n for n in changed if id(params[n]) not in own)[:5]


@pytest.mark.parametrize("name", WEIGHT_LAYER_METHODS)
def test_forward_equals_linear_with_delta_weight(name):
    model, method = build(name)
    method.apply(model)
    perturb(method, model)
    layers = method.layers(model)
    assert layers
    torch.manual_seed(0)
    for layer in layers.values():
        out_features, in_features = layer.shape
        x = torch.randn(3, 5, in_features)
        w = base_weight(layer.base) + layer.delta_weight()
        assert layer.delta_weight().shape == (out_features, in_features)
        assert layer.delta_weight().abs().max() > 0
        torch.testing.assert_close(layer(x), F.linear(x, w, layer.base.bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in ALL if METHODS[n].mergeable])
def test_merge_matches_unmerged_and_unmerge_restores_exactly(name):
    model, method = build(name)
    method.apply(model)
    perturb(method, model)
    batch = inputs(model)
    w0 = {n: layer.base.weight.detach().clone() for n, layer in method.layers(model).items()}
    unmerged = logits(model, batch)
    method.merge(model)
    merged = logits(model, batch)
    method.merge(model)  # a second call is a no-op
    torch.testing.assert_close(logits(model, batch), merged, atol=0, rtol=0)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(layer.base.weight, w0[n]) for n, layer in method.layers(model).items())
    model.eval()  # eval() must not merge or unmerge anything
    assert all(layer.merged for layer in method.layers(model).values())
    method.unmerge(model)
    method.unmerge(model)
    for n, layer in method.layers(model).items():
        assert torch.equal(layer.base.weight, w0[n])
    torch.testing.assert_close(logits(model, batch), unmerged, atol=0, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_adapter_round_trip(name, tmp_path):
    model, method = build(name)
    method.apply(model)
    perturb(method, model)
    batch = inputs(model)
    expected = logits(model, batch)
    save_file(method.state_dict(model), tmp_path / "adapter.safetensors")

    fresh, fresh_method = build(name)  # same base weights (same seed), fresh adapter
    fresh_method.apply(fresh)
    assert not torch.allclose(logits(fresh, batch), expected)
    fresh_method.load_state_dict(fresh, load_file(tmp_path / "adapter.safetensors"))
    torch.testing.assert_close(logits(fresh, batch), expected, atol=0, rtol=0)


@pytest.mark.parametrize("name", WEIGHT_LAYER_METHODS)
def test_forward_is_base_plus_branch_while_unmerged(name):
    """``branch(x)`` is the update's contribution: forward (fused or not) == base(x) + branch(x)."""
    model, method = build(name)
    method.apply(model)
    perturb(method, model)
    torch.manual_seed(1)
    for layer in method.layers(model).values():
        x = torch.randn(2, 4, layer.shape[1])
        branch = layer.branch(x)
        assert branch.abs().max() > 0
        torch.testing.assert_close(layer(x), layer.base(x) + branch, atol=1e-6, rtol=1e-6)


# A size no tiny model can hold, or another input that cannot fit, per method; every method with a
# size_key gets the huge size automatically, so a newly registered method is checked too.
IMPOSSIBLE: dict[str, tuple[str, dict]] = {  # name -> (tiny model, config overrides)
    "ia3": ("llama", {"targets": ["nothing_is_called_this"], "feedforward": []}),
    "bitfit": ("llama", {}),                            # Llama has no biases
    "lokr": ("llama", {"decompose_factor": 7}),         # any r fits (full factors); 7 divides no width
    "prefix": ("bert", {"num_virtual_tokens": 10**6}),  # BERT's position table is 512 long
    "prompt": ("bert", {"num_virtual_tokens": 10**6}),
}
NO_IMPOSSIBLE_INPUT = {"full"}  # trains every weight of whatever model it gets: nothing to refuse


def impossible(name: str):
    cls = METHODS[name]
    if name in IMPOSSIBLE:
        kind, overrides = IMPOSSIBLE[name]
        return TINY[kind](0), cls(cls.config_class(**{**CONFIG_FOR.get(name, {}), **overrides}))
    model, method = build(name)
    return model, method.resized(10**6)


def snapshot(model):
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})


@pytest.mark.parametrize("name", [n for n in ALL if n not in NO_IMPOSSIBLE_INPUT])
def test_check_refuses_what_apply_would_refuse_without_touching_the_model(name):
    """The trainer calls check() before it evaluates the base: whatever apply() refuses, check()
    refuses first, with the same key, and the model is left exactly as it was."""
    from peftlab.errors import ConfigError

    model, method = impossible(name)
    modules, params = snapshot(model)
    with pytest.raises(ConfigError) as checked:
        method.check(model)
    after_modules, after_params = snapshot(model)
    assert after_modules == modules
    assert all(torch.equal(t, params[n][0]) and grad == params[n][1] for n, (t, grad) in after_params.items())
    with pytest.raises(ConfigError) as applied:
        method.apply(model)
    assert applied.value.key == checked.value.key


def test_every_registered_method_is_checked_for_an_impossible_input():
    unsized = [n for n in ALL if METHODS[n].size_key is None and n not in IMPOSSIBLE and n not in NO_IMPOSSIBLE_INPUT]
    assert not unsized, f"{unsized}: no size_key and no impossible input in IMPOSSIBLE"
