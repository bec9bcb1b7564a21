"""QLoRA: LoRA over a base whose block linear layers are quantized by bitsandbytes.

    x ──► base: dequant(W_NF4) (frozen, 4-bit) ──────────────┐
    │                                                        (+)──► y
    └──► dropout ──► A (r×in) ──► B (out×r) ──► ×s ───────────┘

    y = dequant(W0_NF4) x + s · B A dropout(x)         (Dettmers et al. 2023, arXiv:2305.14314)

Every linear layer inside the repeated blocks (targets or not, as in the paper)
becomes a bitsandbytes ``Linear4bit``: NF4 (``quant_type=nf4``; ``fp4`` for the
paper's comparison) in blocks of 64 weights (see :func:`block_size` for CPU) with
double quantization of the block scales (``double_quant``), the matmul run in
``compute_dtype`` (the paper: bfloat16; bitsandbytes also casts a layer's bias to
it on the first call).
``bits=8`` uses ``Linear8bitLt`` (LLM.int8, outlier threshold 6.0) instead;
``compute_dtype`` applies to 4-bit only. Embeddings, norms and the head stay
as they are. The LoRA layers are :class:`peftlab.methods.lora.LoRALayer`
(fp32 parameters, computed in the activations' dtype), init as LoRA (B = 0).

W0 is the *dequantized* weight: ``delta_weight()`` = s·BA is measured against
it, and the adapted model equals the quantized base at init — not the fp32
model it was quantized from, so ``identity_at_init`` is False here (the
contract's identity test compares with the unquantized model; this file's
tests check identity against the quantized base).

Merging into a 4-bit base is refused: ``export_merged(model, dtype)`` returns
a dequantized copy with W0 + ΔW folded into plain ``nn.Linear`` layers.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftlab.errors import ConfigError
from peftlab.methods.base import base_weight, freeze, is_conv1d, is_meta, linear_shape, replace_module
from peftlab.methods.lora import LoRA, LoRAConfig, LoRALayer
from peftlab.models.targets import block_modules

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANT_TYPES = ("nf4", "fp4")
INT8_THRESHOLD = 6.0  # LLM.int8 outlier threshold (bitsandbytes / transformers default)


def require_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as err:
        raise ConfigError(
            "method", f"qlora needs bitsandbytes, which cannot be imported ({err}); "
            "allowed: pip install bitsandbytes (>= 0.45; CPU and CUDA), or method=lora",
        ) from None
    return bitsandbytes


@dataclass
class QLoRAConfig(LoRAConfig):
    name: str = "qlora"
    r: int = 64                      # paper: r=64 on all linear layers
    alpha: float = 16.0              # paper: alpha=16
    dropout: float = 0.1             # paper: 0.1 up to 13B, 0.05 for 33B/65B
    targets: Any = field(default_factory=lambda: ["all-linear"])  # paper: every linear layer of the blocks
    bits: int = 4                    # 4 (Linear4bit) | 8 (Linear8bitLt, LLM.int8)
    quant_type: str = "nf4"          # 4-bit data type: nf4 (paper) | fp4
    double_quant: bool = True        # quantize the block scales again (paper: saves ~0.37 bit/param)
    compute_dtype: str = "bfloat16"  # 4-bit matmul dtype: bfloat16 (paper) | float32 | float16


def block_size(in_features: int, device: torch.device) -> int:
    """Elements per 4-bit quantization block: 64, the paper's.

    bitsandbytes 0.50's CPU dequantize kernel reads the block scales row by row, so
    on CPU a row width (in_features) that is not a multiple of the block size gets
    the wrong scales (forward and dequantize alike). There we use 32 where 64 does
    not divide the width (tiny test models), and refuse widths 32 does not divide.
    Real models' widths (576, 384, 1536, ...) are multiples of 64.
    """
    if device.type != "cpu" or in_features % 64 == 0:
        return 64
    if in_features % 32 == 0:
        return 32
    raise ConfigError("method.bits", f"a 4-bit base on CPU needs layer widths that are multiples of 32 "
                      f"(bitsandbytes' CPU kernel); got in_features={in_features}; allowed: bits=8, CUDA, or lora")


def quantize_linear(module: nn.Module, bits: int, quant_type: str, double_quant: bool,
                    compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes copy of a linear-like module, quantized on the module's device."""
    bnb = require_bitsandbytes()
    out_features, in_features = linear_shape(module)
    weight = module.weight.detach()
    weight = weight.t().contiguous() if is_conv1d(module) else weight  # (out, in)
    has_bias = module.bias is not None
    if bits == 4:
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=has_bias, compute_dtype=compute_dtype,
                                  compress_statistics=double_quant, quant_type=quant_type, device="meta")
        layer.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type=quant_type,
                                         blocksize=block_size(in_features, weight.device),
                                         compress_statistics=double_quant, module=layer)
        # bitsandbytes' AVX512-BF16 CPU path repacks the weight in place on the first no-grad eval
        # call: it asserts out_features % 32 == 0 and computes in bf16, so W0 would no longer be the
        # dequantized weight. The plain dequantize-then-matmul path keeps forward == x·dequant(W)ᵀ.
        layer.support_avx512bf16_for_cpu = False
    else:
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=has_bias, has_fp16_weights=False,
                                    threshold=INT8_THRESHOLD, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = nn.Parameter(module.bias.detach().clone().cpu(), requires_grad=False)
    return layer.to(weight.device)  # .to() quantizes


