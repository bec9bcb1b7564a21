"""`peftlab estimate`: closed-form counts, the Llama-2-7B sanity table, measured peaks, bad input."""
from __future__ import annotations

import json
import sys
import subprocess
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from peftlab.errors import ConfigError
from peftlab.memory.estimate import (
    GB,
    KNOWN_METHODS,
    LLAMA2_7B_REFERENCE,
    PARTS,
    as_shape,
    bias_parameters,
    count_parameters,
    estimate,
    head_parameters,
    list_presets,
    load_arch,
    load_config,
    quantizable_parameters,
    trainable_parameters,
)
from peftlab.memory.cli import build_estimate, estimate_main, parse_overrides

PRESETS = ["llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "mistral-7b", "qwen2.5-7b",
           "roberta-base", "roberta-large", "minilm", "smollm2-135m"]


def meta_count(config, kind: str) -> int:
    """Parameters of a transformers model built on the meta device (no memory, no weights)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = {"base": AutoModel, "causal_lm": AutoModelForCausalLM, "classification": AutoModelForSequenceClassification}
    with torch.device("meta"):
        model = cls[kind].from_config(config)
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- #
# Presets and closed-form parameter counts
# --------------------------------------------------------------------------- #
def test_every_preset_is_shipped():
    assert list_presets() == sorted(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_closed_form_count_equals_the_meta_device_model(name):
    config = load_config(name)
    shape = load_arch(name)
    kinds = ["base", "causal_lm"] if shape.is_decoder else ["base", "classification"]
    for kind in kinds:
        assert count_parameters(shape, kind) == meta_count(config, kind), kind


def test_published_sizes():
    assert count_parameters(load_arch("llama-2-7b")) == 6_738_415_616
    assert count_parameters(load_arch("smollm2-135m")) == 134_515_008  # tied embeddings
    assert count_parameters(load_arch("minilm"), "base") == 22_713_216
    assert count_parameters(load_arch("qwen2.5-7b")) == 7_615_616_512  # q, k, v biases


@pytest.mark.parametrize("model_type,extra", [
    ("llama", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False)),
    ("qwen2", dict(tie_word_embeddings=False)),
    ("qwen3", dict(head_dim=24, tie_word_embeddings=True)),
    ("mistral", dict()),
    ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    ("bert", dict(num_labels=3)),
    ("roberta", dict(num_labels=5, type_vocab_size=1)),
])
def test_closed_forms_cover_biases_heads_and_families(model_type, extra):
    from transformers import AutoConfig

    sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=300)
    if model_type in ("llama", "qwen2", "qwen3", "mistral"):
        sizes["num_key_value_heads"] = 2
    config = AutoConfig.for_model(model_type, **({} if model_type == "gpt2" else sizes), **extra)
    if model_type == "gpt2":
        config.vocab_size = 300
    shape = as_shape(config)
    kinds = ["base", "causal_lm"] if shape.is_decoder else ["base", "classification"]
    for kind in kinds:
        assert count_parameters(shape, kind) == meta_count(config, kind), kind


def test_bias_and_quantizable_counts_on_a_real_model():
    from transformers import AutoModel

    config = load_config("minilm")
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    shape = load_arch("minilm")
    biases = sum(m.bias.numel() for m in model.modules() if isinstance(getattr(m, "bias", None), torch.nn.Parameter))
    assert bias_parameters(shape) == biases
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layer." in n)
    assert quantizable_parameters(shape) == linear


# --------------------------------------------------------------------------- #
# Trainable counts per method
# --------------------------------------------------------------------------- #
def test_lora_count_is_r_times_in_plus_out_summed():
    shape = load_arch("smollm2-135m")  # q: 576 -> 576, v: 576 -> 192 (3 kv heads × 64)
    assert trainable_parameters(shape, "lora", {"r": 8, "targets": ["q", "v"]}) == 30 * 8 * ((576 + 576) + (576 + 192))
    r16 = 16 * ((576 + 576) + 2 * (576 + 192) + (576 + 576) + 2 * (576 + 1536) + (1536 + 576))
    assert trainable_parameters(shape, "lora", {"r": 16, "targets": "all-linear"}) == 30 * r16
    assert trainable_parameters(shape, "lora", {"r": 8, "targets": ["q"], "layers": "0-3"}) == 4 * 8 * 1152
    assert trainable_parameters(shape, "lora", {"r": 8, "targets": ["q", "v"], "rank_pattern": {"v": 2}}) == \
        30 * (8 * 1152 + 2 * 768)


def tiny(kind: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    if kind == "llama":
        config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32), config
    config = AutoConfig.for_model("bert", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=256)
    return AutoModelForSequenceClassification.from_config(config, dtype=torch.float32), config


SMALL = {"vera": {"r": 16}, "prefix": {"num_virtual_tokens": 4}, "prompt": {"num_virtual_tokens": 4, "init": "random"},
         "adapter": {"bottleneck": None, "reduction_factor": 8.0}, "lokr": {"r": 2}}


@pytest.mark.parametrize("method", [m for m in KNOWN_METHODS if m != "qlora"])
def test_closed_form_equals_the_method_applied(method):
    """The estimator's count equals what peftlab's method actually trains (the task head aside)."""
    from peftlab.methods import METHODS

    kind = "bert" if method == "bitfit" else "llama"
    model, config = tiny(kind)
    cfg = SMALL.get(method, {})
    instance = METHODS[method](METHODS[method].config_class(**cfg))
    head = [n for n, _ in model.named_parameters() if n.startswith("classifier.")]
    instance.apply(model, SimpleNamespace(head_parameters=head))  # what peftlab.models.loading passes
    real = sum(p.numel() for p in instance.trainable_parameters(model).values())
    assert trainable_parameters(config, method, cfg) - head_parameters(as_shape(config)) == real


def test_qlora_counts_like_lora_with_its_defaults():
    shape = load_arch("llama-2-7b")
    qlora = trainable_parameters(shape, "qlora")  # r=64 on every linear layer (the paper's recipe)
    assert qlora == trainable_parameters(shape, "lora", {"r": 64, "targets": "all-linear"}) == 159_907_840


# --------------------------------------------------------------------------- #
# The arithmetic of each part
# --------------------------------------------------------------------------- #
def test_quantization_constants_follow_the_qlora_paper():
    shape = load_arch("llama-2-7b")
    q = quantizable_parameters(shape)
    with_dq = estimate(shape, "qlora", mode="inference")
    without = estimate(shape, "qlora", {"double_quant": False}, mode="inference")
    assert with_dq.quant_constants * 8 / q == pytest.approx(8 / 64 + 32 / (64 * 256))  # ≈ 0.127 bit/param
    assert without.quant_constants * 8 / q == pytest.approx(0.5)
    int8 = estimate(shape, "qlora", {"bits": 8}, mode="inference")
    assert int8.frozen_weights - with_dq.frozen_weights == pytest.approx(q / 2)


def test_optimizer_states_and_gradients():
    shape = load_arch("smollm2-135m")
    n = count_parameters(shape)
    fp32 = estimate(shape, "full", batch_size=1, seq_len=8)
    assert (fp32.trainable_weights, fp32.gradients, fp32.optimizer_states) == (4 * n, 4 * n, 8 * n)
    bf16 = estimate(shape, "full", batch_size=1, seq_len=8, precision="bf16")  # + fp32 master weights
    assert (bf16.trainable_weights, bf16.gradients, bf16.optimizer_states) == (2 * n, 2 * n, 12 * n)
    pure = estimate(shape, "full", batch_size=1, seq_len=8, precision="bf16", master_weights=False)
    assert pure.optimizer_states == 4 * n
    eight_bit = estimate(shape, "full", batch_size=1, seq_len=8, optimizer="adamw8bit")
    assert eight_bit.optimizer_states == pytest.approx(2 * n + 8 * n / 256)
    lora = estimate(shape, "lora", batch_size=1, seq_len=8, precision="bf16")  # adapters are fp32
    assert lora.optimizer_states == 8 * lora.trainable_params == 2 * lora.trainable_weights


def test_kv_cache_and_inference_weights():
    e = estimate("llama-2-7b", "lora", mode="inference", batch_size=1, seq_len=2048, precision="bf16")
    assert e.kv_cache == 2 * 32 * 32 * 128 * 2048 * 1 * 2
    assert e.frozen_weights == 2 * 6_738_415_616
    assert e.gradients == e.optimizer_states == 0
    longer = estimate("llama-2-7b", "lora", mode="inference", batch_size=2, seq_len=2048, precision="bf16",
                      kv_cache_len=4096)
    assert longer.kv_cache == 4 * e.kv_cache


def test_checkpointing_and_quantization_reduce_memory():
    kw = dict(batch_size=4, seq_len=2048, precision="bf16")
    plain = estimate("llama-2-7b", "lora", **kw)
    ckpt = estimate("llama-2-7b", "lora", gradient_checkpointing=True, **kw)
    qlora = estimate("llama-2-7b", "qlora", {"r": 8, "targets": ["q", "v"], "dropout": 0.0},
                     gradient_checkpointing=True, **kw)
    assert ckpt.activations < plain.activations / 4
    assert qlora.frozen_weights < ckpt.frozen_weights / 3
    last_block_only = estimate("minilm", "lora", {"layers": [5]}, 8, 128)
    assert last_block_only.activations < estimate("minilm", "lora", {}, 8, 128).activations / 3


@pytest.mark.parametrize("row,reference,kwargs", LLAMA2_7B_REFERENCE, ids=[r[0] for r in LLAMA2_7B_REFERENCE])
def test_llama2_7b_sanity_table(row, reference, kwargs):
    """The table researchers quote (rough numbers): within ±30%; full fine-tuning far beyond one 80 GB GPU."""
    e = estimate("llama-2-7b", **kwargs)
    if kwargs["method"] == "full":
        assert e.total_bytes / GB > 1.25 * reference
        assert estimate("llama-2-7b", **{**kwargs, "optimizer": "adamw8bit"}).total_bytes / GB > 60
    else:
        assert e.total_bytes / GB == pytest.approx(reference, rel=0.30)
    if kwargs.get("mode") == "inference":  # weights 13.5 GB + KV cache 1 GB
        assert e.frozen_weights / GB == pytest.approx(13.5, rel=0.01)
        assert e.kv_cache / GB == pytest.approx(1.07, rel=0.01)


# --------------------------------------------------------------------------- #
# Against measurement: exact CPU allocation peaks of a few real training steps
# --------------------------------------------------------------------------- #
def profiled_peak(fn) -> int:
    """Peak bytes allocated by tensors while ``fn`` runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = getattr(prof.profiler, "kineto_results", None)
    if events is None:
        pytest.skip("this torch build has no profiler memory events")
    memory = sorted((e for e in events.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    current = peak = 0
    for event in memory:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


CASES = [  # (preset, method, method cfg, precision, autocast, checkpointing)
    ("smollm2-135m", "lora", {}, "fp32", False, False),
    ("smollm2-135m", "full", {}, "fp32", False, False),
    ("smollm2-135m", "lora", {"targets": "all-linear"}, "bf16", True, False),
    ("smollm2-135m", "dora", {"dropout": 0.1}, "fp32", False, True),
    ("minilm", "lora", {}, "fp32", False, False),
    ("minilm", "full", {}, "fp32", False, False),
]


@pytest.mark.parametrize("preset,method,cfg,precision,autocast,checkpointing", CASES)
def test_estimate_matches_the_measured_peak_on_cpu(preset, method, cfg, precision, autocast, checkpointing):
    """Three peftlab-style steps (loss, backward, AdamW, zero_grad) of a 2-block copy of the preset.

    The profiler counts every tensor allocation exactly, so this checks the arithmetic, not the
    allocator: 10% here (seen: within 5%) against the issue's 15% for process-level measurements.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from peftlab.methods import METHODS
    from peftlab.tasks.lm import token_loss_sum

    torch.manual_seed(0)
    config = load_config(preset)
    config.num_hidden_layers = 2
    decoder = config.model_type == "llama"
    dtype = torch.float32 if autocast or precision == "fp32" else torch.bfloat16
    auto = AutoModelForCausalLM if decoder else AutoModelForSequenceClassification
    model = auto.from_config(config, dtype=dtype).train()
    adapter = METHODS[method](METHODS[method].config_class(**cfg))
    adapter.apply(model, None)
    if not decoder:
        model.classifier.requires_grad_(True)
    if checkpointing:  # non-reentrant, as peftlab's trainer
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch, seq = (2, 64) if decoder else (8, 64)
    ids = torch.randint(3, config.vocab_size, (batch, seq))
    mask, labels = torch.ones_like(ids), torch.zeros(batch, dtype=torch.long)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def loss() -> torch.Tensor:
        logits = model(input_ids=ids, attention_mask=mask).logits
        if decoder:
            total, n = token_loss_sum(logits, ids, mask)
            return total / n
        return F.cross_entropy(logits.float(), labels)

    def steps():
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                value = loss()
            value.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    resident = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    measured = resident + profiled_peak(steps)
    e = estimate(config, method, cfg, batch, seq, precision, checkpointing, device="cpu",
                 weights_dtype="fp32" if autocast else None)
    assert e.allocated_bytes == pytest.approx(measured, rel=0.10)


def test_cpu_terms_are_named_parts_of_cpu_training_only():
    """RSS on CPU = tensors + a constant runtime + heap slack growing with the heap's activations."""
    from peftlab.memory.estimate import CPU_HEAP_SLACK, CPU_RUNTIME, HEAP_SLACK_BASE

    kw = dict(batch_size=32, seq_len=64, task="classification")
    cpu = estimate("minilm", "lora", device="cpu", **kw)
    assert cpu.cpu_runtime == CPU_RUNTIME > 0
    assert cpu.cpu_heap_slack == int(HEAP_SLACK_BASE + CPU_HEAP_SLACK * cpu.activations)  # encoder: no logits
    assert estimate("minilm", "lora", device="cpu", **{**kw, "batch_size": 64}).cpu_heap_slack > cpu.cpu_heap_slack
    assert cpu.allocated_bytes == cpu.total_bytes - cpu.cpu_runtime - cpu.cpu_heap_slack
    assert cpu.training_bytes == pytest.approx(  # a PEFT method peaks when backward starts; parts are whole bytes
        cpu.gradients + cpu.optimizer_states + cpu.activations + cpu.cpu_runtime + cpu.cpu_heap_slack, abs=4)
    cuda = estimate("minilm", "lora", device="cuda", **kw)
    inference = estimate("minilm", "lora", device="cpu", mode="inference", **kw)
    assert cuda.cpu_runtime == cuda.cpu_heap_slack == inference.cpu_runtime == inference.cpu_heap_slack == 0
    returned = estimate("minilm", "lora", device="cpu", heap_slack=False, **kw)  # MALLOC_MMAP_THRESHOLD_ set
    assert returned.cpu_heap_slack == 0 and returned.cpu_runtime == CPU_RUNTIME
    assert returned.allocated_bytes == cpu.allocated_bytes  # the tensors do not depend on the allocator
    assert returned.total_bytes == pytest.approx(cpu.total_bytes - cpu.cpu_heap_slack, abs=4)


def test_heap_slack_leaves_out_logits_glibc_maps_by_themselves():
    """(b, s, vocab) logits of 32 MiB or more are mmapped and unmapped by glibc: no heap slack from them."""
    from peftlab.memory.estimate import CPU_HEAP_SLACK, HEAP_SLACK_BASE

    kw = dict(device="cpu", task="classification")
    large = estimate("smollm2-135m", "lora", {}, 8, 64, **kw)  # 8 · 64 · 49152 · 4 bytes = 96 MiB
    logits = 8 * 64 * 49152 * 4
    assert large.cpu_heap_slack == int(HEAP_SLACK_BASE + CPU_HEAP_SLACK * (large.activations - logits))
    small = estimate("smollm2-135m", "lora", {}, 1, 64, **kw)  # 12 MiB: in the heap like the rest
    assert small.cpu_heap_slack == int(HEAP_SLACK_BASE + CPU_HEAP_SLACK * small.activations)


# --------------------------------------------------------------------------- #
# Bad input: one ConfigError naming the key
# --------------------------------------------------------------------------- #
BAD = [
    (dict(arch="llama-9b"), "model"),
    (dict(batch_size=-1), "trainer.batch_size"),
    (dict(batch_size=0), "trainer.batch_size"),
    (dict(seq_len=0), "task.max_length"),
    (dict(precision="fp8"), "trainer.precision"),
    (dict(method="qlora", base_quant="int3"), "method.base_quant"),
    (dict(method="qlora", method_cfg={"bits": 3}), "method.bits"),
    (dict(method="qlora", method_cfg={"quant_type": "int3"}), "method.quant_type"),
    (dict(method="full", base_quant="nf4"), "method.base_quant"),
    (dict(method="lora", base_quant="int8", double_quant=True), "method.double_quant"),
    (dict(method="bitfit"), "method"),  # smollm2 has no biases
    (dict(method="sparse-magic"), "method"),
    (dict(method_cfg={"r": 0}), "method.r"),
    (dict(method_cfg={"r": 4096}), "method.r"),
    (dict(method_cfg={"targets": ["q", "zz"]}), "method.targets"),
    (dict(method_cfg={"rank": 8}), "method.rank"),
    (dict(method_cfg={"layers": [40]}), "method.layers"),
    (dict(optimizer="sgd"), "optim.name"),
    (dict(mode="serve"), "mode"),
    (dict(mode="inference", kv_cache_len=-5), "estimate.kv_cache_len"),
]


@pytest.mark.parametrize("kwargs,key", BAD, ids=[k for _, k in BAD])
def test_bad_input_raises_config_error_naming_the_key(kwargs, key):
    kwargs = {"arch": "smollm2-135m", "method": "lora", "batch_size": 1, "seq_len": 64, **kwargs}
    with pytest.raises(ConfigError) as err:
        estimate(**kwargs)
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}: ") and "\n" not in str(err.value)


def test_arch_from_a_dict_a_config_and_a_model_directory(tmp_path):
    config = load_config("minilm")
    (tmp_path / "config.json").write_text(config.to_json_string())
    from_dir = estimate(str(tmp_path), "lora", {}, 8, 64)
    from_dict = estimate(config.to_dict(), "lora", {}, 8, 64)
    from_config = estimate(config, "lora", {}, 8, 64)
    assert from_dir.total_bytes == from_dict.total_bytes == from_config.total_bytes


# --------------------------------------------------------------------------- #
# The command line
# --------------------------------------------------------------------------- #
def test_cli_json_has_total_and_one_key_per_part(capsys):
    code = estimate_main(["model=llama-2-7b", "method=qlora", "trainer.batch_size=4", "task.max_length=2048",
                          "trainer.precision=bf16", "trainer.gradient_checkpointing=true", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert {"total_bytes", *PARTS} <= set(out)
    assert out["inputs"]["base_quant"] == "nf4" and out["inputs"]["double_quant"] is True
    assert out["total_bytes"] / GB == pytest.approx(12, rel=0.3)


def test_cli_table(capsys):
    code = estimate_main(["model=smollm2-135m", "method=lora", "method.r=16", "trainer.batch_size=4",
                          "task.max_length=2048", "trainer.precision=bf16", "trainer.gradient_checkpointing=true",
                          "optim.name=adamw8bit"])
    out = capsys.readouterr().out
    assert code == 0
    assert "total (peak)" in out and "frozen weights" in out and "GiB" in out and "adamw8bit" in out


def test_cli_hf_path_and_inference(capsys, tmp_path):
    (tmp_path / "config.json").write_text(load_config("smollm2-135m").to_json_string())
    assert estimate_main(["model=hf", f"model.path={tmp_path}", "mode=inference", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kv_cache"] > 0 and out["gradients"] == 0


@pytest.mark.parametrize("argv,key", [
    (["model=llama-9b"], "model"),
    (["trainer.batch_size=-4"], "trainer.batch_size"),
    (["task.max_length=0"], "task.max_length"),
    (["method=qlora", "method.base_quant=int3"], "method.base_quant"),
    (["trainer.precision=int3"], "trainer.precision"),
    (["model=hf"], "model.path"),
    (["modle=minilm"], "modle"),
    (["trainer.gradient_checkpointing=maybe"], "trainer.gradient_checkpointing"),
    (["estimate.cpu_heap_slack=maybe"], "estimate.cpu_heap_slack"),
])
def test_cli_bad_input_is_one_line_and_exit_2(capsys, argv, key):
    assert estimate_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {key}: ")


def test_cli_measure_uses_the_hook(capsys):
    calls = []

    def fake(overrides, allocator):
        calls.append(overrides)
        return 10**9

    argv = ["model=minilm", "method=lora", "trainer.batch_size=8", "trainer.device=cpu", "--measure", "--json"]
    assert estimate_main(argv, measure=fake) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["measured_peak_bytes"] == 10**9 and calls == [argv[:4]]
    # CPU measures RSS growth over the loaded model: compared with what training adds, not the weights;
    # by default freed memory goes back to the OS, so the heap-slack allowance is left out
    assert out["training_bytes"] == out["total_bytes"] - out["frozen_weights"] - out["trainable_weights"]
    assert out["cpu_runtime"] > 0 and out["cpu_heap_slack"] > 0 and out["allocator"] == "returning"
    assert out["compared_bytes"] == out["training_bytes"] - out["cpu_heap_slack"]
    assert out["estimate_error"] == pytest.approx(out["compared_bytes"] / 10**9 - 1)
    # glibc's default allocator keeps freed memory for reuse: compared with the allowance
    assert estimate_main([*argv, "--allocator", "default"], measure=fake) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["compared_bytes"] == out["training_bytes"] and out["allocator"] == "default"
    # batches are padded to their longest example: compared at the widest width measured, not max_length
    assert estimate_main([*argv[:4], "task.max_length=64", *argv[4:]], measure=lambda o, a: {"peak_bytes": 10**9, "seq_len": 40}) == 0
    out = json.loads(capsys.readouterr().out)
    at_40 = build_estimate(parse_overrides([*argv[:4], "task.max_length=40"]), device_hint="cpu")
    assert out["measured_seq_len"] == 40 and out["compared_bytes"] == at_40.training_bytes - at_40.cpu_heap_slack
    assert out["compared_bytes"] < out["training_bytes"] - out["cpu_heap_slack"]
    # CUDA measures max_memory_allocated, weights included: compared with every tensor
    assert estimate_main(["model=minilm", "trainer.device=cuda", "--measure", "--json"], measure=fake) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["compared_bytes"] == out["allocated_bytes"] == out["total_bytes"] - out["overhead"]


def test_cli_measure_without_the_memory_module_fails_cleanly(capsys):
    def missing(overrides, allocator=None):
        raise ImportError("cannot import name 'measure_training_peak'")

    assert estimate_main(["--measure"], measure=missing) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --measure")
    assert estimate_main(["--measure"]) == 2  # no measuring function given at all
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --measure")


def test_peftlab_estimate_passes_the_trainers_measure(monkeypatch):
    """The command wires the trainer's measurement into the estimate CLI (memory never imports training)."""
    import peftlab.memory.cli as memory_cli
    from peftlab import cli
    from peftlab.training.measure import measure_for_estimate

    seen = {}
    monkeypatch.setattr(memory_cli, "estimate_main", lambda argv, measure=None: seen.update(measure=measure) or 0)
    assert cli.main(["estimate", "--measure"]) == 0
    assert seen["measure"] is measure_for_estimate


FRAGMENT_HEAP = """
import sys, torch
from peftlab.memory.measure import _status_kib, return_freed_memory
if sys.argv[1] == "returning":
    assert return_freed_memory()
big = torch.ones(16 * 2**20 // 4); del big        # glibc raises its mmap threshold to 16 MiB here
rss = _status_kib("VmRSS")
blocks = [torch.ones(8 * 2**20 // 4) for _ in range(10)]
del blocks[:9]                                    # the last block pins the heap top: nothing to trim
print((_status_kib("VmRSS") - rss) // 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc/self/status")
def test_returning_allocator_gives_freed_tensors_back():
    """What --measure relies on: with the default allocator, freed 8 MiB tensors stay resident
    (heap reuse); with return_freed_memory() only the live one counts."""
    grown = {mode: int(subprocess.run([sys.executable, "-c", FRAGMENT_HEAP, mode], capture_output=True, text=True,
                                      check=True).stdout) for mode in ("default", "returning")}
    assert grown["default"] >= 60, grown      # ~80 MiB: ten blocks' pages kept
    assert grown["returning"] <= 12, grown    # ~8 MiB: the one live block


def test_parse_overrides():
    values = parse_overrides(["method.targets=[q,v]", "trainer.gradient_checkpointing=true", "method.r=16",
                              "+method.rank_pattern={v: 4}", "model=llama-2-7b"])
    assert values == {"method.targets": ["q", "v"], "trainer.gradient_checkpointing": True, "method.r": 16,
                      "method.rank_pattern": {"v": 4}, "model": "llama-2-7b"}
    with pytest.raises(ConfigError):
        parse_overrides(["batch_size"])


# --------------------------------------------------------------------------- #
# The estimate assumes what `peftlab train` runs (issue 21)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("overrides", [[], ["model=smollm2-135m"], ["model=smollm2-135m", "task=lm"],
                                       ["task=arithmetic", "model=smollm2-135m", "trainer.batch_size=1"]])
def test_cli_defaults_are_what_peftlab_train_composes(overrides):
    """Task type, length, batch, precision, checkpointing, optimizer and the base's dtype: from conf/,
    as the trainer's composition gives them, not a table of their own."""
    from peftlab.config import compose, validate
    from peftlab.memory.cli import run_defaults

    cfg = validate(compose(overrides))
    values = parse_overrides(overrides)
    v = {**run_defaults(values), **values}
    assert v["task.type"] == cfg.task.type and v["task.max_length"] == cfg.task.max_length
    assert v["trainer.batch_size"] == cfg.trainer.batch_size and v["trainer.precision"] == cfg.trainer.precision
    assert v["trainer.gradient_checkpointing"] == cfg.trainer.gradient_checkpointing
    assert v["optim.name"] == cfg.optim.name and v["model.dtype"] == cfg.model.dtype
    e = build_estimate(values, device_hint="cpu")
    assert e.inputs["task"] == cfg.task.type and e.inputs["seq_len"] == cfg.task.max_length
    assert e.inputs["padded"] is (cfg.trainer.batch_size > 1)  # peftlab pads a batch of several examples
    assert e.inputs["weights_dtype"] == "fp32"  # conf/model/*.yaml: float32; bf16 precision is autocast
    # what every result.json stores is the same estimate
    from peftlab.training.trainer import estimate_for

    stored = estimate_for(cfg, torch.device("cpu"))
    assert stored["inputs"] == e.inputs and stored["total_bytes"] == e.total_bytes


def test_the_default_causal_lm_run_is_classification_through_one_position():
    """The issue's case: `peftlab estimate model=smollm2-135m` is `peftlab train`'s sentiment run, whose
    loss scores one position (one logits-sized gradient), not a causal-LM loss over every position."""
    default = build_estimate(parse_overrides(["model=smollm2-135m"]), device_hint="cpu")
    lm = build_estimate(parse_overrides(["model=smollm2-135m", "task=lm", "task.max_length=64"]), device_hint="cpu")
    assert default.inputs["task"] == "classification" and lm.inputs["task"] == "lm"
    vocab_tokens = 32 * 64 * 49152
    assert lm.activations - default.activations == pytest.approx((12 - 4) * vocab_tokens, rel=0.01)


def test_padding_follows_the_batch_unless_told():
    at = lambda *o: build_estimate(parse_overrides(["model=smollm2-135m", *o]), device_hint="cpu")  # noqa: E731
    assert at("trainer.batch_size=1").inputs["padded"] is False
    assert at("trainer.batch_size=2").inputs["padded"] is True
    assert at("trainer.batch_size=8", "estimate.padded=false").inputs["padded"] is False
    assert at("trainer.batch_size=1", "estimate.padded=true").inputs["padded"] is True
    # a padded batch costs the mask and grouped-query K/V repeated to every head
    assert at("estimate.padded=true").activations > at("estimate.padded=false").activations


def test_cli_unknown_task_names_the_key(capsys):
    assert estimate_main(["task=sentimnet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: task: ") and "sentiment" in err[0]
    # a task of one's own is a file read through a shipped task, its type overridden
    assert estimate_main(["task.source=csv", "+task.path=x.csv", "task.type=lm", "model=smollm2-135m", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"]["task"] == "lm"
