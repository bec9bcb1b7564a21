"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353).

    x ──► base (W0 x + b, frozen) ──► − b ───────────┐
    │                                               (+) ──► ×(m / ‖W0 + sBA‖_row) ──► + b ──► y
    └──► dropout ──► A (r×in) ──► ×s ──► B (out×r) ──┘

    W' = m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖_row        ‖·‖_row: L2 norm of each output row
    y  = (m / ‖W0 + s·B A‖_row) ⊙ (W0 x + s·B A x) + b

The direction (W0 + sBA, normalised per output feature, i.e. over the input
dimension as in the paper's code and peft) is learned by LoRA factors; the
magnitude m (out,) is a separate trainable vector. Init: A, B as LoRA (B = 0)
and m = ‖W0‖_row, so W' = W0 at step 0.

The norm is detached by default (``detach_norm: true``, the paper's §4.3
memory-saving variant, as peft does): it follows ΔW's value but passes no
gradient. ``detach_norm: false`` keeps its gradient.

Cost: the base output W0 x is reused (one matmul with W0 per forward, as
LoRA); only in training with dropout does W0 dropout(x) need its own matmul
(y = W0 x + b + (m/n − 1) ⊙ W0 x' + (m/n) ⊙ sBA x', as peft). The norm is computed without forming the (out, in) sum W0 + sBA::

    ‖w_i + s(BA)_i‖² = ‖w_i‖² + 2 (W0 Aᵀ)_i · (sB)_i + (sB)_i (A Aᵀ) (sB)_iᵀ

i.e. one (out, in) × (in, r) product, an r×r Gram matrix and row norms of W0,
computed in fp32; ``delta_weight()`` (analysis, merging) forms W' explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.methods.base import SavedForBackward, base_weight, is_conv1d
from peftlab.methods.lora import LoRA, LoRAConfig, LoRALayer


@dataclass
class DoRAConfig(LoRAConfig):
    name: str = "dora"
    detach_norm: bool = True  # treat ‖W0 + sBA‖ as a constant in backward (paper §4.3, peft)


class DoRALayer(LoRALayer):
    """y = (m / ‖W0 + sBA‖_row) ⊙ (W0 x + s·B A x) + b; ΔW = W' − W0 (see module docstring)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, init: str = "kaiming", detach_norm: bool = True):
        super().__init__(base, r, alpha, dropout, rslora, init)
        self.detach_norm = detach_norm
        with torch.no_grad():  # B = 0 here, so this is ‖W0‖_row: W' = W0 at init
            self.magnitude = nn.Parameter(self.weight_norm().float())  # (out,), fp32

    def frozen_weight(self) -> torch.Tensor:
        """W0 as (out, in), also while merged; storage dtype when it is a float, else dequantized fp32."""
        if self.merged:
            weight = self._original_weight
            return weight.t() if is_conv1d(self.base) else weight
        weight = self.base.weight
        if weight.dtype.is_floating_point and getattr(weight, "quant_state", None) is None:
            return weight.detach().t() if is_conv1d(self.base) else weight.detach()
        return base_weight(self.base)

    def weight_norm(self) -> torch.Tensor:
        """‖W0 + s·B A‖ per output row, (out,) in fp32 (fp64 for a float64 model), without forming the sum."""
        w0 = self.frozen_weight()                                   # (out, in)
        a, b = self.lora_A, self.lora_B                             # (r, in), (out, r)
        if self.detach_norm:
            a, b = a.detach(), b.detach()
        acc = torch.promote_types(w0.dtype, torch.float32)  # fp32, or fp64 for a float64 model
        a, b = a.to(acc), b.to(acc) * self.scaling
        w0_sq = torch.linalg.vector_norm(w0, dim=1, dtype=acc).square()    # ‖w_i‖², (out,)
        cross = (F.linear(w0, a.to(w0.dtype)).to(acc) * b).sum(1)          # (W0 Aᵀ)_i · (sB)_i
        delta_sq = ((b @ (a @ a.t())) * b).sum(1)                          # ‖s(BA)_i‖² = (sB)_i AAᵀ (sB)_iᵀ
        return (w0_sq + 2 * cross + delta_sq).clamp_min(0).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # W0 x + b: the one matmul with W0
        if self.merged:
            return out
        return self._adapted(x, out)

    def _adapted(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The DoRA output from ``out`` = base(x), without a second matmul with W0 unless dropout is active."""
        bias = self.base.bias
        scale = (self.magnitude / self.weight_norm()).to(out.dtype)  # m / ‖W0 + sBA‖, (out,)
        if self.training and isinstance(self.dropout, nn.Dropout):
            # x' = dropout(x) ≠ x: y = W0 x + b + (m/n − 1) ⊙ W0 x' + (m/n) ⊙ sBA x' (as peft)
            x = self.dropout(x)
            base_part = self.base(x) if bias is None else self.base(x) - bias  # W0 x', its own matmul
            return out + (scale - 1) * base_part + scale * self._lora(x).to(out.dtype)
        lora = self._lora(x).to(out.dtype)
        if bias is None:
            return scale * (out + lora)
        return scale * (out - bias + lora) + bias

    def _lora(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x, self.lora_A.to(x.dtype)) * self.scaling  # (..., r): scale the narrow side
        return F.linear(hidden, self.lora_B.to(x.dtype))              # (..., out)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x) − base(x) while unmerged (computes base(x) itself; forward() reuses it)."""
        out = self.base(x)
        return self._adapted(x, out) - out

    def factors(self) -> None:
        """None: ΔW = (m/n − 1) ⊙ W0 + (m/n) ⊙ sBA is not low rank; analysis reads delta_weight()."""
        return None

    def delta_weight(self) -> torch.Tensor:
        with torch.no_grad():
            w0 = self.frozen_weight().float()
            b, a = self.lora_B.float() * self.scaling, self.lora_A.float()
            scale = (self.magnitude.float() / self.weight_norm().float()).unsqueeze(1)  # (out, 1)
            return scale * (w0 + b @ a) - w0

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "magnitude": self.magnitude}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, detach_norm={self.detach_norm}"


class DoRA(LoRA):
    """LoRA direction + a trainable magnitude per output feature (Liu et al. 2024)."""

    name = "dora"
    config_class = DoRAConfig
    layer_class = DoRALayer
    memory_approximate = True  # its extra saved tensor follows this file's forward, not a published count

    def make_layer(self, base: nn.Module, rank: int) -> DoRALayer:
        c = self.config
        return DoRALayer(base, rank, c.alpha, c.dropout, c.rslora, c.init, c.detach_norm)

    def expected_trainable(self, model: nn.Module) -> int:
        # A (r×in) + B (out×r) + m (out) per layer
        return sum(layer.r * sum(layer.shape) + layer.shape[0] for layer in self.layers(model).values())

    def saved_for_backward(self, layer: DoRALayer) -> SavedForBackward:
        """LoRA's, plus W0 x + s B A x (out per token) for the magnitude's gradient."""
        lora = super().saved_for_backward(layer)
        return SavedForBackward(dropout=lora.dropout, elements=lora.elements + layer.shape[0])

    def summary(self, model: nn.Module) -> dict:
        return {**super().summary(model), "detach_norm": self.config.detach_norm}
