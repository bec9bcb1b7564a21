"""rsLoRA: LoRA with the rank-stabilized scale s = α/√r (Kalajdzievski 2023, arXiv:2312.03732).

With s = α/r the update's magnitude shrinks as r grows, so large ranks learn
no better than small ones; α/√r keeps the learning dynamics rank-independent.
Everything else is :mod:`peftlab.methods.lora`.
"""
from __future__ import annotations

from dataclasses import dataclass

from peftlab.methods.lora import LoRA, LoRAConfig


@dataclass
class RSLoRAConfig(LoRAConfig):
    name: str = "rslora"
    rslora: bool = True  # s = alpha / sqrt(r)


class RSLoRA(LoRA):
    name = "rslora"
    config_class = RSLoRAConfig
