"""model.pooling=mean: encoder classifiers over the masked mean of the last hidden states."""
from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch

from conftest import tiny_bert
from peftlab.config import compose, validate
from peftlab.errors import ConfigError
from peftlab.methods import METHODS
from peftlab.models.loading import MeanPool, use_mean_pooling


def make(name: str, **config):
    cls = METHODS[name]
    return cls(cls.config_class(**config))


def padded_batch():
    """Row 0: 10 real tokens; row 1: 6 real tokens and 4 pads (id 0)."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 128, (2, 10), generator=generator)
    mask = torch.ones(2, 10, dtype=torch.long)
    ids[1, 6:], mask[1, 6:] = 0, 0
    return ids, mask


def mean_pooled_bert(seed: int = 0):
    model = tiny_bert(seed)
    use_mean_pooling(model)
    return model


@torch.no_grad()
def test_mean_pooling_is_the_masked_mean_of_the_last_hidden_states():
    model = mean_pooled_bert()
    ids, mask = padded_batch()
    hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state  # (2, 10, 32)
    weights = mask.unsqueeze(-1).float()
    expected = model.classifier((hidden * weights).sum(1) / weights.sum(1))
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-6, rtol=0)
    assert isinstance(model.bert.pooler, MeanPool) and not list(model.bert.pooler.parameters())


@torch.no_grad()
def test_mean_pooling_ignores_padding_and_positional_masks():
    model = mean_pooled_bert()
    ids, mask = padded_batch()
    padded = model(input_ids=ids, attention_mask=mask).logits[1]
    alone = model(input_ids=ids[1:, :6], attention_mask=mask[1:, :6]).logits[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)
    positional = model(ids, mask).logits  # the mask passed positionally reaches the pooler too
    torch.testing.assert_close(positional, model(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
    unmasked = model(input_ids=ids).logits[1]  # without a mask the pads are averaged in: a different answer
    assert not torch.allclose(unmasked, padded, atol=1e-3)


@torch.no_grad()
def test_a_deep_copy_pools_with_its_own_mask():
    model = mean_pooled_bert()
    twin = copy.deepcopy(model)
    ids, mask = padded_batch()
    expected = model(input_ids=ids, attention_mask=mask).logits
    model(input_ids=ids[:1], attention_mask=mask[:1])  # leaves a (1, 10) mask on the original's pooler
    torch.testing.assert_close(twin(input_ids=ids, attention_mask=mask).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["prefix", "prompt"])
@torch.no_grad()
def test_virtual_tokens_and_mean_pooling_ignore_padding(name):
    """Prefix tuning lengthens the mask (n key positions in front); prompt tuning the sequence."""
    method = make(name, num_virtual_tokens=4)
    model = method.apply(mean_pooled_bert())
    for p in method.trainable_parameters(model).values():
        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.1)
    ids, mask = padded_batch()
    padded = model(input_ids=ids, attention_mask=mask).logits[1]
    alone = model(input_ids=ids[1:, :6], attention_mask=mask[1:, :6]).logits[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)


def test_pooling_bad_input_names_the_key():
    with pytest.raises(ConfigError, match=r"model\.pooling.*'max'.*allowed: cls, mean"):
        validate(compose(["model.pooling=max"]))
    with pytest.raises(ConfigError, match=r"model\.pooling.*causal model.*allowed: cls"):
        validate(compose(["model=smollm2-135m", "model.pooling=mean"]))
    from transformers import RobertaConfig, RobertaForSequenceClassification

    roberta = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(ConfigError, match=r"model\.pooling.*'roberta' classifier has none; allowed: cls"):
        use_mean_pooling(roberta)


def test_default_pooling_keeps_earlier_config_hashes():
    """Runs committed before model.pooling existed must keep their hash (re-runs skip them)."""
    from peftlab.training.checkpoint import HASH_EXCLUDED, HASH_EXCLUDED_AT_DEFAULT, config_hash
    from peftlab.config import to_dict

    cls_run = validate(compose(["model=minilm"]))
    stored = to_dict(cls_run)
    stored["model"].pop("pooling")  # what a run written before the key existed hashed
    for dotted in HASH_EXCLUDED_AT_DEFAULT:  # and every key added since at its default
        group, _, key = dotted.partition(".")
        stored[group].pop(key, None)
    for dotted in HASH_EXCLUDED:
        group, _, key = dotted.partition(".")
        if key:
            stored[group].pop(key, None)
        else:
            stored.pop(group, None)
    canonical = json.dumps(stored, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert config_hash(cls_run) == hashlib.sha256(canonical.encode()).hexdigest()
    assert config_hash(validate(compose(["model=minilm", "model.pooling=mean"]))) != config_hash(cls_run)
    # the hashes committed runs were written with (git bfdb0eb): a new key at its default changes neither
    assert config_hash(cls_run) == "4ed7822a793e700ffc140573e193ea115da24372b503ec0ba88cc9131e0ada79"
    lm_run = validate(compose(["model=smollm2-135m", "method=dora", "task=lm"]))
    assert config_hash(lm_run) == "2a3786ad64e4fff068d3c518422e12f688a0ce3eea5fd0ff148580959e412809"
