"""Full fine-tuning: every parameter of the model trains (the baseline)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from peftlab.methods.base import Method, MethodConfig


@dataclass
class FullConfig(MethodConfig):
    name: str = "full"


class Full(Method):
    """All weights train; ΔW of a linear layer is W_after - W0 (kept by the trainer's snapshot)."""

    name = "full"
    config_class = FullConfig
    has_weight_delta = True  # dense ΔW, read from a snapshot of W0 (see analysis)

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
