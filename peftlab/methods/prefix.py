"""Prefix tuning: trainable key/value prefixes in every attention layer.

    training (prefix_projection=true):  E (n, k) ──► Linear ─► tanh ─► Linear ──► P (L, 2, n, k)
    saving / inference (collapsed):     P (L, 2, n, k), a plain tensor

    layer l:   keys   = [P[l, 0]; W_k h]     values = [P[l, 1]; W_v h]      (B, heads, n+T, head_dim)
               queries come from the T real tokens only, so the logits keep shape (B, T, ...)

    (Li & Liang 2021, arXiv:2101.00190; k = the layer's key/value width = kv heads × head_dim)

The prefix enters as ``past_key_values`` (a transformers ``DynamicCache`` built
for each call), exactly as peft's PrefixTuning does: the model's own attention
concatenates it in front of the real keys and values; the attention mask gets n
ones in front; the real tokens' positions start at n (RoPE models rotate them by
n + t; BERT / GPT-2 read rows n..n+T-1 of the position table, so n + T must fit).
The forward hooks are installed by ``apply``, so task code calls the model as
before and reads ``.logits`` for its own T positions. ``generate`` works too (KV-cached
incremental decoding): its empty cache gets the prefix on the first step and grows after,
and its position ids move by n (tests/tasks/test_generation.py checks it against the
full-sequence forward).

Reparameterization: Li & Liang train P through an MLP on a smaller embedding
(directly optimizing P was unstable); peft's encoder is the same (embedding
width k, hidden width ``encoder_hidden_size`` = k unless set, tanh). Only the
MLP's output P is needed after training: ``state_dict`` saves the collapsed P
(L, 2, n, k), and loading it (or ``collapse``) drops the MLP. Init as peft:
the embedding (and a plain P) ~ N(0, 1) (nn.Embedding's default), the MLP's
Linear layers nn.Linear's default. The adapted model is not the base at init.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from peftlab.methods.base import Method, MethodConfig, check_int_range, freeze
from peftlab.methods.prompt import check_positions, check_servable, prepend_mask
from peftlab.models.signature import call_kwargs


@dataclass
class PrefixConfig(MethodConfig):
    name: str = "prefix"
    num_virtual_tokens: int = 10                 # prefix length n (paper: 10 table-to-text, 200 summarization)
    prefix_projection: bool = True               # train P through an MLP (paper), collapsed for saving
    encoder_hidden_size: Optional[int] = None    # the MLP's hidden width; None = kv width (peft; paper: 512 / 800)


def kv_geometry(config: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head_dim) of a transformers config (llama GQA, BERT, GPT-2)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers >= 5.24 names it cache; past_key_values until 5.40


def cache_argument(model: nn.Module) -> str:
    """The name the model's forward takes the KV cache by: ``cache`` where it (or the backbone its
    ``**kwargs`` reach, as BertForSequenceClassification's) has one, else the older ``past_key_values``."""
    forwards = (model.forward, getattr(model, "base_model", model).forward)
    return "cache" if any("cache" in inspect.signature(f).parameters for f in forwards) else "past_key_values"


