"""LoRA: a trainable low-rank update beside a frozen linear layer.

    x ──► base (W0, frozen) ─────────────────────┐
    │                                            (+)──► y
    └──► dropout ──► A (r×in) ──► B (out×r) ──► ×s ┘

    y = W0 x + s · B A dropout(x),   s = α / r        (Hu et al. 2021, arXiv:2106.09685)
                                     s = α / √r       (rsLoRA, Kalajdzievski 2023, arXiv:2312.03732)

Init (as in the paper and peft): B = 0 so ΔW = s·BA = 0 at step 0; A is
kaiming-uniform with a = √5 (``init=kaiming``, nn.Linear's default init) or
N(0, 1/r) (``init=gaussian``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import ConfigError
from peftlab.methods.base import (
    LayerConfig,
    LayerMethod,
    SavedForBackward,
    WeightDeltaLayer,
    check_float_range,
    check_int_range,
    check_positive,
    check_rank_fits,
    linear_shape,
)
from peftlab.models.targets import family_of, target_key

INITS = ("kaiming", "gaussian")


@dataclass
class LoRAConfig(LayerConfig):       # + targets (default q, v) and layers (default: every block)
    name: str = "lora"
    r: int = 8                       # rank of ΔW = BA
    alpha: float = 16.0              # scale s = alpha / r (usually 2*r)
    dropout: float = 0.0             # dropout on the LoRA branch input
    rslora: bool = False             # s = alpha / sqrt(r) instead
    init: str = "kaiming"            # A's init: kaiming | gaussian; B = 0
    rank_pattern: dict = field(default_factory=dict)  # per-target rank override: {v: 16, "re:.*layers\.0\..*": 4}


class LoRALayer(WeightDeltaLayer):
    """y = base(x) + s · B A dropout(x); ΔW = s · B A (see module docstring)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, init: str = "kaiming"):
        super().__init__(base)
        out_features, in_features = linear_shape(base)
        device = base.weight.device
        self.r = r
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device))   # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device))  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "kaiming") -> None:
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        nn.init.zeros_(self.lora_B)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        return F.linear(F.linear(self.dropout(x), a), b) * self.scaling  # (..., out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + s·B A dropout(x), with the add and the scale fused into the second matmul.

        ``addmm(out, h, Bᵀ, alpha=s)`` computes out + s·(h Bᵀ) in one GEMM (beta = 1): no separate
        output-sized passes for ``* s`` and ``+``, forward or backward, where ``branch()`` needs two.
        """
        out = self.base(x)
        if self.merged:
            return out
        h = F.linear(self.dropout(x), self.lora_A.to(x.dtype))  # (..., r)
        b = self.lora_B.to(x.dtype)
        if out.dtype != h.dtype or not out.is_contiguous():  # e.g. a bf16 base under an fp32 branch
            return out + (F.linear(h, b) * self.scaling).to(out.dtype)
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=self.scaling)
        return flat.view(out.shape)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s·B, A): ΔW = (s·B) @ A, shapes (out, r) and (r, in), fp32."""
        return self.lora_B.detach().float() * self.scaling, self.lora_A.detach().float()

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}"


class LoRA(LayerMethod):
    """Low-rank adaptation of the target linear layers (Hu et al. 2021)."""

    name = "lora"
    config_class = LoRAConfig
    mergeable = True
    layer_class = LoRALayer
    size_key = "r"  # budget matching sets r; rank_pattern overrides stay as given
    memory_approximate = False  # its saved tensors were checked against profiler peaks (tests/memory/test_estimate.py)

    def validate_config(self) -> None:
        c = self.config
        check_int_range("method.r", c.r, 1)
        check_positive("method.alpha", c.alpha)
        check_float_range("method.dropout", c.dropout, 0.0, 1.0, high_open=True)
        if c.init not in INITS:
            raise ConfigError("method.init", f"got {c.init!r}; allowed: {', '.join(INITS)}")
        for key, rank in dict(c.rank_pattern).items():
            check_int_range(f"method.rank_pattern.{key}", rank, 1)

    def rank_for(self, family: str, module_name: str) -> int:
        short = target_key(family, module_name)
        for key, rank in dict(self.config.rank_pattern).items():
            if key == short or (key.startswith("re:") and re.fullmatch(key[3:], module_name)):
                return int(rank)
        return self.config.r

    def plan(self, model: nn.Module) -> dict[str, int]:
        """Target module name -> rank; checks every rank fits its layer."""
        family = family_of(model)
        plan = {}
        for name in self.target_names(model):
            rank = self.rank_for(family, name)
            key = "method.r" if rank == self.config.r else "method.rank_pattern"
            plan[name] = check_rank_fits(key, rank, name, model.get_submodule(name))
        return plan

    def make_layer(self, base: nn.Module, rank: int) -> LoRALayer:
        c = self.config
        return LoRALayer(base, rank, c.alpha, c.dropout, c.rslora, c.init)

    def expected_trainable(self, model: nn.Module) -> int:
        return sum(layer.r * sum(layer.shape) for layer in self.layers(model).values())

    # ---- memory terms -------------------------------------------------------- #
    def saved_for_backward(self, layer: LoRALayer) -> SavedForBackward:
        """A x (r per token) for B's gradient; with dropout its own dropped x and mask, else the shared x."""
        return SavedForBackward(dropout=self.config.dropout > 0, elements=layer.r)

    def weight_copy_bytes(self, layer: LoRALayer, compute_bytes: int) -> float:
        """A and B are fp32, cast to a 16-bit compute dtype on every use (the casts are kept for backward)."""
        return compute_bytes * layer.r * sum(layer.shape) if compute_bytes < 4 else 0.0

    def summary(self, model: nn.Module) -> dict:
        layers = self.layers(model)
        return {
            "modules": sorted(layers),
            "ranks": {n: layer.r for n, layer in sorted(layers.items())},
            "scaling": next(iter(layers.values())).scaling if layers else None,
        }
