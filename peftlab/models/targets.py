"""Target names -> module names, per architecture family.

Short names mean the same projection on every family::

    name   llama / mistral / qwen2     bert / roberta              gpt2 (Conv1D)
    q      self_attn.q_proj            attention.self.query        attn.c_attn  (fused q,k,v)
    k      self_attn.k_proj            attention.self.key          attn.c_attn  (fused q,k,v)
    v      self_attn.v_proj            attention.self.value        attn.c_attn  (fused q,k,v)
    o      self_attn.o_proj            attention.output.dense      attn.c_proj
    gate   mlp.gate_proj               -                           -
    up     mlp.up_proj                 intermediate.dense          mlp.c_fc
    down   mlp.down_proj               output.dense                mlp.c_proj

Groups: ``attention`` = q k v o, ``mlp`` = gate up down, ``all-linear`` = every
linear layer inside the repeated blocks (embeddings, pooler and the output /
classifier head are never targets). GPT-2 stores q, k and v in one fused
``c_attn`` Conv1D, so ``q``, ``k`` and ``v`` each select that whole module:
on GPT-2 you adapt the fused projection or nothing. Anything else can be named
by a regular expression over full module names: ``re:.*\\.query$``.

Layer subsets: ``layers=[0, 1]`` or ``layers="0-3"`` keeps only those blocks.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

from torch import nn

from peftlab.errors import ConfigError

FAMILIES: dict[str, dict[str, str]] = {
    "llama": {
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
    },
    "bert": {
        "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
        "o": "attention.output.dense", "up": "intermediate.dense", "down": "output.dense",
    },
    "gpt2": {
        "q": "attn.c_attn", "k": "attn.c_attn", "v": "attn.c_attn", "o": "attn.c_proj",
        "up": "mlp.c_fc", "down": "mlp.c_proj",
    },
}
MODEL_TYPE_FAMILY = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama",
    "phi3": "llama", "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "gpt2": "gpt2",
}
GROUPS = {"attention": ["q", "k", "v", "o"], "mlp": ["gate", "up", "down"]}
# A module inside a repeated block: "<prefix>.layers.<i>.<rest>" (llama), ".layer." (bert), ".h." (gpt2).
BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.(.+)$")


# Layer kinds: Linear and GPT-2 Conv1D look the same from here on.
def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, bitsandbytes' Linear4bit/Linear8bitLt (subclasses of it) or Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear-like module, whatever its storage."""
    if is_conv1d(module):
        return module.nf, module.weight.shape[0]
    return module.out_features, module.in_features


ABSOLUTE_POSITION_FAMILIES = ("bert", "gpt2")  # learned position tables, cut at max_position_embeddings


def position_limit(model: nn.Module) -> int | None:
    """Length limit of a learned absolute position table (BERT, GPT-2); None for RoPE models."""
    if family_of(model) not in ABSOLUTE_POSITION_FAMILIES:
        return None
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def family_of(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return MODEL_TYPE_FAMILY.get(model_type, "other")


def parse_layers(layers: Sequence[int] | str | None) -> set[int] | None:
    """``None`` (all), a list of ints, or a string like ``"0-3,5"``."""
    if layers is None or layers == "" or layers == "all":
        return None
    if isinstance(layers, str):
        chosen: set[int] = set()
        for part in layers.split(","):
            try:
                if "-" in part:
                    lo, hi = (int(x) for x in part.split("-"))
                    chosen.update(range(lo, hi + 1))
                else:
                    chosen.add(int(part))
            except ValueError:
                raise ConfigError("method.layers", f"cannot read {layers!r}; allowed: 'all', '0-3,5' or a list of ints")
        return chosen
    return {int(i) for i in layers}


def block_modules(model: nn.Module) -> dict[str, tuple[int, str]]:
    """Linear-like modules inside repeated blocks: name -> (layer index, name within the block)."""
    found = {}
    for name, module in model.named_modules():
        match = BLOCK.search(name)
        if match and is_linear_like(module):
            found[name] = (int(match.group(1)), match.group(2))
    return found


def allowed_names(family: str) -> list[str]:
    return sorted(FAMILIES.get(family, {})) + sorted(GROUPS) + ["all-linear", "re:<regex>"]


def expand(targets: Iterable[str] | str, family: str) -> list[str]:
    """Short names and groups -> in-block suffixes (or regexes, kept as 're:...')."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    names = FAMILIES.get(family, {})
    out: list[str] = []
    for target in targets:
        if target.startswith("re:") or target == "all-linear":
            out.append(target)
        elif target in GROUPS:
            out.extend(names[t] for t in GROUPS[target] if t in names)
        elif target in names:
            out.append(names[target])
        else:
            raise ConfigError(
                "method.targets",
                f"'{target}' is not a target of a {family} model; allowed: {', '.join(allowed_names(family))}",
            )
    return out


def short_name(family: str, suffix: str) -> str:
    """The short name of an in-block suffix ('self_attn.q_proj' -> 'q'), else the suffix."""
    for short, full in FAMILIES.get(family, {}).items():
        if full == suffix:
            return short if family != "gpt2" or short not in "qkv" else "qkv"
    return suffix


def resolve_targets(
    model: nn.Module, targets: Iterable[str] | str, layers: Sequence[int] | str | None = None
) -> list[str]:
    """Full module names selected by ``targets`` (and ``layers``); raises if none match."""
    family = family_of(model)
    wanted = expand(targets, family)
    chosen_layers = parse_layers(layers)
    blocks = block_modules(model)
    indices = {index for index, _ in blocks.values()}
    if chosen_layers is not None and indices and not chosen_layers <= indices:
        raise ConfigError("method.layers", f"{sorted(chosen_layers)} is outside blocks 0..{max(indices)} "
                          f"of this model; allowed: block indices 0..{max(indices)}")
    selected: list[str] = []
    for name, (index, suffix) in blocks.items():
        if chosen_layers is not None and index not in chosen_layers:
            continue
        for want in wanted:
            if (
                want == "all-linear"
                or (want.startswith("re:") and re.fullmatch(want[3:], name))
                or suffix == want
            ):
                selected.append(name)
                break
    if not selected:
        raise ConfigError(
            "method.targets",
            f"{list(targets) if not isinstance(targets, str) else targets} (layers={layers}) matches no module "
            f"of this {family} model; allowed: {', '.join(allowed_names(family))}",
        )
    return selected


def target_key(model_family: str, module_name: str) -> str:
    """The short name used for per-target overrides (rank_pattern) of a full module name."""
    match = BLOCK.search(module_name)
    return short_name(model_family, match.group(2)) if match else module_name
