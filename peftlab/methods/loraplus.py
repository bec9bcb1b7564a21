"""LoRA+: LoRA with a larger learning rate for B (Hayou et al. 2024, arXiv:2402.12354).

    y = W0 x + s · B A x          (exactly :mod:`peftlab.methods.lora`)
    lr(A) = lr,   lr(B) = lr · λ  (λ = ``lr_ratio``, paper default 2⁴ = 16)

With one learning rate for A and B, feature learning in wide models is
inefficient (B, initialised at 0, moves too slowly); the paper sets B's rate
λ times A's. The only change from LoRA is :meth:`LoRAPlus.param_groups`,
which the trainer calls like any method's: group ``lora_A`` at ``lr`` and
group ``lora_B`` at ``lr · lr_ratio``, both with the weight decay given.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from peftlab.errors import ConfigError
from peftlab.methods.base import count
from peftlab.methods.lora import LoRA, LoRAConfig


@dataclass
class LoRAPlusConfig(LoRAConfig):
    name: str = "loraplus"
    lr_ratio: float = 16.0  # lr(B) / lr(A) (paper: 2^4 works across models and tasks)


class LoRAPlus(LoRA):
    """LoRA trained with two optimizer groups: A at lr, B at lr · lr_ratio."""

    name = "loraplus"
    config_class = LoRAPlusConfig

    def validate_config(self) -> None:
        super().validate_config()
        ratio = self.config.lr_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
            raise ConfigError("method.lr_ratio", f"got {ratio!r}; allowed: a number > 0 (paper: 16)")

    def _split(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by the role the layers declare: lora_A and lora_B."""
        groups: dict[str, list[nn.Parameter]] = {"lora_A": [], "lora_B": []}
        for layer in self.layers(model).values():
            for role, param in layer.adapter_parameters().items():
                if param.requires_grad:
                    groups[role].append(param)
        return groups

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        multiplier = {"lora_A": 1.0, "lora_B": float(self.config.lr_ratio)}
        groups = [
            {"name": role, "params": params, "lr": lr * multiplier[role], "weight_decay": weight_decay}
            for role, params in self._split(model).items()
        ]
        self._resolved = [  # what summary() reports: the groups the optimizer really got
            {"name": g["name"], "tensors": len(g["params"]), "parameters": count(g["params"]),
             "lr": g["lr"], "weight_decay": g["weight_decay"]}
            for g in groups
        ]
        return groups

    def summary(self, model: nn.Module) -> dict:
        resolved = getattr(self, "_resolved", None)
        if resolved is None:  # param_groups not called yet: the split, without learning rates
            resolved = [{"name": role, "tensors": len(params), "parameters": count(params), "lr": None,
                         "weight_decay": None} for role, params in self._split(model).items()]
        return {**super().summary(model), "lr_ratio": float(self.config.lr_ratio), "param_groups": resolved}
