"""Prompt tuning: trainable soft-prompt embeddings prepended to the input.

    input_ids ──► word embeddings ──► X (B, T, d) ─┐
    P (n, d), trainable ──► expand (B, n, d) ──────┴─► cat ─► [P; X] (B, n+T, d) ──► frozen model
                                                  logits[:, n:] ◄── (causal LM: the task sees (B, T, V))

    y = f_frozen([P; E(x)])                 (Lester et al. 2021, arXiv:2104.08691)

Only P (n_virtual_tokens × d) trains. The attention mask gets n ones in front,
``token_type_ids`` n zeros, token-level labels n ``-100`` (as peft does). Token-level
logits (causal LM, (B, n+T, V)) come back for the ORIGINAL T positions. Encoder
classifiers pool position 0, which after the prepend is the first virtual token,
not [CLS]: this is what peft's PromptTuning does for BERT sequence classification,
and we match it (the soft prompt is then free to act as the classification token). With
``model.pooling=mean`` the head sees the mean over the virtual and the real tokens.

Init (``init``): ``vocab`` copies the embeddings of n tokens drawn uniformly from
the vocabulary (peft's SAMPLE_VOCAB; Lester et al. sample from the 5,000 most
frequent tokens); ``text`` embeds ``init_text`` with the run's tokenizer, cut or
repeated to n tokens (peft's TEXT, including special tokens the tokenizer adds);
``random`` is U(-0.5, 0.5), the paper's random init (peft's RANDOM leaves
nn.Embedding's N(0, 1)). The adapted model is not the base at init.

``generate`` (KV-cached incremental decoding) gets P on its first step only (the cache is empty
then); later steps find P's keys and values in the cache, their attention masks get n ones in front
and their position ids move by n. With left padding the first step's row is [P; pads; prompt].

The virtual-token plumbing (hooks on the model's forward, position limits) is
shared with :mod:`peftlab.methods.prefix`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from peftlab.errors import ConfigError
from peftlab.models.signature import call_kwargs
from peftlab.methods.base import Method, MethodConfig, check_int_range, freeze, is_meta
from peftlab.models.targets import family_of, position_limit

INITS = ("vocab", "text", "random")
SERVED_FAMILIES = ("llama", "bert", "gpt2")


# --------------------------------------------------------------------------- #
# Virtual-token plumbing shared with prefix tuning
# --------------------------------------------------------------------------- #
def check_servable(model: nn.Module, arch: Any, method: str) -> str:
    """The model's family, or ConfigError when prompt/prefix tuning cannot serve it."""
    family = family_of(model)
    if family not in SERVED_FAMILIES:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ConfigError(
            "method", f"{method} tuning cannot serve a {model_type!r} model; allowed model families: "
            f"{', '.join(SERVED_FAMILIES)} (or a weight-space method such as lora)",
        )
    kind = getattr(arch, "kind", None)
    if kind is not None and kind not in ("encoder", "causal"):
        raise ConfigError("method", f"{method} tuning cannot serve a {kind!r} task; allowed: encoder, causal")
    return family


def check_positions(model: nn.Module, num_virtual: int, length: int | None) -> None:
    """n virtual tokens shift the real ones by n: n + T must fit an absolute position table."""
    limit = position_limit(model)  # n + T must fit a learned position table
    if limit is None:
        return
    total = num_virtual + (length or 0)
    if total > limit or num_virtual >= limit:
        what = f"num_virtual_tokens {num_virtual}" + (f" + max length {length}" if length else "")
        raise ConfigError(
            "method.num_virtual_tokens",
            f"{what} = {total} positions, but this {model.config.model_type} model has "
            f"max_position_embeddings={limit}; allowed: num_virtual_tokens + max length <= {limit} "
            f"(and num_virtual_tokens < {limit})",
        )


