"""Bottleneck adapters: a small residual MLP after a sublayer's output projection.

    x ──► base (o / down projection, frozen) ──► h ─┬──────────────────────────────┐
                                                    └─► down (m×d) ─► act ─► up (d×m) ─(+)──► h + up(act(down(h)))

    h ← h + W_up act(W_down h + b_down) + b_up       (Houlsby et al. 2019, arXiv:1902.00751)

Placement (``placement``):
  houlsby   after the attention output projection and after the FFN (two per block)
  pfeiffer  after the FFN only (Pfeiffer et al. 2020, arXiv:2005.00247)

The adapter wraps the sublayer's output projection (target ``o`` and ``down`` of
:mod:`peftlab.models.targets`: llama ``self_attn.o_proj`` / ``mlp.down_proj``; BERT
``attention.output.dense`` / ``output.dense``; GPT-2 ``attn.c_proj`` / ``mlp.c_proj``),
so it acts on the sublayer output before the block adds the skip connection
(and, in BERT, before the sublayer's dropout and residual LayerNorm) — Houlsby's
position, with no model code forked.

Bottleneck width m = ``bottleneck``, or d // ``reduction_factor`` (give one of them).

Init: Houlsby draw both projections near zero (N(0, 1e-2) truncated at 2σ), making
each adapter a near-identity. We draw W_down that way and set W_up = 0 and both
biases = 0, so the adapter is *exactly* the identity at init (as LoRA's B = 0);
W_up still receives a gradient at step 0 because W_down h ≠ 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from peftlab.errors import ConfigError
from peftlab.methods.base import (
    LayerMethod,
    MethodConfig,
    SavedForBackward,
    check_float_range,
    check_int_range,
    linear_shape,
)
from peftlab.models.targets import resolve_targets

PLACEMENTS = {"houlsby": ["o", "down"], "pfeiffer": ["down"]}
NONLINEARITIES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass
class AdapterConfig(MethodConfig):
    name: str = "adapter"
    placement: str = "houlsby"                 # houlsby (after attention and FFN) | pfeiffer (after FFN)
    bottleneck: Optional[int] = None           # bottleneck width m; give this or reduction_factor
    reduction_factor: Optional[float] = 16.0   # m = d // reduction_factor (Pfeiffer et al.: 16)
    nonlinearity: str = "relu"                 # relu | gelu | silu | tanh
    init_std: float = 1e-2                     # W_down ~ N(0, init_std²) truncated at 2σ (Houlsby); W_up = 0
    layers: Any = None                         # None = all blocks, or [0, 1] / "0-3"


class BottleneckAdapterLayer(nn.Module):
    """y = h + up(act(down(h))), h = base(x); see the module docstring."""

    has_weight_delta = False

    def __init__(self, base: nn.Module, bottleneck: int, nonlinearity: str, init_std: float):
        super().__init__()
        self.base = base
        dim, _ = linear_shape(base)  # the adapter acts on the sublayer's output (out_features)
        device = base.weight.device
        self.bottleneck = bottleneck
        self.down = nn.Linear(dim, bottleneck, device=device)  # (m, d)
        self.act = NONLINEARITIES[nonlinearity]()
        self.up = nn.Linear(bottleneck, dim, device=device)    # (d, m)
        self.reset_parameters(init_std)

    @torch.no_grad()
    def reset_parameters(self, init_std: float) -> None:
        nn.init.trunc_normal_(self.down.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)  # (..., d)
        down, up = self.down, self.up
        z = self.act(nn.functional.linear(h, down.weight.to(h.dtype), down.bias.to(h.dtype)))  # (..., m)
        return h + nn.functional.linear(z, up.weight.to(h.dtype), up.bias.to(h.dtype))

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"down.weight": self.down.weight, "down.bias": self.down.bias,
                "up.weight": self.up.weight, "up.bias": self.up.bias}

    def extra_repr(self) -> str:
        return f"dim={self.up.out_features}, bottleneck={self.bottleneck}"


class BottleneckAdapter(LayerMethod):
    """Houlsby / Pfeiffer bottleneck adapters; see the module docstring."""

    name = "adapter"
    config_class = AdapterConfig
    has_weight_delta = False  # a nonlinear residual branch, not a weight update
    mergeable = False
    layer_class = BottleneckAdapterLayer
    size_key = "bottleneck"

    def size_fields(self, value: int) -> dict[str, Any]:
        return {"bottleneck": value, "reduction_factor": None}  # exactly one of the two is set

    def validate_config(self) -> None:
        c = self.config
        if c.placement not in PLACEMENTS:
            raise ConfigError("method.placement", f"got {c.placement!r}; allowed: {', '.join(PLACEMENTS)}")
        if (c.bottleneck is None) == (c.reduction_factor is None):
            raise ConfigError("method.bottleneck", f"got bottleneck={c.bottleneck!r} and reduction_factor="
                              f"{c.reduction_factor!r}; allowed: exactly one of them set, the other null")
        if c.bottleneck is not None:
            check_int_range("method.bottleneck", c.bottleneck, 1)
        else:
            check_float_range("method.reduction_factor", float(c.reduction_factor), 1.0, float("inf"))
        if c.nonlinearity not in NONLINEARITIES:
            raise ConfigError("method.nonlinearity", f"got {c.nonlinearity!r}; allowed: {', '.join(NONLINEARITIES)}")
        check_float_range("method.init_std", c.init_std, 0.0, 1.0, low_open=True)

    def width(self, dim: int) -> int:
        c = self.config
        return c.bottleneck if c.bottleneck is not None else int(dim // c.reduction_factor)

    def target_names(self, model: nn.Module) -> list[str]:
        """The sublayers' output projections the placement names (no ``targets`` of its own)."""
        return resolve_targets(model, PLACEMENTS[self.config.placement], self.config.layers)

    def plan_layer(self, name: str, module: nn.Module) -> int:
        """The bottleneck width for this sublayer; it must fit."""
        dim, _ = linear_shape(module)
        width = self.width(dim)
        if not 1 <= width <= dim:
            key = "method.bottleneck" if self.config.bottleneck is not None else "method.reduction_factor"
            raise ConfigError(key, f"gives bottleneck {width} for {name} (d={dim}); "
                              "allowed: 1 <= bottleneck <= d")
        return width

    def make_layer(self, base: nn.Module, width: int) -> BottleneckAdapterLayer:
        return BottleneckAdapterLayer(base, width, self.config.nonlinearity, self.config.init_std)

    def saved_for_backward(self, layer: BottleneckAdapterLayer) -> SavedForBackward:
        """The sublayer's output h (its input), and the bottleneck's activation, plus its
        pre-activation unless ReLU / tanh (whose gradient reads the output)."""
        dim, m = layer.up.out_features, layer.bottleneck
        keeps_pre_activation = self.config.nonlinearity not in ("relu", "tanh")
        return SavedForBackward(reads_input=False, elements=dim + m * (2 if keeps_pre_activation else 1))

    def expected_trainable(self, model: nn.Module) -> int:
        total = 0
        for layer in self.layers(model).values():
            dim, m = layer.up.out_features, layer.bottleneck
            total += 2 * dim * m + m + dim  # down (m×d + m), up (d×m + d)
        return total

    def summary(self, model: nn.Module) -> dict:
        layers = self.layers(model)
        return {"modules": sorted(layers), "placement": self.config.placement,
                "bottleneck": {n: layer.bottleneck for n, layer in sorted(layers.items())}}