def quantize(model: nn.Module, bits: int = 4, quant_type: str = "nf4", double_quant: bool = True,
             compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every linear-like module inside the blocks by its bitsandbytes copy, in place."""
    for name in block_modules(model):
        replace_module(model, name, quantize_linear(model.get_submodule(name), bits, quant_type,
                                                    double_quant, compute_dtype))
    return model


def is_quantized(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return getattr(weight, "quant_state", None) is not None or getattr(weight, "SCB", None) is not None


class QLoRA(LoRA):
    """LoRA over a 4-bit (or 8-bit) quantized base (Dettmers et al. 2023); see the module docstring."""

    name = "qlora"
    config_class = QLoRAConfig
    mergeable = False         # no merge into a 4-bit weight; see export_merged
    identity_at_init = False  # equals the *quantized* base at init, not the fp32 model (module docstring)

    def validate_config(self) -> None:
        super().validate_config()
        c = self.config
        if c.bits not in (4, 8):
            raise ConfigError("method.bits", f"got {c.bits!r}; allowed: 4, 8")
        if c.quant_type not in QUANT_TYPES:
            raise ConfigError("method.quant_type", f"got {c.quant_type!r}; allowed: {', '.join(QUANT_TYPES)}")
        if c.compute_dtype not in COMPUTE_DTYPES:
            allowed = ", ".join(COMPUTE_DTYPES)
            raise ConfigError("method.compute_dtype", f"got {c.compute_dtype!r}; allowed: {allowed}")
        require_bitsandbytes()

    def plan(self, model: nn.Module) -> dict[str, int]:
        plan = super().plan(model)
        self.check_quantizable(model)
        return plan

    def prepare(self, model: nn.Module, plan: dict[str, int]) -> None:
        """Quantize every linear layer of the blocks (targets or not) before the LoRA layers wrap
        them. A shapes-only (meta) model is left as it is: bitsandbytes quantizes values, and the
        estimate counts the 4-bit bytes from :meth:`base_quantization`."""
        if not is_meta(model):
            c = self.config
            quantize(model, c.bits, c.quant_type, c.double_quant, COMPUTE_DTYPES[c.compute_dtype])

    def check_quantizable(self, model: nn.Module) -> None:
        if self.config.bits == 4:
            for name in block_modules(model):
                module = model.get_submodule(name)
                block_size(linear_shape(module)[1], module.weight.device)

    def base_quantization(self) -> tuple[str, bool]:
        c = self.config
        return ("int8", False) if c.bits == 8 else (c.quant_type, c.double_quant)

    def merge(self, model: nn.Module) -> None:
        raise RuntimeError(f"qlora: cannot merge into a {self.config.bits}-bit base weight; "
                           "use QLoRA.export_merged(model, dtype) for a dequantized, merged copy")

    unmerge = merge

    @torch.no_grad()
    def export_merged(self, model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
        """A copy with every quantized layer dequantized and W0 + ΔW folded in: plain nn.Linear, ``dtype``."""
        merged = copy.deepcopy(model)
        lora_names = {n for n, m in merged.named_modules() if isinstance(m, LoRALayer)}
        folded = {}
        for name, module in merged.named_modules():
            if name in lora_names:  # W0 + ΔW, W0 dequantized
                folded[name] = (base_weight(module.base) + module.delta_weight(), module.base.bias)
            elif is_quantized(module) and name.rpartition(".")[0] not in lora_names:  # a quantized non-target
                folded[name] = (base_weight(module), module.bias)
        for name, (weight, bias) in folded.items():
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias.float())
            replace_module(merged, name, linear)
        freeze(merged)
        return merged.to(dtype)

    def summary(self, model: nn.Module) -> dict:
        c = self.config
        states = [getattr(getattr(m, "weight", None), "quant_state", None) for m in model.modules()]
        sizes = {state.blocksize for state in states if state is not None}  # 4-bit block sizes (see block_size)
        return {**super().summary(model), "bits": c.bits, "quant_type": c.quant_type if c.bits == 4 else "int8",
                "double_quant": c.double_quant, "compute_dtype": c.compute_dtype, "block_sizes": sorted(sizes)}
