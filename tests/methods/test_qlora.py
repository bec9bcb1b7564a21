"""QLoRA beyond the shared contract.

forward == x · dequant(W)ᵀ + b + s·BA x with an NF4 dequantization written out here; every
block linear is quantized; identity against the quantized base; 8-bit and bf16 bounds; merge
refused, export_merged == the quantized + adapter model; bad input. Tests that quantize need
bitsandbytes (``requires_bitsandbytes``); the config checks run without it.
"""
from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import batch, logits, make, requires_bitsandbytes, tiny_bert, tiny_gpt2, tiny_llama
from peftlab.errors import ConfigError
from peftlab.methods.base import base_weight, count
from peftlab.models.targets import block_modules


@torch.no_grad()
def perturb(method, model, scale: float = 0.1, seed: int = 7):
    generator = torch.Generator().manual_seed(seed)
    for p in method.trainable_parameters(model).values():
        p.add_(torch.randn(p.shape, generator=generator) * scale)


NF4_PAPER = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
             0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]  # arXiv:2305.14314, Appendix E


def dequantize_nf4_by_hand(layer) -> torch.Tensor:
    """W = code[nibble] · absmax[block]; absmax itself 8-bit quantized (double quantization)."""
    state = layer.weight.quant_state
    packed = layer.weight.data.view(torch.uint8).reshape(-1)
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()  # high nibble first
    absmax = state.absmax
    if state.nested:
        block = torch.arange(absmax.numel()) // state.state2.blocksize
        absmax = state.state2.code[absmax.long()] * state.state2.absmax[block] + state.offset
    values = state.code[nibbles].view(-1, state.blocksize) * absmax.float().unsqueeze(1)
    return values.reshape(-1)[: state.shape.numel()].view(state.shape)


@requires_bitsandbytes
def test_qlora_forward_is_dequantized_base_plus_lora_branch():
    method = make("qlora", r=4, targets=["q", "v", "down"], compute_dtype="float32")
    model = method.apply(tiny_llama())
    perturb(method, model)
    layers = method.layers(model)
    assert len(layers) == 6
    torch.manual_seed(0)
    for layer in layers.values():
        state = layer.base.weight.quant_state
        assert state.quant_type == "nf4" and state.nested  # NF4 with double quantization
        torch.testing.assert_close(state.code, torch.tensor(NF4_PAPER), atol=1e-4, rtol=0)
        w0 = dequantize_nf4_by_hand(layer.base)
        torch.testing.assert_close(base_weight(layer.base), w0, atol=0, rtol=0)
        x = torch.randn(3, 5, layer.shape[1])
        lora = F.linear(F.linear(x, layer.lora_A), layer.lora_B) * layer.scaling
        torch.testing.assert_close(layer(x), x @ w0.t() + lora, atol=1e-5, rtol=1e-5)


@requires_bitsandbytes
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_qlora_quantizes_every_block_linear(quant_type, double_quant):
    import bitsandbytes as bnb

    base = tiny_llama()
    method = make("qlora", r=4, targets=["q", "v"], quant_type=quant_type, double_quant=double_quant)
    model = method.apply(copy.deepcopy(base))
    linear = block_modules(base)
    assert len(linear) == 14  # 2 blocks × (q k v o gate up down)
    for name in linear:
        module = model.get_submodule(name)
        quantized = module.base if name in method.layers(model) else module
        assert isinstance(quantized, bnb.nn.Linear4bit), name
        assert quantized.weight.quant_state.quant_type == quant_type
        assert quantized.weight.quant_state.nested == double_quant
        assert quantized.compute_dtype == torch.bfloat16  # the paper's compute dtype, the default
    assert sorted(method.layers(model)) == sorted(n for n in linear if n.endswith(("q_proj", "v_proj")))
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.embed_tokens) is torch.nn.Embedding
    assert count(method.trainable_parameters(model)) == method.expected_trainable(model) == 2 * 4 * (32 + 32 + 16 + 32)
    # 64-weight blocks (paper) where 64 divides the row; 32 on CPU for the 32-wide rows (see qlora.block_size)
    assert model.model.layers[0].mlp.down_proj.weight.quant_state.blocksize == 64
    assert model.model.layers[0].mlp.up_proj.weight.quant_state.blocksize == 32
    assert method.summary(model)["quant_type"] == quant_type and method.summary(model)["block_sizes"] == [32, 64]


