"""model=hf: the model's kind is read off its own config.json (no download), and a folder that holds
no model is one line naming model.path."""
from __future__ import annotations

import pytest

from peftlab.config import compose, validate
from peftlab.errors import ConfigError


def test_kind_comes_from_the_checkpoint(tmp_path):
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    BertModel(BertConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2)).save_pretrained(tmp_path / "encoder")
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "causal")
    assert validate(compose(["model=hf", f"model.path={tmp_path / 'encoder'}"])).model.kind == "encoder"
    assert validate(compose(["model=hf", f"model.path={tmp_path / 'causal'}"])).model.kind == "causal"
    forced = validate(compose(["model=hf", f"model.path={tmp_path / 'causal'}", "model.kind=encoder"]))
    assert forced.model.kind == "encoder"  # an explicit kind wins


def test_a_folder_without_a_model_names_model_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as err:
        validate(compose(["model=hf", f"model.path={tmp_path / 'empty'}"]))
    assert err.value.key == "model.path" and "config" in err.value.message
    with pytest.raises(ConfigError) as err:
        validate(compose(["model=hf"]))
    assert err.value.key == "model.path"
