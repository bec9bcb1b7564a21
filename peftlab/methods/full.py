"""Full fine-tuning: every parameter of the model trains (the baseline)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab.methods.base import Method, MethodConfig
from peftlab.models.targets import block_modules


@dataclass
class FullConfig(MethodConfig):
    name: str = "full"


class Full(Method):
    """All weights train. ΔW of each linear layer is W - W0, read against ``self.reference``
    (an untouched copy of the base that analysis loads; training keeps no copy)."""

    name = "full"
    config_class = FullConfig
    has_weight_delta = True
    trains_base_weights = True   # every weight trains in its own dtype; every linear keeps its input
    memory_approximate = False
    needs_reference = True
    reference: nn.Module | None = None

    def apply(self, model: nn.Module, arch: Any = None) -> nn.Module:
        self._head = set(getattr(arch, "head_parameters", ()) or ())
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        head = getattr(self, "_head", set())
        return {n: p for n, p in model.named_parameters() if n not in head}

    def expected_trainable(self, model: nn.Module) -> int:
        head = getattr(self, "_head", set())
        return sum(p.numel() for n, p in model.named_parameters() if n not in head)

    def delta_weights(self, model: nn.Module):
        """(module name, DenseDelta) for every linear layer inside the blocks."""
        if self.reference is None:
            raise ValueError("full fine-tuning's ΔW needs method.reference = the untouched base model")
        for name in block_modules(model):
            yield name, DenseDelta(model.get_submodule(name), self.reference.get_submodule(name))


class DenseDelta:
    """ΔW = W - W0 of one linear layer (out, in), fp32; no factors."""

    def __init__(self, tuned: nn.Module, base: nn.Module):
        self.tuned, self.base = tuned, base

    def delta_weight(self) -> torch.Tensor:
        from peftlab.methods.base import base_weight

        return base_weight(self.tuned) - base_weight(self.base)

    def factors(self) -> None:
        return None
