"""Model shapes for the memory estimate: the numbers of a transformers config memory depends on,
closed-form parameter counts (tests compare them with meta-device models), and the meta-device
model itself, on which the estimate applies a method to let the method count its own parameters.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from peftlab.errors import ConfigError
from peftlab.methods.base import meta_copy
from peftlab.models.targets import MODEL_TYPE_FAMILY
from peftlab.paths import PRESET_DIR

# --------------------------------------------------------------------------- #
# Architecture
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class ModelShape:
    """The numbers of a transformers config that memory depends on."""

    name: str
    model_type: str
    family: str                 # llama | bert | gpt2 (peftlab.models.targets.MODEL_TYPE_FAMILY)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    tied: bool
    type_vocab: int = 0
    num_labels: int = 2
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False           # qwen3: an RMSNorm on q and k
    gelu_tanh_python: bool = False  # gpt2's gelu_new keeps four intermediates
    config: Any = field(default=None, compare=False, repr=False)  # the transformers config it was read from

    @classmethod
    def from_config(cls, config: Any, name: str | None = None) -> "ModelShape":
        model_type = getattr(config, "model_type", "")
        family = MODEL_TYPE_FAMILY.get(model_type)
        if family is None:
            allowed = ", ".join(sorted(MODEL_TYPE_FAMILY))
            raise ConfigError("model", f"model_type {model_type!r} is not supported by the estimator; "
                              f"allowed: {allowed}")

        def get(key: str, default: Any = None) -> Any:
            value = getattr(config, key, default)
            return default if value is None else value

        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        common = dict(
            name=name or get("_name_or_path", "") or model_type, model_type=model_type, family=family,
            hidden=hidden, intermediate=int(get("intermediate_size", 0) or get("n_inner", 0) or 4 * hidden),
            layers=int(get("num_hidden_layers")), heads=heads, kv_heads=int(get("num_key_value_heads", heads)),
            head_dim=int(get("head_dim", hidden // heads)), vocab=int(get("vocab_size")),
            max_positions=int(get("max_position_embeddings", 0)), tied=bool(get("tie_word_embeddings", True)),
            num_labels=int(get("num_labels", 2)), config=config,
        )
        if family == "llama":
            bias = bool(get("attention_bias", False))
            return cls(**common, attention_dropout=float(get("attention_dropout", 0.0)),
                       qkv_bias=bias or model_type == "qwen2", o_bias=bias, mlp_bias=bool(get("mlp_bias", False)),
                       qk_norm=model_type == "qwen3")
        if family == "bert":
            return cls(**common, type_vocab=int(get("type_vocab_size", 0)), qkv_bias=True, o_bias=True,
                       mlp_bias=True, hidden_dropout=float(get("hidden_dropout_prob", 0.0)),
                       attention_dropout=float(get("attention_probs_dropout_prob", 0.0)))
        return cls(**common, qkv_bias=True, o_bias=True, mlp_bias=True,
                   hidden_dropout=float(get("resid_pdrop", 0.0)), attention_dropout=float(get("attn_pdrop", 0.0)),
                   gelu_tanh_python=get("activation_function", "gelu_new") == "gelu_new")

    @property
    def is_decoder(self) -> bool:
        return self.family in ("llama", "gpt2")

    def linears(self) -> dict[str, tuple[int, int, bool]]:
        """Linear layers of one block: short name -> (in, out, has bias). GPT-2's fused c_attn is 'q'."""
        h, i = self.hidden, self.intermediate
        if self.family == "llama":
            qd, kvd = self.heads * self.head_dim, self.kv_heads * self.head_dim
            b, m = self.qkv_bias, self.mlp_bias
            return {"q": (h, qd, b), "k": (h, kvd, b), "v": (h, kvd, b), "o": (qd, h, self.o_bias),
                    "gate": (h, i, m), "up": (h, i, m), "down": (i, h, m)}
        if self.family == "bert":
            return {"q": (h, h, True), "k": (h, h, True), "v": (h, h, True), "o": (h, h, True),
                    "up": (h, i, True), "down": (i, h, True)}
        return {"q": (h, 3 * h, True), "o": (h, h, True), "up": (h, i, True), "down": (i, h, True)}


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_config(name_or_path: str) -> Any:
    """A transformers config from a preset name, a config.json or a model directory (never downloads)."""
    from transformers import AutoConfig

    preset = PRESET_DIR / f"{name_or_path}.json"
    if preset.is_file():
        return AutoConfig.from_pretrained(str(preset), local_files_only=True)
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
        try:
            return AutoConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError("model.path", f"cannot read a transformers config from {str(path)!r}: {err}") from None
    raise ConfigError("model", f"{name_or_path!r} is neither a preset nor a config.json / model directory; "
                      f"allowed presets: {', '.join(list_presets())}")


def load_arch(name_or_path: str) -> ModelShape:
    """The shape of a preset (``llama-2-7b``), a config.json or a model directory."""
    is_preset = (PRESET_DIR / f"{name_or_path}.json").is_file()
    return ModelShape.from_config(load_config(name_or_path), name=name_or_path if is_preset else None)


