"""BitFit: train only the bias terms (Ben Zaken et al. 2022, arXiv:2106.10199).

Every ``module.bias`` parameter of the base trains — attention, FFN and
LayerNorm biases — plus the task head, which every method trains. A model
without biases (Llama-style models such as SmolLM2) is refused: a silent
head-only run would be mislabelled as BitFit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from peftlab.errors import ConfigError
from peftlab.methods.base import Method, MethodConfig, freeze


@dataclass
class BitFitConfig(MethodConfig):
    name: str = "bitfit"


def _biases(model: nn.Module, head: set[str]) -> dict[str, nn.Parameter]:
    found = {}
    for module_name, module in model.named_modules():
        bias = getattr(module, "bias", None)
        name = f"{module_name}.bias" if module_name else "bias"
        if isinstance(bias, nn.Parameter) and name not in head:
            found[name] = bias
    return found


class BitFit(Method):
    name = "bitfit"
    config_class = BitFitConfig
    has_weight_delta = False  # it moves biases, not weight matrices: no ΔW spectrum
    gradient_reaches_every_block = True  # biases in every block and in the embeddings' LayerNorm
    gradient_reaches_embeddings = True
    memory_approximate = False

    def check(self, model: nn.Module, arch: Any = None) -> None:
        self._head = set(getattr(arch, "head_parameters", ()) or ())
        if not _biases(model, self._head):
            model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise ConfigError(
                "method",
                f"bitfit needs bias parameters, and this {model_type} model has none; "
                "allowed: a model with biases (e.g. minilm) or another method",
            )

    def apply(self, model: nn.Module, arch: Any = None) -> nn.Module:
        self.check(model, arch)
        biases = _biases(model, self._head)
        freeze(model)
        for p in biases.values():
            p.requires_grad_(True)
        return model

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return _biases(model, getattr(self, "_head", set()))

    def expected_trainable(self, model: nn.Module) -> int:
        # one bias per output feature of every biased module (Linear: out, LayerNorm: hidden)
        total = 0
        for module_name, module in model.named_modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter) and f"{module_name}.bias" not in getattr(self, "_head", set()):
                weight = getattr(module, "weight", None)
                total += weight.shape[0] if weight is not None and weight.dim() >= 1 and not hasattr(module, "nf") else bias.numel()
        return total