@requires_bitsandbytes
def test_qlora_refuses_rows_the_cpu_kernel_cannot_scale():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(  # 48-wide rows: neither 64 nor 32 divides them
        vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))
    method = make("qlora", r=4)
    with pytest.raises(ConfigError, match=r"^method.bits: a 4-bit base on CPU needs layer widths that are multiples of 32"):
        method.apply(model)
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in block_modules(model))  # nothing changed
    assert all(p.requires_grad for p in model.parameters())
    make("qlora", r=4, bits=8).apply(model)  # int8 has per-row scales: fine


@requires_bitsandbytes
def test_qlora_is_identity_on_the_quantized_base():
    from peftlab.methods.qlora import quantize

    base = tiny_llama()
    inputs = batch()
    quantized = quantize(copy.deepcopy(base), compute_dtype=torch.float32)
    method = make("qlora", r=4, compute_dtype="float32")
    adapted = method.apply(copy.deepcopy(base))
    torch.testing.assert_close(logits(adapted, inputs), logits(quantized, inputs), atol=0, rtol=0)
    assert logits(adapted, inputs).sub(logits(base, inputs)).abs().max() > 1e-4  # quantization is real


@requires_bitsandbytes
def test_qlora_bf16_compute_within_bf16_rounding():
    method = make("qlora", r=4, targets=["q", "down"])  # compute_dtype: bfloat16 (default)
    model = method.apply(tiny_llama())
    perturb(method, model)
    torch.manual_seed(0)
    for layer in method.layers(model).values():
        x = torch.randn(3, 5, layer.shape[1])
        w = base_weight(layer.base) + layer.delta_weight()
        # x and dequant(W) are rounded to bf16 (2^-9 relative each) and so is the output (2^-9):
        # the error is bounded by ~3·2^-9 of the sum of |products|; 2^-7 leaves margin.
        bound = 2.0 ** -7 * (x.abs() @ base_weight(layer.base).abs().t())
        assert ((layer(x) - F.linear(x, w)).abs() <= bound + 1e-6).all()


@requires_bitsandbytes
def test_qlora_8bit_base_within_int8_activation_rounding():
    import bitsandbytes as bnb

    method = make("qlora", r=4, bits=8, targets=["q", "v"])
    model = method.apply(tiny_llama())
    perturb(method, model)
    torch.manual_seed(0)
    for layer in method.layers(model).values():
        assert isinstance(layer.base, bnb.nn.Linear8bitLt)
        x = torch.randn(3, 5, layer.shape[1])
        w0 = base_weight(layer.base)  # int8 weight · row scale / 127
        # LLM.int8 also rounds each activation row to int8 (step max|x_row|/127, after an fp16 cast):
        # per output the error is at most half a step times Σ|W0| (doubled for the fp16 cast and fp32 sums).
        step = x.abs().amax(-1, keepdim=True) / 127
        bound = step * w0.abs().sum(1)
        assert ((layer(x) - F.linear(x, w0 + layer.delta_weight())).abs() <= bound).all()


@requires_bitsandbytes
@pytest.mark.parametrize("tiny", [tiny_llama, tiny_bert, tiny_gpt2], ids=["llama", "bert", "gpt2"])
def test_qlora_refuses_merge_and_exports_a_merged_copy(tiny):
    import bitsandbytes as bnb

    method = make("qlora", r=4, targets=["q", "v", "up"], compute_dtype="float32")
    model = method.apply(tiny())
    perturb(method, model)
    inputs = batch()
    expected = logits(model, inputs)
    with pytest.raises(RuntimeError, match="cannot merge into a 4-bit base.*export_merged"):
        method.merge(model)
    exported = method.export_merged(model, torch.float32)
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in exported.modules())
    assert not method.layers(exported)
    assert not any(p.requires_grad for p in exported.parameters())
    torch.testing.assert_close(logits(exported, inputs), expected, atol=1e-5, rtol=1e-5)
    assert method.layers(model) and isinstance(next(iter(method.layers(model).values())).base, bnb.nn.Linear4bit)
    exported_bf16 = method.export_merged(model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in exported_bf16.parameters())
    # bf16 weights and activations through 2 blocks: relative error of a few 2^-8
    torch.testing.assert_close(logits(exported_bf16, inputs).float(), expected, atol=5e-2, rtol=5e-2)


def test_qlora_without_bitsandbytes_fails_in_config(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(ConfigError, match=r"^method: qlora needs bitsandbytes.*allowed: pip install bitsandbytes"):
        make("qlora")


@pytest.mark.parametrize("key,value", [("bits", 3), ("quant_type", "int4"), ("compute_dtype", "float8"), ("r", 0)])
def test_qlora_bad_config(key, value):
    with pytest.raises(ConfigError, match=f"^method.{key}: got"):
        make("qlora", **{key: value})
