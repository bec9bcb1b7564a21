"""LoRA-FA: LoRA with A frozen at its random init; only B trains (Zhang et al. 2023, arXiv:2308.03303).

    y = W0 x + s · B A x,   s = α / r,   A (r×in) frozen, B (out×r) trained, B = 0 at init

With A frozen, backward needs only A x (r per token) for B's gradient, not x itself: the saving the
paper is about, which the memory hook below states. A is saved with the adapter (it is random).

This file is the worked example of README's "Adding a method": one file, one YAML, one registry
entry; tests/methods/test_new_method.py adds it to a copy of the package and runs it through the
contract tests, the estimate, budget matching and a training run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.methods.base import (
    LayerConfig,
    LayerMethod,
    SavedForBackward,
    WeightDeltaLayer,
    check_int_range,
    check_positive,
    check_rank_fits,
    linear_shape,
)


@dataclass
class LoRAFAConfig(LayerConfig):     # + targets (default q, v) and layers (default: every block)
    name: str = "lora_fa"
    r: int = 8                       # rank of ΔW = s·BA
    alpha: float = 16.0              # scale s = alpha / r


class LoRAFALayer(WeightDeltaLayer):
    """y = base(x) + s · B A x, A frozen; ΔW = s · B A."""

    def __init__(self, base: nn.Module, r: int, alpha: float):
        super().__init__(base)
        out_features, in_features = linear_shape(base)
        device = base.weight.device
        self.r, self.scaling = r, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device), requires_grad=False)  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device))                      # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scaling

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_B.detach().float() * self.scaling, self.lora_A.detach().float()

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_B": self.lora_B}


class LoRAFA(LayerMethod):
    """LoRA with a frozen random A (Zhang et al. 2023)."""

    name = "lora_fa"
    config_class = LoRAFAConfig
    mergeable = True
    layer_class = LoRAFALayer
    size_key = "r"

    def validate_config(self) -> None:
        check_int_range("method.r", self.config.r, 1)
        check_positive("method.alpha", self.config.alpha)

    def plan_layer(self, name: str, module: nn.Module) -> int:
        return check_rank_fits("method.r", self.config.r, name, module)

    def make_layer(self, base: nn.Module, rank: int) -> LoRAFALayer:
        return LoRAFALayer(base, rank, self.config.alpha)

    def expected_trainable(self, model: nn.Module) -> int:
        return sum(layer.r * layer.shape[0] for layer in self.layers(model).values())

    def saved_for_backward(self, layer: LoRAFALayer) -> SavedForBackward:
        return SavedForBackward(reads_input=False, elements=layer.r)  # A x for B's gradient; A is frozen

    # The adapter file: B, and the frozen random A it was trained against.
    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        frozen = {f"{n}.lora_A": layer.lora_A.detach().cpu().contiguous() for n, layer in self.layers(model).items()}
        return {**super().state_dict(model), **frozen}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        with torch.no_grad():
            for n, layer in self.layers(model).items():
                layer.lora_A.copy_(state.pop(f"{n}.lora_A"))
        super().load_state_dict(model, state)
