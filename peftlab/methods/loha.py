"""LoHa: a Hadamard product of two low-rank matrices as the weight update.

    x ──► base (W0, frozen) ─────────────────────────────────────┐
    │                                                           (+)──► y
    └──► F.linear(x, ΔW),  ΔW = s · (W1a W1b) ⊙ (W2a W2b) ───────┘

    W1a, W2a: (out×r)   W1b, W2b: (r×in)   s = α / r

FedPara (Hyeon-Woo et al. 2022, arXiv:2108.06098), as packaged by LyCORIS and
peft's ``LoHaConfig``. With 2r(out+in) parameters the update reaches rank r²,
where LoRA with the same count reaches rank 2r. ΔW is dense in the sense that
its factors are not stored: ``factors()`` is None.

The forward uses whichever of two equal forms is cheaper for the layer:
the materialized ΔW (peft's way), or its rank-r² Khatri-Rao factorization
ΔW = U V with U[o, (p,q)] = W1a[o,p]·W2a[o,q] and V[(p,q), i] = W1b[p,i]·W2b[q,i]
(cheaper when r²(out+in) < out·in, e.g. r = 8 on a 576×576 projection).

Init (peft's ``LoHaLayer.reset_adapter_parameters``, FedPara's He init):
W1a, W1b, W2a kaiming-uniform (a = √5); W2b = 0, so ΔW = 0 at step 0.
Linear and GPT-2 Conv1D bases are both supported (ΔW is built in (out, in)
layout; merging transposes for Conv1D). peft's rank and module dropout are not
implemented.
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
class LoHaConfig(LayerConfig):       # + targets (default q, v) and layers (default: every block)
    name: str = "loha"
    r: int = 8                       # rank of each of the two factors (ΔW reaches rank r²)
    alpha: float = 8.0               # scale s = alpha / r (peft default)


class LoHaLayer(WeightDeltaLayer):
    """y = base(x) + x ΔWᵀ; ΔW = s · (W1a W1b) ⊙ (W2a W2b) (see module docstring)."""

    def __init__(self, base: nn.Module, r: int, alpha: float):
        super().__init__(base)
        out_features, in_features = linear_shape(base)
        device = base.weight.device
        self.r = r
        self.scaling = alpha / r
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, r, device=device))  # (out, r)
        self.hada_w1_b = nn.Parameter(torch.empty(r, in_features, device=device))   # (r, in)
        self.hada_w2_a = nn.Parameter(torch.empty(out_features, r, device=device))  # (out, r)
        self.hada_w2_b = nn.Parameter(torch.zeros(r, in_features, device=device))   # (r, in)
        # Khatri-Rao form costs r²(out+in) per token, the dense one out·in (plus building ΔW)
        self.khatri_rao = r * r * (out_features + in_features) < out_features * in_features
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        nn.init.zeros_(self.hada_w2_b)

    def _dense(self, dtype: torch.dtype) -> torch.Tensor:
        w1 = self.hada_w1_a.to(dtype) @ self.hada_w1_b.to(dtype)  # (out, in)
        w2 = self.hada_w2_a.to(dtype) @ self.hada_w2_b.to(dtype)  # (out, in)
        return w1 * w2 * self.scaling

    def _khatri_rao_factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) with ΔW = s · U V, shapes (out, r²) and (r², in)."""
        a1, a2 = self.hada_w1_a.to(dtype), self.hada_w2_a.to(dtype)
        b1, b2 = self.hada_w1_b.to(dtype), self.hada_w2_b.to(dtype)
        u = (a1[:, :, None] * a2[:, None, :]).flatten(1)  # (out, r, r) -> (out, r²)
        v = (b1[:, None, :] * b2[None, :, :]).flatten(0, 1)  # (r, r, in) -> (r², in)
        return u, v

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        if self.khatri_rao:
            u, v = self._khatri_rao_factors(x.dtype)
            return F.linear(F.linear(x, v), u) * self.scaling  # (..., r²) -> (..., out)
        return F.linear(x, self._dense(x.dtype))  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        with torch.no_grad():
            return self._dense(torch.float32)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"hada_w1_a": self.hada_w1_a, "hada_w1_b": self.hada_w1_b,
                "hada_w2_a": self.hada_w2_a, "hada_w2_b": self.hada_w2_b}

    def extra_repr(self) -> str:
        form = "khatri-rao" if self.khatri_rao else "dense"
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}, forward={form}"


class LoHa(LayerMethod):
    """Low-rank Hadamard product updates of the target linear layers (FedPara / LyCORIS)."""

    name = "loha"
    config_class = LoHaConfig
    mergeable = True
    layer_class = LoHaLayer
    size_key = "r"

    def validate_config(self) -> None:
        c = self.config
        check_int_range("method.r", c.r, 1)
        check_positive("method.alpha", c.alpha)

    def plan_layer(self, name: str, module: nn.Module) -> int:
        """Each factor pair W_a W_b has rank at most min(out, in): a larger r only adds parameters."""
        return check_rank_fits("method.r", self.config.r, name, module)

    def make_layer(self, base: nn.Module, spec: int) -> LoHaLayer:
        return LoHaLayer(base, self.config.r, self.config.alpha)

    def saved_for_backward(self, layer: LoHaLayer) -> SavedForBackward:
        """The input x; in the Khatri-Rao form also V x, the rank-r² intermediate."""
        return SavedForBackward(elements=layer.r * layer.r if layer.khatri_rao else 0)

    def weight_copy_bytes(self, layer: LoHaLayer, compute_bytes: int) -> float:
        """The dense form keeps W1a W1b, W2a W2b and ΔW, each (out, in)."""
        out_features, in_features = layer.shape
        return 0.0 if layer.khatri_rao else 3 * compute_bytes * out_features * in_features

    def expected_trainable(self, model: nn.Module) -> int:
        return sum(2 * layer.r * sum(layer.shape) for layer in self.layers(model).values())

    def summary(self, model: nn.Module) -> dict:
        layers = self.layers(model)
        return {
            "modules": sorted(layers),
            "r": self.config.r,
            "scaling": next(iter(layers.values())).scaling if layers else None,
        }