def prepend_mask(mask: torch.Tensor | None, num_virtual: int) -> torch.Tensor | None:
    """(B, T) -> (B, n+T): the virtual positions are always attended to."""
    if mask is None:
        return None
    ones = torch.ones(mask.shape[0], num_virtual, dtype=mask.dtype, device=mask.device)
    return torch.cat([ones, mask], dim=1)


def run_tokenizer(arch: Any):
    """The run's tokenizer: ``arch.tokenizer``, else the one saved beside the weights (``arch.path``)."""
    tokenizer = getattr(arch, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer
    path = getattr(arch, "path", None)
    if path:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:
            problem = str(err).splitlines()[0]
        raise ConfigError("method.init", f"init=text cannot load a tokenizer from {path!r} ({problem}); "
                          "allowed: vocab, random")
    raise ConfigError("method.init", "init=text needs the run's tokenizer (arch.tokenizer or arch.path); "
                      "allowed: vocab, random")


# --------------------------------------------------------------------------- #
# Prompt tuning
# --------------------------------------------------------------------------- #
@dataclass
class PromptConfig(MethodConfig):
    name: str = "prompt"
    num_virtual_tokens: int = 20     # soft-prompt length (paper: 1-150, 20 or 100 typical)
    init: str = "vocab"              # vocab | text | random (see module docstring)
    init_text: Optional[str] = None  # the text for init=text


class SoftPrompt(nn.Module):
    """P (n, d): the trainable virtual-token embeddings, and the forward hooks that prepend them."""

    def __init__(self, num_virtual_tokens: int, dim: int, decoder_classifier: bool = False):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = nn.Parameter(torch.empty(num_virtual_tokens, dim))  # (n, d)
        self.decoder_classifier = decoder_classifier  # pools the last position: needs left padding

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"embedding": self.embedding}

    def pre_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A full-sequence forward gets P in front. Incremental decoding (``generate``: a cache passed
        in) prepends P on the first step only, when the cache is empty; later steps find P's keys and
        values in the cache and get n ones in front of their attention mask. Explicit ``position_ids``
        (generate's) move by n, P taking positions 0..n-1, as in a full-sequence forward."""
        kwargs = call_kwargs(model, args, kwargs)
        n = self.num_virtual_tokens
        cache = next((kwargs[k] for k in ("cache", "past_key_values") if kwargs.get(k) is not None), None)
        past = cache.get_seq_length() if cache is not None else 0
        positions = kwargs.get("position_ids")
        self.full_length = None  # the logits' length when P is prepended (post_forward cuts P's positions)
        if past > 0:  # P is in the cache already
            length = (kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[1]
            check_positions(model, n, past - n + length)
            kwargs["attention_mask"] = prepend_mask(kwargs.get("attention_mask"), n)
            if positions is not None:
                kwargs["position_ids"] = positions + n
            return (), kwargs
        input_ids = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(input_ids)  # (B, T, d)
        batch, length = embeds.shape[:2]
        check_positions(model, n, length)
        self.full_length = n + length
        if positions is not None:
            virtual = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(batch, n)
            kwargs["position_ids"] = torch.cat([virtual, positions + n], dim=1)
        mask = kwargs.get("attention_mask")
        if self.decoder_classifier and mask is not None and bool((mask[:, -1] == 0).any()):
            raise ConfigError("method", "prompt tuning on a decoder classifier: it pools the last position, "
                              "and this batch is right-padded; allowed: left padding, or another method")
        prompt = self.embedding.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, n, d)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (B, n+T, d)
        kwargs["attention_mask"] = prepend_mask(mask, n)
        if kwargs.get("token_type_ids") is not None:
            types = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, n), types], dim=1)
        labels = kwargs.get("labels")
        if labels is not None and labels.dim() == 2 and labels.shape[1] == length:  # token labels
            kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
        return (), kwargs

    def post_forward(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        logits = getattr(output, "logits", None)
        full = getattr(self, "full_length", None)
        # token-level (B, n+T, V): the task sees (B, T, V); generate's prefill keeps the last position only
        if logits is not None and logits.dim() == 3 and full is not None and logits.shape[1] == full:
            output.logits = logits[:, self.num_virtual_tokens:]
        return output

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, dim={self.embedding.shape[1]}"


class PromptTuning(Method):
    """Soft prompt tuning (Lester et al. 2021); see the module docstring."""

    name = "prompt"
    config_class = PromptConfig
    has_weight_delta = False  # virtual tokens, not a weight update: no ΔW spectrum
    mergeable = False
    layer_class = SoftPrompt
    identity_at_init = False  # the prompt changes the outputs from the first step
    size_key = "num_virtual_tokens"
    gradient_reaches_every_block = True  # the virtual tokens enter at the input
    gradient_reaches_embeddings = True
    lengthens_sequence = True            # n more positions in every block

    def validate_config(self) -> None:
        c = self.config
        check_int_range("method.num_virtual_tokens", c.num_virtual_tokens, 1)
        if c.init not in INITS:
            raise ConfigError("method.init", f"got {c.init!r}; allowed: {', '.join(INITS)}")
        if c.init == "text" and not c.init_text:
            raise ConfigError("method.init_text", f"got {c.init_text!r}; allowed: a non-empty text when init=text")

    def init_token_ids(self, arch: Any, vocab_size: int) -> torch.Tensor | None:
        """The token ids whose embeddings start P (None for init=random)."""
        c, n = self.config, self.config.num_virtual_tokens
        if c.init == "vocab":
            return torch.randint(0, vocab_size, (n,))
        if c.init == "random":
            return None
        tokenizer = run_tokenizer(arch)
        ids = list(tokenizer(c.init_text)["input_ids"])
        ids = (ids * math.ceil(n / len(ids)))[:n]  # cut or repeat to n tokens, as peft
        if max(ids) >= vocab_size:
            raise ConfigError("method.init_text", f"tokenizer ids reach {max(ids)} >= vocabulary size {vocab_size}")
        return torch.tensor(ids)

    def check(self, model: nn.Module, arch: Any = None) -> None:
        check_servable(model, arch, "prompt")
        check_positions(model, self.config.num_virtual_tokens, getattr(arch, "max_length", None))
        if self.config.init == "text" and not is_meta(model):  # a shapes-only dry run initialises nothing
            run_tokenizer(arch)

    def virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def apply(self, model: nn.Module, arch: Any = None) -> nn.Module:
        self.check(model, arch)
        family = family_of(model)
        word_embeddings = model.get_input_embeddings()
        decoder_classifier = family != "bert" and type(model).__name__.endswith("ForSequenceClassification")
        values = not is_meta(model)  # a shapes-only dry run (estimate, budget) has no embeddings to copy
        ids = self.init_token_ids(arch, word_embeddings.num_embeddings) if values else None
        freeze(model)
        prompt = SoftPrompt(self.config.num_virtual_tokens, word_embeddings.embedding_dim, decoder_classifier)
        if values:
            with torch.no_grad():
                if ids is None:
                    prompt.embedding.uniform_(-0.5, 0.5)
                else:
                    prompt.embedding.copy_(word_embeddings(ids.to(word_embeddings.weight.device)).float())
        model.soft_prompt = prompt.to(word_embeddings.weight.device)
        model.register_forward_pre_hook(model.soft_prompt.pre_forward, with_kwargs=True)
        model.register_forward_hook(model.soft_prompt.post_forward, with_kwargs=True)
        return model

    def expected_trainable(self, model: nn.Module) -> int:
        return self.config.num_virtual_tokens * model.get_input_embeddings().embedding_dim

    def summary(self, model: nn.Module) -> dict:
        return {"modules": sorted(self.layers(model)), "num_virtual_tokens": self.config.num_virtual_tokens,
                "init": self.config.init}
