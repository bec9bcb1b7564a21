"""Shared fixtures: tiny models built from configs (unit tests only) and offline settings."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0, num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels,
    )
    return randomize_biases(BertForSequenceClassification(config).eval(), seed)


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return randomize_biases(GPT2LMHeadModel(config).eval(), seed)


@torch.no_grad()
def randomize_biases(model, seed: int = 0):
    """HF inits biases to zero; random ones let tests catch an adapter that mishandles bias."""
    generator = torch.Generator().manual_seed(seed + 99)
    for module in model.modules():
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.nn.Parameter):
            bias.copy_(torch.randn(bias.shape, generator=generator) * 0.1)
    return model


TINY = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}


@pytest.fixture
def tokens():
    torch.manual_seed(1)
    return torch.randint(0, 128, (2, 10))
