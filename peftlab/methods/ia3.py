"""(IA)³: learned vectors that rescale activations (Liu et al. 2022, arXiv:2205.05638).

    keys, values (output side)            FFN down projection (input side)
    x ──► base (W x) ──► ⊙ l ──► + b      x ──► ⊙ l ──► base (W x + b)

    output side:  y = l ⊙ (W0 x) + b      ΔW = (diag(l) − I) W0
    input side:   y = W0 (l ⊙ x) + b      ΔW = W0 (diag(l) − I)

The paper rescales the keys and values of every attention block (l_k, l_v)
and the FFN's inner activation before the down projection (l_ff); the
default targets are k, v and down with down on the input side
(``feedforward: [down]``). Init: l = 1, so the model is unchanged at step 0.

The bias of an output-side layer is not rescaled (the paper's models, T5 and
Llama-style ones, have none; peft rescales it too), so ΔW above is the whole
update on every model and merging folds it into the weight alone. On GPT-2 the
k and v targets select the fused q,k,v projection (see :mod:`peftlab.models.targets`),
so l then rescales the queries as well.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftlab.errors import ConfigError
from peftlab.methods.base import (
    LayerConfig,
    LayerMethod,
    SavedForBackward,
    WeightDeltaLayer,
    base_weight,
    is_conv1d,
    linear_shape,
)
from peftlab.models.targets import resolve_targets


@dataclass
class IA3Config(LayerConfig):      # + layers (default: every block)
    name: str = "ia3"
    targets: Any = field(default_factory=lambda: ["k", "v", "down"])  # paper: keys, values, FFN
    feedforward: Any = field(default_factory=lambda: ["down"])        # targets rescaled on the input side


class IA3Layer(WeightDeltaLayer):
    """Output side: y = l ⊙ (W0 x) + b; input side: y = W0 (l ⊙ x) + b (l = 1 at init)."""

    def __init__(self, base: nn.Module, feedforward: bool):
        super().__init__(base)
        out_features, in_features = linear_shape(base)
        self.feedforward = feedforward
        size = in_features if feedforward else out_features
        self.scale = nn.Parameter(torch.ones(size, device=base.weight.device))  # l: (in,) or (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        scale = self.scale.to(x.dtype)
        if self.feedforward:
            return self.base(x * scale)
        out = self.base(x)
        bias = self.base.bias
        return out * scale if bias is None else (out - bias) * scale + bias

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x) − base(x) while unmerged."""
        return self.forward(x) - self.base(x)

    def frozen_weight(self) -> torch.Tensor:
        """W0 as (out, in) fp32, also while merged."""
        if not self.merged:
            return base_weight(self.base)
        weight = self._original_weight.float()
        return weight.t() if is_conv1d(self.base) else weight

    def delta_weight(self) -> torch.Tensor:
        w0 = self.frozen_weight()
        excess = self.scale.detach().float() - 1
        return w0 * excess.unsqueeze(0) if self.feedforward else excess.unsqueeze(1) * w0

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"scale": self.scale}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, side={'input' if self.feedforward else 'output'}"


class IA3(LayerMethod):
    """Rescale keys, values (output side) and the FFN input (input side) by learned vectors."""

    name = "ia3"
    config_class = IA3Config
    mergeable = True
    layer_class = IA3Layer
    memory_approximate = False  # its saved tensors were checked against profiler peaks (tests/memory/test_estimate.py)

    def validate_config(self) -> None:
        c = self.config
        targets = [c.targets] if isinstance(c.targets, str) else list(c.targets)
        feedforward = [c.feedforward] if isinstance(c.feedforward, str) else list(c.feedforward or [])
        stray = [name for name in feedforward if name not in targets]
        if stray:
            raise ConfigError("method.feedforward",
                              f"{stray} are not in method.targets; allowed: a subset of {targets}")

    def plan(self, model: nn.Module) -> dict[str, bool]:
        """Target module name -> whether it is rescaled on the input side (feedforward)."""
        c = self.config
        targets = self.target_names(model)
        try:
            feedforward = set(resolve_targets(model, c.feedforward, c.layers)) if c.feedforward else set()
        except ConfigError as err:
            raise ConfigError("method.feedforward", err.message) from None
        return {name: name in feedforward for name in targets}

    def make_layer(self, base: nn.Module, feedforward: bool) -> IA3Layer:
        return IA3Layer(base, feedforward)

    def saved_for_backward(self, layer: IA3Layer) -> SavedForBackward:
        """Input side: the input x, scaled elementwise (no cast of its own under autocast); output
        side: W0 x (out per token) for the scale's gradient, and not x."""
        if layer.feedforward:
            return SavedForBackward(casts_input=False)
        return SavedForBackward(reads_input=False, elements=layer.shape[0])

    def expected_trainable(self, model: nn.Module) -> int:
        # one entry per input feature (feedforward) or per output feature
        return sum(layer.shape[1] if layer.feedforward else layer.shape[0] for layer in self.layers(model).values())

    def summary(self, model: nn.Module) -> dict:
        layers = self.layers(model)
        return {
            "modules": sorted(layers),
            "input_side": sorted(n for n, layer in layers.items() if layer.feedforward),
        }