def as_shape(arch: Any) -> ModelShape:
    """A ModelShape from itself, a transformers config, a dict of config values, or a preset name / path."""
    if isinstance(arch, ModelShape):
        return arch
    if isinstance(arch, (str, os.PathLike)):
        return load_arch(str(arch))
    if isinstance(arch, Mapping):
        from transformers import AutoConfig

        values = dict(arch)
        if "model_type" not in values:
            allowed = ", ".join(sorted(MODEL_TYPE_FAMILY))
            raise ConfigError("model", f"a config dict needs model_type; allowed: {allowed}")
        try:
            config = AutoConfig.for_model(values.pop("model_type"), **values)
        except ValueError as err:
            raise ConfigError("model", str(err)) from None
        return ModelShape.from_config(config)
    return ModelShape.from_config(arch)


# --------------------------------------------------------------------------- #
# Parameter counts (closed forms; tests compare them with meta-device models)
# --------------------------------------------------------------------------- #
def block_parameters(shape: ModelShape) -> int:
    """Parameters of one repeated block: its linear layers (weights + biases) and norms."""
    linear = sum(d_in * d_out + (d_out if bias else 0) for d_in, d_out, bias in shape.linears().values())
    if shape.family == "llama":
        return linear + 2 * shape.hidden + (2 * shape.head_dim if shape.qk_norm else 0)
    return linear + 4 * shape.hidden  # two LayerNorms, weight + bias


def head_parameters(shape: ModelShape, head: str = "auto") -> int:
    """A fresh classification head's parameters (every method trains it); 0 for a causal LM."""
    if _head(shape, head) != "classification":
        return 0
    h, n = shape.hidden, shape.num_labels
    if shape.model_type in ("roberta", "xlm-roberta"):
        return h * h + h + h * n + n  # RobertaClassificationHead: dense + out_proj
    return h * n + n  # BertForSequenceClassification: one linear on the pooled output


def count_parameters(shape: ModelShape, head: str = "auto") -> int:
    """Parameters of AutoModel (``head="base"``), the causal LM, or the sequence classifier.

    ``head="auto"``: causal LM for decoders, sequence classification for encoders.
    """
    head = _head(shape, head)
    h, v = shape.hidden, shape.vocab
    blocks = shape.layers * block_parameters(shape)
    lm_head = v * h if head == "causal_lm" and not shape.tied else 0
    if shape.family == "llama":
        return v * h + blocks + h + lm_head
    if shape.family == "gpt2":
        return (v + shape.max_positions) * h + blocks + 2 * h + lm_head
    embeddings = (v + shape.max_positions + shape.type_vocab) * h + 2 * h
    pooler = 0 if head == "classification" and shape.model_type in ("roberta", "xlm-roberta") else h * h + h
    return embeddings + blocks + pooler + head_parameters(shape, head)


def bias_parameters(shape: ModelShape) -> int:
    """Every ``module.bias`` outside the task head: what BitFit trains besides the head."""
    h = shape.hidden
    per_block = sum(d_out for _, d_out, bias in shape.linears().values() if bias)
    if shape.family == "llama":
        return shape.layers * per_block
    if shape.family == "gpt2":
        return shape.layers * (per_block + 2 * h) + h
    pooler = 0 if shape.model_type in ("roberta", "xlm-roberta") else h
    return h + shape.layers * (per_block + 2 * h) + pooler  # embeddings' LayerNorm, blocks, pooler


def quantizable_parameters(shape: ModelShape) -> int:
    """Weights of the linear layers inside the blocks: what bitsandbytes quantizes."""
    return shape.layers * sum(d_in * d_out for d_in, d_out, _ in shape.linears().values())


def _head(shape: ModelShape, head: str) -> str:
    if head == "auto":
        return "causal_lm" if shape.is_decoder else "classification"
    if head not in ("base", "causal_lm", "classification"):
        raise ValueError(f"head must be auto, base, causal_lm or classification, not {head!r}")
    return head



# --------------------------------------------------------------------------- #
# The shapes-only model a method is applied to
# --------------------------------------------------------------------------- #
def meta_model(shape: ModelShape) -> nn.Module:
    """A fresh meta-device model of this shape, as peftlab trains it: a causal LM for decoders,
    a sequence classifier (its head new) for encoders. No memory, no weights: a method applied to
    it counts its parameters exactly, in milliseconds. Built once per config, copied per call."""
    key = (shape.config.to_json_string(use_diff=False), shape.is_decoder)
    if key not in _META_MODELS:
        if len(_META_MODELS) >= 8:
            _META_MODELS.clear()
        _META_MODELS[key] = _build_meta_model(copy.deepcopy(shape.config), shape.is_decoder)
    return meta_copy(_META_MODELS[key])


_META_MODELS: dict[tuple[str, bool], nn.Module] = {}


def _build_meta_model(config: Any, decoder: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    auto = AutoModelForCausalLM if decoder else AutoModelForSequenceClassification
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            return auto.from_config(config)
    finally:
        hf_logging.set_verbosity(verbosity)


def head_names(model: nn.Module) -> list[str]:
    """A sequence classifier's new head: the parameters outside its base model (every method trains
    them; peftlab.models.loading finds the same ones as the weights missing from the checkpoint)."""
    if not type(model).__name__.endswith("ForSequenceClassification"):
        return []
    prefix = model.base_model_prefix + "."
    return [n for n, _ in model.named_parameters() if not n.startswith(prefix)]
