"""Prompt tuning: parity with peft on tiny Llama, BERT and GPT-2, inits, bad input; and the
checks prefix tuning shares with it (``check_servable``, ``check_positions`` in prompt.py).

Parity (peft mapping: tests/peft_reference.py): peft's soft prompt copied into ours; logits for
the original positions and input gradients within 1e-5 on a right-padded batch, trainable
counts equal (peft's SEQ_CLS classifier left out: peftlab's trainer owns the head).
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY, batch, logits, make, requires_peft, tiny_bert, tiny_llama
from peft_reference import (TASK_TYPES, compare_with_mask, copy_from_peft, n_trainable_peft, peft_model,
                            peft_trainable_without_head)
from peftlab.errors import ConfigError
from peftlab.methods.base import count


def peft_prompt_pair(family: str, n: int = 5):
    """(base, peft model, our method, our model) with peft's soft prompt copied into ours."""
    base = TINY[family]()
    method = make("prompt", num_virtual_tokens=n)
    ref = peft_model(method, base, TASK_TYPES[family])
    ours = method.apply(copy.deepcopy(base)).eval()
    copy_from_peft(method, ours, ref)
    return base, ref, method, ours


@requires_peft
def test_prompt_equals_peft_on_llama():
    base, ref, method, ours = peft_prompt_pair("llama")
    assert count(method.trainable_parameters(ours)) == method.expected_trainable(ours) == n_trainable_peft(ref)
    compare_with_mask(ours, ref, batch(seed=11), strip=5)
    inputs = batch()
    out, theirs = logits(ours, inputs), logits(ref, inputs)
    assert out.shape == (2, 9, 128) and theirs.shape == (2, 14, 128)  # the task sees the original positions
    torch.testing.assert_close(out, theirs[:, 5:], atol=1e-5, rtol=0)
    assert out.sub(logits(base, inputs)).abs().max() > 1e-3
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():  # token labels get -100 for the virtual positions, as in peft
        torch.testing.assert_close(ours(**inputs, labels=labels).loss, ref(**inputs, labels=labels).loss, atol=1e-6, rtol=0)


@requires_peft
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_prompt_equals_peft_on_bert_and_gpt2(family):
    base, ref, method, ours = peft_prompt_pair(family)
    assert method.expected_trainable(ours) == peft_trainable_without_head(ref)
    # BERT pools virtual token 0, as peft
    compare_with_mask(ours, ref, batch(seed=11), strip=5, token_types=family == "bert")


def test_prompt_inits(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama()
    table = model.get_input_embeddings().weight.detach().clone()
    vocab = make("prompt", num_virtual_tokens=6, init="vocab").apply(copy.deepcopy(model)).soft_prompt.embedding
    assert all((table == row).all(1).any() for row in vocab)  # every row is a word embedding
    random = make("prompt", num_virtual_tokens=6, init="random").apply(copy.deepcopy(model)).soft_prompt.embedding
    assert random.abs().max() <= 0.5 and not any((table == row).all(1).any() for row in random)
    raw = Tokenizer(models.WordLevel({"great": 7, "movie": 9, "[UNK]": 0}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    text = make("prompt", num_virtual_tokens=5, init="text", init_text="great movie")
    arch = SimpleNamespace(tokenizer=tokenizer, kind="causal")
    prompt = text.apply(copy.deepcopy(model), arch).soft_prompt.embedding
    torch.testing.assert_close(prompt, table[[7, 9, 7, 9, 7]], atol=0, rtol=0)  # repeated to 5 tokens, as peft
    tokenizer.save_pretrained(tmp_path)  # arch.path: the tokenizer saved beside the weights
    from_path = text.apply(copy.deepcopy(model), SimpleNamespace(path=str(tmp_path), kind="causal")).soft_prompt.embedding
    torch.testing.assert_close(from_path, prompt, atol=0, rtol=0)


@pytest.mark.parametrize("config,key", [
    ({"init": "sample"}, "method.init"),
    ({"init": "text"}, "method.init_text"),
])
def test_prompt_bad_config(config, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        make("prompt", **config)


def test_prompt_text_init_needs_a_tokenizer():
    with pytest.raises(ConfigError, match=r"^method.init: init=text needs the run's tokenizer"):
        make("prompt", init="text", init_text="great").apply(tiny_llama(), SimpleNamespace(kind="causal"))


def test_prompt_on_a_decoder_classifier_needs_left_padding():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, num_labels=2)).eval()
    make("prompt", num_virtual_tokens=3).apply(model)
    with pytest.raises(ConfigError, match="pools the last position.*right-padded; allowed: left padding"):
        model(**batch())
    left = batch(padded=False)
    left["attention_mask"][1, :3] = 0
    assert logits(model, left).shape == (2, 2)


# --------------------------------------------------------------------------- #
# Checks prefix and prompt tuning share (prompt.check_servable, prompt.check_positions)
# --------------------------------------------------------------------------- #
def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=4))


@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_virtual_tokens_refuse_a_model_they_cannot_serve(name):
    model = tiny_t5()
    with pytest.raises(ConfigError, match=r"^method: .*cannot serve a 't5' model; allowed model families: llama, bert, gpt2"):
        make(name).apply(model)
    assert all(p.requires_grad for p in model.parameters())  # nothing changed
    with pytest.raises(ConfigError, match=r"^method: .*cannot serve a 'seq2seq' task; allowed: encoder, causal"):
        make(name).check(tiny_llama(), SimpleNamespace(kind="seq2seq"))


@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_virtual_tokens_must_fit_absolute_positions(name):
    model = tiny_bert()  # max_position_embeddings = 64
    method = make(name, num_virtual_tokens=10)
    with pytest.raises(ConfigError, match=r"^method.num_virtual_tokens: .* = 70 positions.*allowed: num_virtual_tokens \+ max length <= 64"):
        method.apply(model, SimpleNamespace(kind="encoder", max_length=60))
    assert all(p.requires_grad for p in model.parameters()) and not method.layers(model)
    method.apply(model, SimpleNamespace(kind="encoder", max_length=54))  # 10 + 54 fits
    with pytest.raises(ConfigError, match=r"^method.num_virtual_tokens: "):  # a longer batch at run time
        model(**batch(length=60))
    make(name, num_virtual_tokens=10).apply(tiny_llama(), SimpleNamespace(kind="causal", max_length=60))  # RoPE: no table

