"""LoKr: a Kronecker product of a small and a low-rank matrix as the weight update.

    x ──► base (W0, frozen) ───────────────────────────────────┐
    │                                                         (+)──► y
    └──► view (in_m, in_n) ──► W1 · X · W2ᵀ ──► flatten ──► ×s ┘

    ΔW = s · W1 ⊗ W2,   W1: (out_l × in_m),   W2 = W2a W2b: (out_k × in_n),   s = α / r
    out = out_l · out_k,   in = in_m · in_n

LyCORIS (Yeh et al. 2024, arXiv:2309.14859), as peft's ``LoKrConfig``. Each
dimension d is split as d = m · n by :func:`factorization`: with
``decompose_factor = f`` > 0 it is (f, d / f), and f must divide every adapted
dimension; with -1 the two factors closest to √d (m ≤ n). Which factors are
low-rank follows peft's rules: W2 is stored as W2a (out_k×r) W2b (r×in_n) when
r < max(out_k, in_n) / 2, else in full; W1 is full unless ``decompose_both``
and r < max(out_l, in_m) / 2. ΔW is never materialized in the forward:
(W1 ⊗ W2) vec(X) = vec(W1 X W2ᵀ) for X the input viewed as (in_m, in_n).
``factors()`` is None (the update's rank is rank(W1)·rank(W2)).

Init (peft's ``LoKrLayer.reset_adapter_parameters``): W1 = 0 (or W1a = 0),
the other factors kaiming-uniform (a = √5), so ΔW = 0 at step 0. Linear and
GPT-2 Conv1D bases are both supported. peft's rank and module dropout are not
implemented.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.errors import ConfigError
from peftlab.methods.base import (
    LayerConfig,
    LayerMethod,
    SavedForBackward,
    WeightDeltaLayer,
    check_int_range,
    check_positive,
    linear_shape,
)


@dataclass
class LoKrConfig(LayerConfig):       # + targets (default q, v) and layers (default: every block)
    name: str = "lokr"
    r: int = 8                       # rank of the low-rank Kronecker factor(s)
    alpha: float = 8.0               # scale s = alpha / r (peft default)
    decompose_both: bool = False     # also store W1 as a rank-r product when it is large enough
    decompose_factor: int = -1       # split d = (f, d/f); -1 = the two factors closest to sqrt(d)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m · n = dimension: (factor, dimension / factor) for a dividing factor > 0,
    else (factor = -1) the divisor pair closest to √dimension, m ≤ n (peft / LyCORIS rule)."""
    if factor > 0:
        if dimension % factor:
            raise ValueError(f"{factor} does not divide {dimension}")
        return factor, dimension // factor
    m, n = 1, dimension
    while m < n:
        next_m = m + 1
        while dimension % next_m:
            next_m += 1
        m, n = next_m, dimension // next_m
    return (m, n) if m <= n else (n, m)


def _divisors(value: int) -> list[int]:
    return [d for d in range(1, value + 1) if value % d == 0]