class PrefixEncoder(nn.Module):
    """P (L, 2, n, k), k = kv_heads·head_dim: directly, or as MLP(E) while reparameterized."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, num_virtual_tokens: int,
                 projection: bool, hidden: int | None):
        super().__init__()
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.num_virtual_tokens = num_virtual_tokens
        width = kv_heads * head_dim
        self.projection = projection
        if projection:
            hidden = hidden or width
            self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, width))  # E (n, k)
            self.transform = nn.Sequential(
                nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, num_layers * 2 * width),
            )
        else:
            self.prefix = nn.Parameter(torch.randn(num_layers, 2, num_virtual_tokens, width))  # P

    def forward(self) -> torch.Tensor:
        """P: (L, 2, n, k)."""
        if not self.projection:
            return self.prefix
        n, layers = self.num_virtual_tokens, self.num_layers
        flat = self.transform(self.embedding)  # (n, L·2·k), peft's layout
        return flat.view(n, layers, 2, -1).permute(1, 2, 0, 3)

    @torch.no_grad()
    def collapse(self) -> None:
        """Replace the MLP by its output P (what saving and inference need)."""
        if not self.projection:
            return
        prefix = self().detach().clone()
        del self.embedding, self.transform
        self.projection = False
        self.prefix = nn.Parameter(prefix)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The prefix per layer: (keys, values), each (B, kv_heads, n, head_dim)."""
        prefix = self().to(dtype)
        layers, _, n, _ = prefix.shape
        kv = prefix.view(layers, 2, n, self.kv_heads, self.head_dim).transpose(2, 3)  # (L, 2, H, n, d)
        kv = kv.unsqueeze(2).expand(-1, -1, batch, -1, -1, -1)  # (L, 2, B, H, n, d)
        return [(kv[layer, 0], kv[layer, 1]) for layer in range(layers)]

    def cache(self, batch: int, dtype: torch.dtype):
        """The prefix as a fresh DynamicCache."""
        from transformers import DynamicCache

        return DynamicCache(self.key_values(batch, dtype))

    def pre_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A full-sequence forward gets a fresh cache holding the prefix. Incremental decoding
        (``generate``: a cache passed in) fills an empty cache with the prefix on the first step and
        lets it grow after; explicit ``position_ids`` (generate's, from the attention mask) move by n,
        as the model's own positions do when the prefix is in the cache."""
        kwargs = call_kwargs(model, args, kwargs)
        n = self.num_virtual_tokens
        reference = kwargs.get("input_ids")
        if reference is None:
            reference = kwargs["inputs_embeds"]
        batch, length = reference.shape[:2]
        given = next((name for name in CACHE_ARGUMENTS if kwargs.get(name) is not None), None)
        dtype = model.get_input_embeddings().weight.dtype
        if given is None:
            check_positions(model, n, length)
            kwargs[cache_argument(model)] = self.cache(batch, dtype)
        else:
            cache = kwargs[given]
            past = cache.get_seq_length()
            if past == 0:  # the first decoding step: the prefix goes in first
                for layer, (keys, values) in enumerate(self.key_values(batch, dtype)):
                    cache.update(keys, values, layer)
                past = n
            check_positions(model, n, past - n + length)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + n
        kwargs["attention_mask"] = prepend_mask(kwargs.get("attention_mask"), n)
        return (), kwargs

    def extra_repr(self) -> str:
        return (f"layers={self.num_layers}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"num_virtual_tokens={self.num_virtual_tokens}, projection={self.projection}")


class PrefixTuning(Method):
    """Prefix tuning (Li & Liang 2021); see the module docstring."""

    name = "prefix"
    config_class = PrefixConfig
    has_weight_delta = False  # key/value prefixes, not a weight update: no ΔW spectrum
    mergeable = False
    layer_class = PrefixEncoder
    identity_at_init = False  # the prefix changes the outputs from the first step
    size_key = "num_virtual_tokens"
    gradient_reaches_every_block = True  # every block's attention reads the trained keys and values
    # transformers' layers set the KV cache aside under gradient checkpointing (they log "Caching is
    # incompatible with gradient checkpointing"): the prefix would be dropped silently (BERT) or the
    # prefix-lengthened mask would not fit the keys (Llama); tests/methods/test_prefix.py shows both
    checkpointing_conflict = ("its keys and values travel in the KV cache, which transformers' layers drop "
                              "under gradient checkpointing")

    def validate_config(self) -> None:
        c = self.config
        check_int_range("method.num_virtual_tokens", c.num_virtual_tokens, 1)
        if c.encoder_hidden_size is not None:
            check_int_range("method.encoder_hidden_size", c.encoder_hidden_size, 1)

    def check(self, model: nn.Module, arch: Any = None) -> None:
        check_servable(model, arch, "prefix")
        check_positions(model, self.config.num_virtual_tokens, getattr(arch, "max_length", None))

    def apply(self, model: nn.Module, arch: Any = None) -> nn.Module:
        c = self.config
        self.check(model, arch)
        freeze(model)
        encoder = PrefixEncoder(*kv_geometry(model.config), c.num_virtual_tokens, c.prefix_projection,
                                c.encoder_hidden_size)
        model.prefix_encoder = encoder.to(model.get_input_embeddings().weight.device)
        model.register_forward_pre_hook(model.prefix_encoder.pre_forward, with_kwargs=True)
        return model

    def virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def fixed_activation_bytes(self, shape: Any, batch: int, compute_bytes: int) -> float:
        """The virtual keys and values, expanded over the batch, in every block."""
        n = self.config.num_virtual_tokens
        return shape.layers * batch * 2 * n * shape.kv_heads * shape.head_dim * compute_bytes

    def encoder(self, model: nn.Module) -> PrefixEncoder:
        return model.prefix_encoder

    def collapse(self, model: nn.Module) -> None:
        """Drop the MLP reparameterization, keeping its output P (for inference)."""
        self.encoder(model).collapse()

    def expected_trainable(self, model: nn.Module) -> int:
        enc = self.encoder(model)
        n, layers, width = enc.num_virtual_tokens, enc.num_layers, enc.kv_heads * enc.head_dim
        if not enc.projection:
            return layers * 2 * n * width
        hidden = self.config.encoder_hidden_size or width
        return n * width + (width + 1) * hidden + (hidden + 1) * layers * 2 * width

    # The adapter file holds the collapsed P only.
    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"prefix_encoder.prefix": self.encoder(model)().detach().float().cpu().contiguous()}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        enc = self.encoder(model)
        expected = (enc.num_layers, 2, enc.num_virtual_tokens, enc.kv_heads * enc.head_dim)
        if set(state) != {"prefix_encoder.prefix"} or tuple(state["prefix_encoder.prefix"].shape) != expected:
            got = {k: tuple(v.shape) for k, v in state.items()}
            raise ValueError(f"adapter does not fit this model: expected prefix_encoder.prefix {expected}, got {got}")
        enc.collapse()
        with torch.no_grad():
            enc.prefix.copy_(state["prefix_encoder.prefix"].to(enc.prefix.dtype))

    def summary(self, model: nn.Module) -> dict:
        enc = self.encoder(model)
        return {"modules": sorted(self.layers(model)), "num_virtual_tokens": enc.num_virtual_tokens,
                "prefix_shape": [enc.num_layers, 2, enc.num_virtual_tokens, enc.kv_heads * enc.head_dim],
                "prefix_projection": enc.projection}
