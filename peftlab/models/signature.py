"""A forward call's arguments by name, whatever mix of positions and keywords the caller used."""
from __future__ import annotations

import inspect

from torch import nn


def call_kwargs(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """A forward call's positional arguments as keywords (input_ids, attention_mask, ...)."""
    if not args:
        return dict(kwargs)
    names = [n for n, p in inspect.signature(model.forward).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {**dict(zip(names, args)), **kwargs}
