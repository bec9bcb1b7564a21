"""The method registry: name -> class. Add a method by adding one file and one line here."""
from __future__ import annotations

from peftlab.errors import ConfigError
from peftlab.methods.base import Method, MethodConfig, WeightDeltaLayer
from peftlab.methods.bitfit import BitFit
from peftlab.methods.full import Full
from peftlab.methods.lora import LoRA
from peftlab.methods.rslora import RSLoRA
from peftlab.methods.dora import DoRA
from peftlab.methods.vera import VeRA
from peftlab.methods.ia3 import IA3
from peftlab.methods.loraplus import LoRAPlus
from peftlab.methods.adalora import AdaLoRA
from peftlab.methods.loha import LoHa
from peftlab.methods.lokr import LoKr
from peftlab.methods.qlora import QLoRA
from peftlab.methods.adapter import BottleneckAdapter
from peftlab.methods.prefix import PrefixTuning
from peftlab.methods.prompt import PromptTuning

METHODS: dict[str, type[Method]] = {
    "full": Full,
    "lora": LoRA,
    "rslora": RSLoRA,
    "bitfit": BitFit,
    "dora": DoRA,
    "vera": VeRA,
    "ia3": IA3,
    "loraplus": LoRAPlus,
    "adalora": AdaLoRA,
    "loha": LoHa,
    "lokr": LoKr,
    "qlora": QLoRA,
    "adapter": BottleneckAdapter,
    "prefix": PrefixTuning,
    "prompt": PromptTuning,
}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError("method", f"unknown method {name!r}; allowed: {', '.join(sorted(METHODS))}")
    return METHODS[name]


__all__ = ["METHODS", "Method", "MethodConfig", "WeightDeltaLayer", "method_class"]