class LoKrLayer(WeightDeltaLayer):
    """y = base(x) + s · (W1 ⊗ W2) x, computed as W1 X W2ᵀ (see module docstring)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, decompose_both: bool = False,
                 decompose_factor: int = -1):
        super().__init__(base)
        out_features, in_features = linear_shape(base)
        device = base.weight.device
        self.r = r
        self.scaling = alpha / r
        self.out_l, self.out_k = factorization(out_features, decompose_factor)
        self.in_m, self.in_n = factorization(in_features, decompose_factor)
        self.w1_low_rank = decompose_both and r < max(self.out_l, self.in_m) / 2
        self.w2_low_rank = r < max(self.out_k, self.in_n) / 2
        self.lokr = nn.ParameterDict()

        def new(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, device=device))

        if self.w1_low_rank:
            self.lokr["w1_a"], self.lokr["w1_b"] = new(self.out_l, r), new(r, self.in_m)
        else:
            self.lokr["w1"] = new(self.out_l, self.in_m)
        if self.w2_low_rank:
            self.lokr["w2_a"], self.lokr["w2_b"] = new(self.out_k, r), new(r, self.in_n)
        else:
            self.lokr["w2"] = new(self.out_k, self.in_n)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for role, p in self.lokr.items():
            if role in ("w1", "w1_a"):
                nn.init.zeros_(p)
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def w1(self, dtype: torch.dtype) -> torch.Tensor:  # (out_l, in_m)
        if self.w1_low_rank:
            return self.lokr["w1_a"].to(dtype) @ self.lokr["w1_b"].to(dtype)
        return self.lokr["w1"].to(dtype)

    def w2(self, dtype: torch.dtype) -> torch.Tensor:  # (out_k, in_n)
        if self.w2_low_rank:
            return self.lokr["w2_a"].to(dtype) @ self.lokr["w2_b"].to(dtype)
        return self.lokr["w2"].to(dtype)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        grid = x.reshape(*lead, self.in_m, self.in_n)            # (..., in_m, in_n)
        out = self.w1(x.dtype) @ grid @ self.w2(x.dtype).T       # (..., out_l, out_k)
        return out.reshape(*lead, self.out_l * self.out_k) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        with torch.no_grad():
            return torch.kron(self.w1(torch.float32), self.w2(torch.float32)) * self.scaling

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {f"lokr_{role}": p for role, p in self.lokr.items()}

    def expected_count(self) -> int:
        """Closed form of this layer's trainable parameters."""
        w1 = self.r * (self.out_l + self.in_m) if self.w1_low_rank else self.out_l * self.in_m
        w2 = self.r * (self.out_k + self.in_n) if self.w2_low_rank else self.out_k * self.in_n
        return w1 + w2

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r={self.r}, w1=({self.out_l}, {self.in_m}), "
                f"w2=({self.out_k}, {self.in_n}), scaling={self.scaling:g}")


class LoKr(LayerMethod):
    """Low-rank Kronecker product updates of the target linear layers (LyCORIS)."""

    name = "lokr"
    config_class = LoKrConfig
    mergeable = True
    layer_class = LoKrLayer
    size_key = "r"

    def validate_config(self) -> None:
        c = self.config
        check_int_range("method.r", c.r, 1)
        check_positive("method.alpha", c.alpha)
        if not isinstance(c.decompose_factor, int) or isinstance(c.decompose_factor, bool) or (
            c.decompose_factor != -1 and c.decompose_factor < 1
        ):
            raise ConfigError("method.decompose_factor",
                              f"got {c.decompose_factor!r}; allowed: -1 (automatic) or an integer >= 1")

    def plan(self, model: nn.Module) -> dict[str, None]:
        """Target module names; a decompose_factor must divide every adapted dimension (peft silently
        picks another split)."""
        plan = super().plan(model)
        factor = self.config.decompose_factor
        if factor == -1:
            return plan
        dims = {name: linear_shape(model.get_submodule(name)) for name in plan}
        for name, (out_f, in_f) in dims.items():
            if out_f % factor or in_f % factor:
                common = math.gcd(*(d for shape in dims.values() for d in shape))
                raise ConfigError(
                    "method.decompose_factor",
                    f"got {factor}, which does not divide {name} (out={out_f}, in={in_f}); "
                    f"allowed: -1 or a divisor of every adapted dimension: {_divisors(common)}",
                )
        return plan

    def make_layer(self, base: nn.Module, spec: None) -> LoKrLayer:
        c = self.config
        return LoKrLayer(base, c.r, c.alpha, c.decompose_both, c.decompose_factor)

    def saved_for_backward(self, layer: LoKrLayer) -> SavedForBackward:
        """The input x and W1 X (out_l × in_n per token), the grid between the two Kronecker factors."""
        return SavedForBackward(elements=layer.out_l * layer.in_n)

    def expected_trainable(self, model: nn.Module) -> int:
        return sum(layer.expected_count() for layer in self.layers(model).values())

    def summary(self, model: nn.Module) -> dict:
        layers = self.layers(model)
        return {
            "modules": sorted(layers),
            "kronecker_shapes": {n: {"w1": [layer.out_l, layer.in_m], "w2": [layer.out_k, layer.in_n],
                                     "w1_low_rank": layer.w1_low_rank, "w2_low_rank": layer.w2_low_rank}
                                 for n, layer in sorted(layers.items())},
            "scaling": next(iter(layers.values())).scaling if layers else None,
        }
