"""Prefix tuning: parity with peft on tiny Llama, BERT and GPT-2, the prefix inside BERT's
attention computed by hand, masks, collapse and saving, bad input.

Parity (peft mapping: tests/peft_reference.py): peft's random prefix (MLP encoder or plain P)
copied into ours; logits and input gradients within 1e-5 on a right-padded batch, trainable
counts equal (peft's SEQ_CLS classifier left out: peftlab's trainer owns the head). On BERT,
peft 0.21 + transformers 5.24 cannot run its own prefix forward without
``peft_reference.restore_prefix_forward`` (see there); the hand-computed attention check needs
no peft at all.
"""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY, batch, logits, make, requires_peft, tiny_bert, tiny_llama
from peft_reference import (TASK_TYPES, compare_forward_and_input_grad, compare_with_mask, copy_from_peft,
                            n_trainable_peft, peft_model, peft_trainable_without_head, restore_prefix_forward)
from peftlab.errors import ConfigError
from peftlab.methods.base import count


@torch.no_grad()
def perturb(method, model, scale: float = 0.1, seed: int = 7):
    generator = torch.Generator().manual_seed(seed)
    for p in method.trainable_parameters(model).values():
        p.add_(torch.randn(p.shape, generator=generator) * scale)


def peft_prefix_pair(family: str, projection: bool, n: int = 5):
    """(base, peft model, our method, our model) with peft's random prefix copied into ours."""
    base = TINY[family]()
    method = make("prefix", num_virtual_tokens=n, prefix_projection=projection)
    ref = restore_prefix_forward(peft_model(method, base, TASK_TYPES[family]))
    ours = method.apply(copy.deepcopy(base)).eval()
    copy_from_peft(method, ours, ref)
    return base, ref, method, ours


@requires_peft
@pytest.mark.parametrize("projection", [True, False], ids=["mlp", "plain"])
def test_prefix_equals_peft_on_llama(projection):
    base, ref, method, ours = peft_prefix_pair("llama", projection)
    assert count(method.trainable_parameters(ours)) == method.expected_trainable(ours) == n_trainable_peft(ref)
    compare_forward_and_input_grad(ours, ref, base)  # the shared parity check (no mask)
    compare_with_mask(ours, ref, batch(seed=11))
    torch.testing.assert_close(logits(ours, batch()), logits(ref, batch()), atol=1e-5, rtol=0)  # input_ids path


@requires_peft
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_prefix_equals_peft_on_bert_and_gpt2(family):
    base, ref, method, ours = peft_prefix_pair(family, projection=True)
    assert method.expected_trainable(ours) == peft_trainable_without_head(ref)
    compare_with_mask(ours, ref, batch(seed=11), token_types=family == "bert")
    out = logits(ours, batch())
    assert out.shape == ((2, 2) if family == "bert" else (2, 9, 128))
    torch.testing.assert_close(out, logits(ref, batch()), atol=1e-5, rtol=0)  # input_ids path
    assert out.sub(logits(base, batch())).abs().max() > 1e-3


@pytest.mark.parametrize("projection", [True, False], ids=["mlp", "plain"])
def test_prefix_on_bert_is_attention_over_the_prefix_keys_and_values(projection):
    """Independently of peft and of transformers' cache and masks: in every BERT layer, self-attention
    over the T real tokens equals softmax(q [P_k; k]ᵀ / √d + padding mask) [P_v; v], formed here from
    the layer's input and P, and the real tokens sit at positions n .. n+T-1 of the position table."""
    n = 4
    method = make("prefix", num_virtual_tokens=n, prefix_projection=projection)
    model = method.apply(tiny_bert())
    inputs = batch()
    attentions = [layer.attention.self for layer in model.bert.encoder.layer]
    seen = {}
    hooks = [a.register_forward_hook(lambda module, args, out: seen.setdefault(module, (args[0], out[0])))
             for a in attentions]
    logits(model, inputs)
    for hook in hooks:
        hook.remove()
    prefix = method.encoder(model)().detach()  # (L, 2, n, k)
    heads = model.config.num_attention_heads
    keep = torch.cat([torch.ones(2, n, dtype=torch.bool), inputs["attention_mask"].bool()], dim=1)  # (B, n+T)
    for index, attention in enumerate(attentions):
        hidden, out = seen[attention]
        batch_size, length, width = hidden.shape
        d = width // heads

        def split(x):  # (B, S, heads·d) -> (B, heads, S, d)
            return x.view(x.shape[0], -1, heads, d).transpose(1, 2)

        with torch.no_grad():
            q = split(attention.query(hidden))
            k = torch.cat([split(prefix[index, 0].expand(batch_size, -1, -1)), split(attention.key(hidden))], dim=2)
            v = torch.cat([split(prefix[index, 1].expand(batch_size, -1, -1)), split(attention.value(hidden))], dim=2)
            scores = (q @ k.transpose(-1, -2) / d ** 0.5).masked_fill(~keep[:, None, None, :], float("-inf"))
            expected = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch_size, length, width)
        assert k.shape[2] == n + length
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        positions = torch.arange(n, n + inputs["input_ids"].shape[1]).expand(2, -1)
        embedded = model.bert.embeddings(input_ids=inputs["input_ids"], position_ids=positions)
    torch.testing.assert_close(seen[attentions[0]][0], embedded, atol=1e-6, rtol=0)
    assert logits(model, inputs).sub(logits(tiny_bert(), inputs)).abs().max() > 1e-3  # the prefix acts


def test_prefix_mask_hides_padding():
    method = make("prefix", num_virtual_tokens=4)
    model = method.apply(tiny_llama())
    padded = batch(padded=True)
    alone = {k: v[1:, :6] for k, v in padded.items()}  # the padded row without its 3 pad tokens
    torch.testing.assert_close(logits(model, padded)[1, :6], logits(model, alone)[0], atol=1e-5, rtol=0)
    with torch.no_grad():  # positional arguments reach the hook too
        positional = model(padded["input_ids"], padded["attention_mask"]).logits
    torch.testing.assert_close(positional, logits(model, padded), atol=0, rtol=0)


def test_prefix_collapse_and_round_trip(tmp_path):
    method = make("prefix", num_virtual_tokens=4)
    model = method.apply(tiny_bert())
    perturb(method, model)
    inputs = batch()
    expected = logits(model, inputs)
    state = method.state_dict(model)
    assert list(state) == ["prefix_encoder.prefix"] and state["prefix_encoder.prefix"].shape == (2, 2, 4, 32)
    save_file(state, tmp_path / "adapter.safetensors")
    fresh_method = make("prefix", num_virtual_tokens=4)
    fresh = fresh_method.apply(tiny_bert())
    fresh_method.load_state_dict(fresh, load_file(tmp_path / "adapter.safetensors"))
    assert not fresh.prefix_encoder.projection
    assert count(fresh_method.trainable_parameters(fresh)) == fresh_method.expected_trainable(fresh) == 2 * 2 * 4 * 32
    torch.testing.assert_close(logits(fresh, inputs), expected, atol=0, rtol=0)
    method.collapse(model)
    assert sorted(method.trainable_parameters(model)) == ["prefix_encoder.prefix"]
    torch.testing.assert_close(logits(model, inputs), expected, atol=0, rtol=0)


@pytest.mark.parametrize("config,key", [
    ({"num_virtual_tokens": 0}, "method.num_virtual_tokens"),
    ({"encoder_hidden_size": 0}, "method.encoder_hidden_size"),
])
def test_prefix_bad_config(config, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        make("prefix", **config)


def test_gradient_checkpointing_drops_the_prefix_so_the_trainer_refuses_it(tmp_path):
    """Why prefix tuning declares a checkpointing conflict: under checkpointing transformers' layers set
    the cache aside, so on BERT the output no longer depends on the prefix, and on Llama the
    prefix-lengthened mask no longer fits the keys. peftlab train stops before any evaluation."""
    from conftest import tiny_bert, tiny_llama
    from peftlab.methods import METHODS

    ids, mask = torch.randint(0, 128, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    bert = tiny_bert(0)
    method = METHODS["prefix"](METHODS["prefix"].config_class(num_virtual_tokens=4, prefix_projection=False))
    method.apply(bert)
    with_prefix = bert(input_ids=ids, attention_mask=mask).logits.detach()
    bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    bert.train()  # checkpointing acts in training, with gradients on
    for module in bert.modules():  # dropout off: the same forward, checkpointed
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    checkpointed = bert(input_ids=ids, attention_mask=mask).logits.detach()
    method.encoder(bert).prefix.data.mul_(5.0)
    moved = bert(input_ids=ids, attention_mask=mask).logits.detach()
    assert not torch.allclose(checkpointed, with_prefix, atol=1e-4)  # the prefix is gone ...
    torch.testing.assert_close(moved, checkpointed)                  # ... and changing it changes nothing
    llama = tiny_llama(0).train()
    METHODS["prefix"](METHODS["prefix"].config_class(num_virtual_tokens=4)).apply(llama)
    llama.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(RuntimeError):
        llama(input_ids=ids, attention_mask=mask)

    from peftlab.cli import main

    assert METHODS["prefix"].checkpointing_conflict
    code = main(["train", "model=minilm", "method=prefix", "trainer.gradient_checkpointing=true",
                 "trainer.max_steps=1", f"hydra.run.dir={tmp_path}", "trainer.progress=false"])
    import json

    result = json.loads((tmp_path / "result.json").read_text())
    assert code == 2 and result["status"] == "failed" and "trainer.gradient_checkpointing" in result["reason"]
    assert not (result.get("metrics") or {}).get("before")  # refused before the base was evaluated
