"""Will it fit? Memory arithmetic for one training step (or one inference pass), per method.

Everything is bytes, computed from the architecture's config alone (no weights)::

    total = persistent + max(backward start, backward end, optimizer step)   (training)
    total = persistent + activations                                          (inference)

    persistent     = frozen_weights + quant_constants + trainable_weights
                     + optimizer_states + kv_cache + overhead (+ cpu_runtime + cpu_heap_slack on CPU)
    backward start = activations + the gradients that exist by then
    backward end   = gradients + the first block's activations and their gradients
    optimizer step = gradients + the optimizer's temporaries

Gradients and activations do not peak together: backward frees a block's saved
tensors as it makes that block's gradients, so the peak is the largest of these
moments, not the sum of the parts (for PEFT the gradients are tiny and this changes
nothing; for full fine-tuning it does, and the table then shows the sum beside it).

Parts
-----
frozen weights     base parameters that do not train, in the weights' dtype (fp32 4, bf16/fp16 2
                   bytes). With a quantized base the linear layers inside the blocks are int8
                   (1 byte) or NF4/FP4 (0.5 byte); embeddings, lm_head, norms and biases stay in
                   the weights' dtype (as bitsandbytes and peftlab's qlora do).
quant constants    NF4/FP4 in blocks of 64 (QLoRA, Dettmers et al. 2023, arXiv:2305.14314): one
                   fp32 absmax per block = 32/64 = 0.5 bit/param; double quantization stores it in
                   8 bits with one fp32 constant per 256 blocks: 8/64 + 32/(64·256) ≈ 0.127
                   bit/param. int8 (LLM.int8): one fp32 scale per output row.
trainable weights  closed-form count per method (``trainable_parameters``); adapters and the task
                   head are fp32 (peftlab creates them so), full fine-tuning trains the weights in
                   their own dtype.
gradients          one per trainable parameter, in its dtype.
optimizer states   AdamW: two fp32 moments, 8 bytes/param; 8-bit AdamW (bitsandbytes): two uint8
                   moments + an fp32 absmax per 256 values. ASSUMPTION: full fine-tuning of 16-bit
                   weights keeps an fp32 master copy (+4 bytes/param, ``master_weights=True``): the
                   usual 2 + 2 + 4 + 8 = 16 bytes/param; without it torch keeps the moments in the
                   weights' dtype. AdaLoRA adds its importance EMAs (sensitivity and uncertainty:
                   two fp32 copies of the adapter).
activations        what autograd keeps for backward, tensor by tensor (below), plus logits.
kv cache           inference: 2 · layers · kv_heads · head_dim · cache length · batch · bytes.
cpu runtime        CPU training: what a process gains on its first steps that is not tensors (code
                   pages of the kernels libtorch reads in on first use, threads' scratch): a
                   constant ``CPU_RUNTIME``, measured as the RSS growth of steps whose tensors are
                   negligible (minilm, batch 2 × 8) and as what is left over the tensor peak when
                   glibc returns freed tensors to the OS.
cpu heap slack     CPU training with glibc's default allocator: it serves tensors under 32 MiB from
                   its heap and keeps what they free resident, for reuse; a freed tensor leaves a
                   hole that tensors of other sizes fill badly, so RSS climbs past the tensor peak.
                   ``HEAP_SLACK_BASE`` + ``CPU_HEAP_SLACK`` × the activations in that heap (all but
                   logits-sized tensors of ``GLIBC_MMAP_MAX`` = 32 MiB or more, which glibc maps and
                   unmaps by themselves), fitted on calibration rows of results/memory/ (different
                   batch sizes and lengths check it). Only roughly right (held-out rows up to 31%
                   low): one configuration showed 0.8× and 1.3× its activations in two processes,
                   by what else they allocated in between (results/memory/README.md).
                   ``heap_slack=False`` when glibc returns freed tensors to the OS
                   (``MALLOC_MMAP_THRESHOLD_=131072``): RSS growth is then the tensor peak + cpu
                   runtime (within 6% on the rows measured).
overhead           CUDA context, cuBLAS workspace and allocator slack: 0.75 GiB on CUDA by
                   default (``overhead_bytes``); 0 on CPU. ``allocated_bytes`` = total - overhead -
                   the CPU terms is the tensor peak (``torch.cuda.max_memory_allocated``, or the
                   profiler on CPU); ``training_bytes`` = what training adds to the loaded, adapted
                   model (the RSS growth ``peftlab estimate --measure`` reports on CPU).

Activations
-----------
Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
arXiv:2205.05198) count s·b·h·(34 + 5·a·s/h) bytes per GPT layer in 16-bit by listing every
tensor a backward needs (2 bytes per element, 1 per dropout mask, 5·a·s² for the attention
matrix: softmax output, dropout mask and output). We keep that method and redo the list for
the Hugging Face implementations peftlab runs, at the compute dtype's size (so fp32 doubles
every term but the masks), checked tensor by tensor with ``saved_tensors_hooks`` while writing
it and against profiler peaks of real steps in tests/test_estimate.py:

* per architecture: SwiGLU keeps three (s, intermediate) tensors, grouped-query attention keeps
  K/V at kv width, RMSNorm keeps an fp32 copy of its input, BERT is post-LN with dropout,
  GPT-2's tanh GELU keeps four intermediates;
* attention: we assume SDPA because it is transformers' default ``attn_implementation`` and
  what peftlab loads; its flash / memory-efficient kernels keep q, k, v, the output and an fp32
  logsumexp, never the a·s² matrix (the output doubles as the o-projection's input). That drops
  Korthikanti's 5·a·s/h term, the largest one at long context. The math kernel keeps the matrix
  (in fp32 on CPU): it runs on CPU when attention dropout is on (CPU flash attention has no
  dropout), or with ``attention="math"``; ``"eager"`` (HF's own) adds an fp32 softmax copy;
* frozen base (PEFT): a frozen linear needs no input for its input gradient, so only adapted
  layers' inputs (shared by q/k/v and by gate/up) and the adapters' own intermediates are kept,
  plus what norms, nonlinearities and attention need to pass the gradient on. Blocks before the
  first adapted one keep nothing: no gradient reaches them;
* autocast (fp32 weights, bf16 compute: peftlab's ``trainer.precision=bf16`` with
  ``model.dtype=float32``): every linear on the gradient path keeps its own bf16 cast of its
  input and of its weight (frozen weights included), so inputs are no longer shared;
* dropout masks: 1 byte (CUDA, bool) or the tensor's dtype (CPU keeps a float noise tensor);
* logits (causal LM, training): peftlab's loss keeps an fp32 log-softmax and its backward makes
  two more fp32 tensors of that size, 12 · b · s · vocab bytes when backward starts (the logits
  themselves are dropped once the loss exists; a loop that keeps the model output adds their
  bytes). Scoring one position (classification with a causal LM) costs one logits-sized gradient;
* padded batches: transformers passes SDPA the mask (b·s² bytes) and repeats grouped K/V;
* a block's backward briefly adds gradients of its tensors, ``BACKWARD_WORKSPACE`` = 0.4 of its
  saved bytes (measured); so does the moment backward ends, when every gradient exists but only
  the first block's tensors are left (this one can set a full fine-tuning's peak);
* gradient checkpointing keeps each block's input and recomputes one block at a time in
  backward: inputs + max(logits and loss buffers, 1.4 × one block);
* inference: one block's working set plus the last position's logits (generation keeps one).

Approximate (the note says so): AdaLoRA (counted at its initial rank; masked triplets stay
allocated), prefix and prompt tuning (the virtual tokens lengthen keys or the whole sequence),
bottleneck adapters, LoHa / LoKr / DoRA / VeRA (their extra saved tensors follow peftlab's
implementations of them, not a published count).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from peftlab.errors import ConfigError
from peftlab.memory import RESIDENT_PARTS
from peftlab.targets import FAMILIES, GROUPS, MODEL_TYPE_FAMILY, expand, parse_layers

PRESET_DIR = Path(__file__).parent / "presets"
MiB, GiB, GB = 2**20, 2**30, 10**9
DEFAULT_CUDA_OVERHEAD = int(0.75 * GiB)

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
QUANT_BITS = {"int8": 8, "nf4": 4, "fp4": 4}
OPTIMIZERS = ("adamw", "adamw8bit")
MODES = ("train", "inference")
DEVICES = ("cuda", "cpu")
ATTENTION = ("auto", "sdpa", "math", "eager")

LORA_LIKE = ("lora", "rslora", "loraplus", "qlora", "dora", "adalora")
KNOWN_METHODS = LORA_LIKE + ("full", "bitfit", "ia3", "vera", "loha", "lokr", "adapter", "prefix", "prompt")
APPROXIMATE = {"adalora", "prefix", "prompt", "adapter", "loha", "lokr", "dora", "vera"}
# Which input a projection reads: q, k and v share one; gate and up share one.
INPUT_GROUP = {"q": "attn", "k": "attn", "v": "attn", "o": "o", "gate": "mlp", "up": "mlp", "down": "down"}
FULL = "full"  # marks a block whose every weight trains
# A block's backward holds gradients of its saved tensors while freeing them: measured on CPU
# (profiler peaks, llama and bert blocks, fp32 and bf16) at 0.35-0.45 of the block's saved bytes.
BACKWARD_WORKSPACE = 0.4
# CPU training only: process memory that is not tensors (module docstring, "cpu runtime" and "cpu heap
# slack"). The runtime is measured directly; the slack is fitted (experiments/memory_check/fit.py).
CPU_RUNTIME = 20 * MiB
HEAP_SLACK_BASE = 90 * MiB
CPU_HEAP_SLACK = 0.38
GLIBC_MMAP_MAX = 32 * MiB  # glibc serves requests this large with their own mmap, unmapped when freed


# --------------------------------------------------------------------------- #
# Architecture
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class ModelShape:
    """The numbers of a transformers config that memory depends on."""

    name: str
    model_type: str
    family: str                 # llama | bert | gpt2 (peftlab.targets.MODEL_TYPE_FAMILY)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    tied: bool
    type_vocab: int = 0
    num_labels: int = 2
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False           # qwen3: an RMSNorm on q and k
    gelu_tanh_python: bool = False  # gpt2's gelu_new keeps four intermediates

    @classmethod
    def from_config(cls, config: Any, name: str | None = None) -> "ModelShape":
        model_type = getattr(config, "model_type", "")
        family = MODEL_TYPE_FAMILY.get(model_type)
        if family is None:
            allowed = ", ".join(sorted(MODEL_TYPE_FAMILY))
            raise ConfigError("model", f"model_type {model_type!r} is not supported by the estimator; "
                              f"allowed: {allowed}")

        def get(key: str, default: Any = None) -> Any:
            value = getattr(config, key, default)
            return default if value is None else value

        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        common = dict(
            name=name or get("_name_or_path", "") or model_type, model_type=model_type, family=family,
            hidden=hidden, intermediate=int(get("intermediate_size", 0) or get("n_inner", 0) or 4 * hidden),
            layers=int(get("num_hidden_layers")), heads=heads, kv_heads=int(get("num_key_value_heads", heads)),
            head_dim=int(get("head_dim", hidden // heads)), vocab=int(get("vocab_size")),
            max_positions=int(get("max_position_embeddings", 0)), tied=bool(get("tie_word_embeddings", True)),
            num_labels=int(get("num_labels", 2)),
        )
        if family == "llama":
            bias = bool(get("attention_bias", False))
            return cls(**common, attention_dropout=float(get("attention_dropout", 0.0)),
                       qkv_bias=bias or model_type == "qwen2", o_bias=bias, mlp_bias=bool(get("mlp_bias", False)),
                       qk_norm=model_type == "qwen3")
        if family == "bert":
            return cls(**common, type_vocab=int(get("type_vocab_size", 0)), qkv_bias=True, o_bias=True,
                       mlp_bias=True, hidden_dropout=float(get("hidden_dropout_prob", 0.0)),
                       attention_dropout=float(get("attention_probs_dropout_prob", 0.0)))
        return cls(**common, qkv_bias=True, o_bias=True, mlp_bias=True,
                   hidden_dropout=float(get("resid_pdrop", 0.0)), attention_dropout=float(get("attn_pdrop", 0.0)),
                   gelu_tanh_python=get("activation_function", "gelu_new") == "gelu_new")

    @property
    def is_decoder(self) -> bool:
        return self.family in ("llama", "gpt2")

    def linears(self) -> dict[str, tuple[int, int, bool]]:
        """Linear layers of one block: short name -> (in, out, has bias). GPT-2's fused c_attn is 'q'."""
        h, i = self.hidden, self.intermediate
        if self.family == "llama":
            qd, kvd = self.heads * self.head_dim, self.kv_heads * self.head_dim
            b, m = self.qkv_bias, self.mlp_bias
            return {"q": (h, qd, b), "k": (h, kvd, b), "v": (h, kvd, b), "o": (qd, h, self.o_bias),
                    "gate": (h, i, m), "up": (h, i, m), "down": (i, h, m)}
        if self.family == "bert":
            return {"q": (h, h, True), "k": (h, h, True), "v": (h, h, True), "o": (h, h, True),
                    "up": (h, i, True), "down": (i, h, True)}
        return {"q": (h, 3 * h, True), "o": (h, h, True), "up": (h, i, True), "down": (i, h, True)}


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_config(name_or_path: str) -> Any:
    """A transformers config from a preset name, a config.json or a model directory (never downloads)."""
    from transformers import AutoConfig

    preset = PRESET_DIR / f"{name_or_path}.json"
    if preset.is_file():
        return AutoConfig.from_pretrained(str(preset), local_files_only=True)
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
        try:
            return AutoConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError("model.path", f"cannot read a transformers config from {str(path)!r}: {err}") from None
    raise ConfigError("model", f"{name_or_path!r} is neither a preset nor a config.json / model directory; "
                      f"allowed presets: {', '.join(list_presets())}")


def load_arch(name_or_path: str) -> ModelShape:
    """The shape of a preset (``llama-2-7b``), a config.json or a model directory."""
    is_preset = (PRESET_DIR / f"{name_or_path}.json").is_file()
    return ModelShape.from_config(load_config(name_or_path), name=name_or_path if is_preset else None)


def as_shape(arch: Any) -> ModelShape:
    """A ModelShape from itself, a transformers config, a dict of config values, or a preset name / path."""
    if isinstance(arch, ModelShape):
        return arch
    if isinstance(arch, (str, os.PathLike)):
        return load_arch(str(arch))
    if isinstance(arch, Mapping):
        from transformers import AutoConfig

        values = dict(arch)
        if "model_type" not in values:
            allowed = ", ".join(sorted(MODEL_TYPE_FAMILY))
            raise ConfigError("model", f"a config dict needs model_type; allowed: {allowed}")
        try:
            config = AutoConfig.for_model(values.pop("model_type"), **values)
        except ValueError as err:
            raise ConfigError("model", str(err)) from None
        return ModelShape.from_config(config)
    return ModelShape.from_config(arch)


# --------------------------------------------------------------------------- #
# Parameter counts (closed forms; tests compare them with meta-device models)
# --------------------------------------------------------------------------- #
def block_parameters(shape: ModelShape) -> int:
    """Parameters of one repeated block: its linear layers (weights + biases) and norms."""
    linear = sum(d_in * d_out + (d_out if bias else 0) for d_in, d_out, bias in shape.linears().values())
    if shape.family == "llama":
        return linear + 2 * shape.hidden + (2 * shape.head_dim if shape.qk_norm else 0)
    return linear + 4 * shape.hidden  # two LayerNorms, weight + bias


def head_parameters(shape: ModelShape, head: str = "auto") -> int:
    """A fresh classification head's parameters (every method trains it); 0 for a causal LM."""
    if _head(shape, head) != "classification":
        return 0
    h, n = shape.hidden, shape.num_labels
    if shape.model_type in ("roberta", "xlm-roberta"):
        return h * h + h + h * n + n  # RobertaClassificationHead: dense + out_proj
    return h * n + n  # BertForSequenceClassification: one linear on the pooled output


def count_parameters(shape: ModelShape, head: str = "auto") -> int:
    """Parameters of AutoModel (``head="base"``), the causal LM, or the sequence classifier.

    ``head="auto"``: causal LM for decoders, sequence classification for encoders.
    """
    head = _head(shape, head)
    h, v = shape.hidden, shape.vocab
    blocks = shape.layers * block_parameters(shape)
    lm_head = v * h if head == "causal_lm" and not shape.tied else 0
    if shape.family == "llama":
        return v * h + blocks + h + lm_head
    if shape.family == "gpt2":
        return (v + shape.max_positions) * h + blocks + 2 * h + lm_head
    embeddings = (v + shape.max_positions + shape.type_vocab) * h + 2 * h
    pooler = 0 if head == "classification" and shape.model_type in ("roberta", "xlm-roberta") else h * h + h
    return embeddings + blocks + pooler + head_parameters(shape, head)


def bias_parameters(shape: ModelShape) -> int:
    """Every ``module.bias`` outside the task head: what BitFit trains besides the head."""
    h = shape.hidden
    per_block = sum(d_out for _, d_out, bias in shape.linears().values() if bias)
    if shape.family == "llama":
        return shape.layers * per_block
    if shape.family == "gpt2":
        return shape.layers * (per_block + 2 * h) + h
    pooler = 0 if shape.model_type in ("roberta", "xlm-roberta") else h
    return h + shape.layers * (per_block + 2 * h) + pooler  # embeddings' LayerNorm, blocks, pooler


def quantizable_parameters(shape: ModelShape) -> int:
    """Weights of the linear layers inside the blocks: what bitsandbytes quantizes."""
    return shape.layers * sum(d_in * d_out for d_in, d_out, _ in shape.linears().values())


def _head(shape: ModelShape, head: str) -> str:
    if head == "auto":
        return "causal_lm" if shape.is_decoder else "classification"
    if head not in ("base", "causal_lm", "classification"):
        raise ValueError(f"head must be auto, base, causal_lm or classification, not {head!r}")
    return head


# --------------------------------------------------------------------------- #
# Method configs and trainable parameters
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Target:
    """One adapted linear layer."""

    layer: int
    short: str
    d_in: int
    d_out: int
    rank: int = 0


def resolve_method_config(method: str, method_cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The method's full config: its registered defaults, overridden and checked as ``peftlab train`` does."""
    from peftlab.methods import METHODS as REGISTRY

    if method not in REGISTRY or method not in KNOWN_METHODS:
        names = sorted(set(REGISTRY) & set(KNOWN_METHODS))
        raise ConfigError("method", f"unknown method {method!r}; allowed: {', '.join(names)}")
    cls = REGISTRY[method]
    allowed = [f.name for f in dataclasses.fields(cls.config_class) if f.name != "name"]
    values = {k: v for k, v in dict(method_cfg or {}).items() if k != "name"}
    for key in values:
        if key not in allowed:
            raise ConfigError(f"method.{key}", f"not a setting of {method}; allowed: {', '.join(allowed)}")
    config = cls.config_class(**values)
    cls(config)  # the method's own checks, each naming its key
    return dataclasses.asdict(config)


def method_targets(shape: ModelShape, method: str, cfg: Mapping[str, Any]) -> list[Target]:
    """The adapted linear layers with shapes and ranks (empty for methods without targets)."""
    if method == "adapter":
        from peftlab.methods.adapter import PLACEMENTS

        targets: Any = PLACEMENTS[cfg["placement"]]
    elif "targets" in cfg:
        targets = cfg["targets"]
    else:
        return []
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    pattern = dict(cfg.get("rank_pattern") or {})
    allowed = ", ".join(sorted(FAMILIES[shape.family]) + sorted(GROUPS) + ["all-linear"])
    if any(str(t).startswith("re:") for t in list(targets) + list(pattern)):
        raise ConfigError("method.targets", f"the estimator has no module names to match a regex; allowed: {allowed}")
    linears = shape.linears()
    short_of = {FAMILIES[shape.family][s]: s for s in reversed(list(FAMILIES[shape.family])) if s in linears}
    suffixes = expand(list(targets), shape.family)
    shorts = list(linears) if "all-linear" in suffixes else list(dict.fromkeys(short_of[s] for s in suffixes))
    layers = parse_layers(cfg.get("layers"))
    if layers is not None and not layers <= set(range(shape.layers)):
        raise ConfigError("method.layers", f"{sorted(layers)} is outside blocks 0..{shape.layers - 1} of this model")
    rank = cfg.get("init_r") or cfg.get("r") or 0
    if method == "adapter":
        rank = cfg["bottleneck"] or int(shape.hidden // cfg["reduction_factor"])
    found = []
    for layer in range(shape.layers):
        if layers is None or layer in layers:
            for short in shorts:
                d_in, d_out, _ = linears[short]
                found.append(Target(layer, short, d_in, d_out, int(pattern.get(short, rank))))
    return found


def _check_targets(shape: ModelShape, method: str, targets: list[Target]) -> None:
    """The checks that need the model (peftlab's methods run them in apply / plan)."""
    for t in targets:
        limit = t.d_out if method == "adapter" else min(t.d_in, t.d_out)
        if (method in LORA_LIKE or method in ("vera", "adapter")) and t.rank > limit:
            key = {"adalora": "method.init_r", "adapter": "method.bottleneck"}.get(method, "method.r")
            raise ConfigError(key, f"{t.rank} > {limit}, the largest that fits {t.short}; allowed: 1..{limit}")
    if method == "bitfit" and bias_parameters(shape) == 0:
        raise ConfigError("method", f"bitfit needs bias parameters, and this {shape.model_type} model has none; "
                          "allowed: a model with biases (e.g. minilm) or another method")


def _lokr_parameters(t: Target, cfg: Mapping[str, Any]) -> int:
    """peftlab's LoKrLayer.expected_count, from the shapes alone."""
    from peftlab.methods.lokr import factorization

    factor = int(cfg["decompose_factor"])
    out_l, out_k = factorization(t.d_out, factor)
    in_m, in_n = factorization(t.d_in, factor)
    w1_low = cfg["decompose_both"] and t.rank < max(out_l, in_m) / 2
    w2_low = t.rank < max(out_k, in_n) / 2
    w1 = t.rank * (out_l + in_m) if w1_low else out_l * in_m
    w2 = t.rank * (out_k + in_n) if w2_low else out_k * in_n
    return w1 + w2


def trainable_parameters(shape: Any, method: str, method_cfg: Mapping[str, Any] | None = None) -> int:
    """Closed-form count of what ``method`` trains on ``shape``, the task head included."""
    shape = as_shape(shape)
    cfg = resolve_method_config(method, method_cfg)
    targets = method_targets(shape, method, cfg)
    _check_targets(shape, method, targets)
    return _method_parameters(shape, method, cfg, targets) + (0 if method == "full" else head_parameters(shape))


def _method_parameters(shape: ModelShape, method: str, cfg: Mapping[str, Any], targets: list[Target]) -> int:
    if method == "full":
        return count_parameters(shape)
    if method == "bitfit":
        return bias_parameters(shape)
    if method in ("lora", "rslora", "loraplus", "qlora"):
        return sum(t.rank * (t.d_in + t.d_out) for t in targets)
    if method == "dora":
        return sum(t.rank * (t.d_in + t.d_out) + t.d_out for t in targets)  # + the magnitude vector
    if method == "adalora":
        return sum(t.rank * (t.d_in + t.d_out + 1) for t in targets)  # P, Λ, Q at the initial rank
    if method == "vera":
        return sum(t.rank + t.d_out for t in targets)  # d (r) and b (out); A and B are frozen, shared
    if method == "ia3":
        feedforward = set(cfg.get("feedforward") or [])
        return sum(t.d_in if t.short in feedforward else t.d_out for t in targets)
    if method == "loha":
        return sum(2 * t.rank * (t.d_in + t.d_out) for t in targets)
    if method == "lokr":
        return sum(_lokr_parameters(t, cfg) for t in targets)
    if method == "adapter":
        return sum(2 * t.d_out * t.rank + t.rank + t.d_out for t in targets)  # down and up, with biases
    if method == "prefix":
        n, layers, width = cfg["num_virtual_tokens"], shape.layers, shape.kv_heads * shape.head_dim
        if not cfg["prefix_projection"]:
            return layers * 2 * n * width
        hidden = cfg["encoder_hidden_size"] or width  # E, then Linear(width, hidden), Linear(hidden, L·2·width)
        return n * width + (width + 1) * hidden + (hidden + 1) * layers * 2 * width
    if method == "prompt":
        return cfg["num_virtual_tokens"] * shape.hidden
    raise AssertionError(method)


def _frozen_extra_parameters(method: str, targets: list[Target]) -> int:
    """VeRA's shared random projections A (r, max in) and B (max out, r): frozen, but in memory."""
    if method != "vera" or not targets:
        return 0
    r = targets[0].rank
    return r * (max(t.d_in for t in targets) + max(t.d_out for t in targets))


# --------------------------------------------------------------------------- #
# The estimate
# --------------------------------------------------------------------------- #
PARTS = ("frozen_weights", "quant_constants", "trainable_weights", "gradients", "optimizer_states",
         "activations", "kv_cache", "cpu_runtime", "cpu_heap_slack", "overhead")


@dataclass
class Estimate:
    """Bytes per part; ``total_bytes`` is the peak (see the module docstring)."""

    frozen_weights: int
    trainable_weights: int
    gradients: int
    optimizer_states: int
    activations: int
    kv_cache: int
    quant_constants: int
    overhead: int
    total_bytes: int
    cpu_runtime: int = 0
    cpu_heap_slack: int = 0
    total_params: int = 0
    trainable_params: int = 0
    peak_phase: str = ""
    inputs: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    @property
    def allocated_bytes(self) -> int:
        """The peak of tensor bytes: what ``torch.cuda.max_memory_allocated`` (or a CPU profiler) shows."""
        return self.total_bytes - self.overhead - self.cpu_runtime - self.cpu_heap_slack

    @property
    def training_bytes(self) -> int:
        """What training adds to the loaded, adapted model at its peak: the RSS growth on CPU."""
        return self.total_bytes - sum(getattr(self, part) for part in RESIDENT_PARTS)

    def to_dict(self) -> dict:
        out = {part: getattr(self, part) for part in PARTS}
        out.update(total_bytes=self.total_bytes, allocated_bytes=self.allocated_bytes,
                   training_bytes=self.training_bytes, total_params=self.total_params,
                   trainable_params=self.trainable_params,
                   peak_phase=self.peak_phase, inputs=dict(self.inputs), notes=list(self.notes))
        return out

    def format_table(self) -> str:
        i = self.inputs
        share = 100 * self.trainable_params / max(self.total_params, 1)
        quant = f", {i['base_quant']}{' (double quant)' if i['double_quant'] else ''} base" if i["base_quant"] else ""
        train = f", {'gradient checkpointing, ' if i['gradient_checkpointing'] else ''}{i['optimizer']}"
        lines = [
            f"{i['method']} on {i['model']}: {i['mode']}, batch {i['batch_size']} × {i['seq_len']} tokens, "
            f"{i['precision']} compute, {i['weights_dtype']} weights{quant}"
            f"{train if i['mode'] == 'train' else ''}, {i['device']}",
            f"parameters: {_count(self.total_params)} total, {_count(self.trainable_params)} trainable ({share:.2f}%)",
            "", f"{'part':<20}{'GiB':>10}{'GB':>10}",
        ]
        for part in PARTS:
            value = getattr(self, part)
            lines.append(f"{part.replace('_', ' '):<20}{value / GiB:>10.2f}{value / GB:>10.2f}")
        lines.append("-" * 40)
        summed = sum(getattr(self, p) for p in PARTS)
        if summed != self.total_bytes:
            lines.append(f"{'sum of parts':<20}{summed / GiB:>10.2f}{summed / GB:>10.2f}")
        lines.append(f"{'total (peak)':<20}{self.total_bytes / GiB:>10.2f}{self.total_bytes / GB:>10.2f}")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def _dtype(key: str, value: Any) -> str:
    name = DTYPE_ALIASES.get(str(value), str(value))
    if name not in DTYPE_BYTES:
        raise ConfigError(key, f"got {value!r}; allowed: {', '.join(DTYPE_BYTES)}")
    return name


def _positive(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(key, f"got {value!r}; allowed: an integer >= 1")
    return value


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(key, f"got {value!r}; allowed: {', '.join(allowed)}")
    return value


def estimate(
    arch: Any,
    method: str = "lora",
    method_cfg: Mapping[str, Any] | None = None,
    batch_size: int = 1,
    seq_len: int = 512,
    precision: str = "fp32",
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
    mode: str = "train",
    base_quant: str | None = None,
    double_quant: bool | None = None,
    kv_cache_len: int | None = None,
    *,
    weights_dtype: str | None = None,
    master_weights: bool = True,
    device: str = "cuda",
    attention: str = "auto",
    task: str = "auto",
    padded: bool = False,
    overhead_bytes: int | None = None,
    heap_slack: bool = True,
) -> Estimate:
    """Bytes per part for ``method`` on ``arch`` (a preset name, config path, config or dict).

    ``precision`` is the compute dtype; ``weights_dtype`` the dtype the base is stored in (peftlab's
    ``model.dtype``; default: ``precision``; fp32 weights with bf16 compute is autocast). qlora takes
    its base quantization from its config (``bits``, ``quant_type``, ``double_quant``); ``base_quant``
    overrides it, or puts another PEFT method over a quantized base. ``kv_cache_len`` (inference)
    defaults to ``seq_len``. ``task``: ``lm`` (loss at every position; the default for decoders) or
    ``classification`` (the default for encoders; a causal LM then scores one position). ``padded``:
    batches carry an attention mask, so SDPA gets the mask and grouped-query K/V are repeated per head.
    ``heap_slack``: on CPU, glibc keeps freed tensor memory in its heap (its default); False when it is
    told to return it (``MALLOC_MMAP_THRESHOLD_=131072``).
    """
    shape = as_shape(arch)
    cfg = resolve_method_config(method, method_cfg)
    batch_size = _positive("trainer.batch_size", batch_size)
    seq_len = _positive("task.max_length", seq_len)
    precision = _dtype("trainer.precision", precision)
    weights_dtype = _dtype("model.dtype", weights_dtype or precision)
    _choice("optim.name", optimizer, OPTIMIZERS)
    _choice("mode", mode, MODES)
    _choice("trainer.device", device, DEVICES)
    _choice("estimate.attention", attention, ATTENTION)
    task = _choice("task.type", ("lm" if shape.is_decoder else "classification") if task == "auto" else task,
                   ("lm", "classification") if shape.is_decoder else ("classification",))
    if kv_cache_len is not None:
        kv_cache_len = _positive("estimate.kv_cache_len", kv_cache_len)
    base_quant, double_quant = _check_quant(method, cfg, base_quant, double_quant)
    targets = method_targets(shape, method, cfg)
    _check_targets(shape, method, targets)

    train, c, w = mode == "train", DTYPE_BYTES[precision], DTYPE_BYTES[weights_dtype]
    notes = [f"{method}: approximate, see peftlab/estimate.py"] if method in APPROXIMATE else []
    if shape.max_positions and seq_len > shape.max_positions:
        notes.append(f"seq_len {seq_len} > max_position_embeddings {shape.max_positions} of this model")
    trainable = _method_parameters(shape, method, cfg, targets) + (0 if method == "full" else head_parameters(shape))
    frozen, quant_consts, trainable_bytes = _weight_bytes(shape, method, targets, trainable, w, base_quant,
                                                          double_quant, train)
    grads = opt_states = opt_temp = 0
    if train:
        grads, opt_states, opt_temp = _training_state(shape, method, targets, trainable, w, optimizer,
                                                      master_weights, device, notes)

    kernel = attention if attention != "auto" else (
        "math" if device == "cpu" and train and shape.attention_dropout > 0 else "sdpa")
    if kernel != "sdpa":
        why = " (CPU flash attention has no dropout)" if attention == "auto" else ""
        notes.append(f"attention: the {kernel} kernel keeps the a·s² attention matrix{why}")
    step = _Step(shape=shape, method=method, cfg=cfg, targets=targets, batch=batch_size, seq=seq_len, c=c,
                 w=w, cuda=device == "cuda", kernel=kernel, quantized=base_quant is not None,
                 checkpointing=bool(gradient_checkpointing), task=task, padded=bool(padded))
    activations, last_block = _training_activations(step) if train else (_inference_activations(step), 0.0)
    kv_cache = 0
    if not train:
        length = (kv_cache_len or seq_len) + step.virtual_tokens
        kv_cache = 2 * shape.layers * shape.kv_heads * shape.head_dim * length * batch_size * c
    overhead = (DEFAULT_CUDA_OVERHEAD if device == "cuda" else 0) if overhead_bytes is None else int(overhead_bytes)

    persistent = frozen + quant_consts + trainable_bytes + opt_states + kv_cache + overhead
    if train:
        # Gradients that exist when backward starts: all of a PEFT method's (they are small), but
        # only the output layer's for full fine-tuning (lm_head, or the classification head, comes first).
        first = shape.vocab * shape.hidden if shape.is_decoder else head_parameters(shape)
        early_grads = grads if method != "full" else min(grads, first * w)
        peak_phase, transient = _peak(activations + early_grads, grads + last_block, grads + opt_temp, notes,
                                      grads - early_grads, last_block, opt_temp)
    else:
        peak_phase, transient = "forward", activations
    cpu = train and device == "cpu"
    runtime = CPU_RUNTIME if cpu else 0
    slack = int(HEAP_SLACK_BASE + CPU_HEAP_SLACK * _heap_activations(step, activations)) if cpu and heap_slack else 0

    inputs = dict(model=shape.name, method=method, method_cfg=json.loads(json.dumps(cfg, default=str)),
                  batch_size=batch_size, seq_len=seq_len, precision=precision, weights_dtype=weights_dtype,
                  gradient_checkpointing=bool(gradient_checkpointing), optimizer=optimizer, mode=mode,
                  base_quant=base_quant, double_quant=double_quant, kv_cache_len=kv_cache_len,
                  master_weights=master_weights, device=device, attention=kernel, task=task, padded=bool(padded),
                  heap_slack=bool(heap_slack))
    return Estimate(frozen_weights=int(frozen), trainable_weights=int(trainable_bytes), gradients=int(grads),
                    optimizer_states=int(opt_states), activations=int(activations), kv_cache=int(kv_cache),
                    quant_constants=int(quant_consts), overhead=int(overhead), cpu_runtime=int(runtime),
                    cpu_heap_slack=int(slack), total_bytes=int(persistent + transient + runtime + slack),
                    total_params=count_parameters(shape), trainable_params=trainable, peak_phase=peak_phase,
                    inputs=inputs, notes=notes)


def _weight_bytes(shape: ModelShape, method: str, targets: list[Target], trainable: int, w: int,
                  base_quant: str | None, double_quant: bool, train: bool) -> tuple[float, float, float]:
    """(frozen weights, quantization constants, trainable weights)."""
    if method == "full":  # the weights train in their own dtype; inference of the result is just weights
        return (0 if train else trainable * w), 0, (trainable * w if train else 0)
    frozen = count_parameters(shape) - head_parameters(shape) - (bias_parameters(shape) if method == "bitfit" else 0)
    weights, constants = _frozen_weight_bytes(shape, frozen, w, base_quant, double_quant)
    return weights + 4 * _frozen_extra_parameters(method, targets), constants, 4 * trainable  # adapters: fp32


def _training_state(shape: ModelShape, method: str, targets: list[Target], trainable: int, w: int,
                    optimizer: str, master_weights: bool, device: str, notes: list) -> tuple[float, float, float]:
    """(gradients, optimizer states, the optimizer step's temporaries)."""
    param_bytes = w if method == "full" else 4
    grads = trainable * param_bytes
    states = _optimizer_state_bytes(trainable, param_bytes, optimizer, master_weights)
    if method == "adalora":
        states += 2 * 4 * (trainable - head_parameters(shape))
        notes.append("adalora: + sensitivity and uncertainty EMAs, two fp32 copies of the adapter")
    if method == "full" and param_bytes < 4:
        notes.append("full fine-tuning of 16-bit weights: " + (
            "assumes fp32 master weights (+4 bytes/param in optimizer states)" if master_weights
            else "no master weights, moments in the weights' dtype"))
    temp = 0
    if optimizer == "adamw":  # foreach (CUDA) makes one state-sized temporary; CPU goes tensor by tensor (two)
        largest = shape.vocab * shape.hidden if method == "full" else max([t.rank * max(t.d_in, t.d_out)
                                                                           for t in targets] or [0])
        temp = 4 * (trainable if device == "cuda" else min(2 * trainable, 2 * largest))
    return grads, states, temp


def _peak(start: float, end: float, update: float, notes: list, later_grads: float, last_block: float,
          temp: float) -> tuple[str, float]:
    """The largest of the three moments of a step (beyond what persists), and a note on why."""
    moments = {"backward start": start, "backward end": end, "optimizer step": update}
    phase = max(moments, key=moments.get)
    if phase == "optimizer step":
        notes.insert(0, f"peak at the optimizer step: activations are freed by then; the update's temporaries "
                     f"add {temp / GiB:.2f} GiB")
    elif phase == "backward end":
        notes.insert(0, "peak at the end of backward: every gradient exists, and only the first block's "
                     f"activations and their gradients ({last_block / GiB:.2f} GiB) are left")
    elif later_grads > 0:
        notes.insert(0, f"peak when backward starts: the gradients made later ({later_grads / GiB:.2f} GiB) "
                     "take the place of activations that backward frees")
    return phase, moments[phase]


def _check_quant(method: str, cfg: Mapping[str, Any], base_quant: str | None,
                 double_quant: bool | None) -> tuple[str | None, bool]:
    if base_quant in ("none", "None", "null", ""):
        base_quant = None
    if method == "qlora":
        base_quant = base_quant or ("int8" if cfg["bits"] == 8 else cfg["quant_type"])
        double_quant = (cfg["double_quant"] if double_quant is None else double_quant) and base_quant != "int8"
        if base_quant not in QUANT_BITS:
            raise ConfigError("method.base_quant", f"qlora cannot use a {base_quant!r} base; allowed: "
                              "nf4, fp4 (bits=4), int8 (bits=8)")
    if base_quant is not None and base_quant not in QUANT_BITS:
        raise ConfigError("method.base_quant", f"got {base_quant!r}; allowed: none, {', '.join(QUANT_BITS)}")
    if base_quant is not None and method == "full":
        raise ConfigError("method.base_quant", f"full fine-tuning trains the base weights, which cannot be "
                          f"{base_quant}; allowed: none (or a PEFT method such as qlora)")
    if double_quant and base_quant not in ("nf4", "fp4"):
        raise ConfigError("method.double_quant", f"double quantization needs a 4-bit base, got {base_quant}; "
                          "allowed: false, or base_quant nf4 / fp4")
    return base_quant, bool(double_quant)


def _frozen_weight_bytes(shape: ModelShape, params: int, w: int, base_quant: str | None,
                         double_quant: bool) -> tuple[float, float]:
    """(weights, quantization constants) of the frozen base."""
    if base_quant is None:
        return params * w, 0
    quantized = quantizable_parameters(shape)
    weights = quantized * QUANT_BITS[base_quant] / 8 + (params - quantized) * w
    if base_quant == "int8":  # LLM.int8: one fp32 scale per output row
        return weights, 4 * shape.layers * sum(d_out for _, d_out, _ in shape.linears().values())
    bits = 8 / 64 + 32 / (64 * 256) if double_quant else 32 / 64
    return weights, quantized * bits / 8


def _optimizer_state_bytes(trainable: int, param_bytes: int, optimizer: str, master_weights: bool) -> float:
    master = 4 * trainable if param_bytes < 4 and master_weights else 0
    if optimizer == "adamw8bit":
        return 2 * trainable + 2 * 4 * trainable / 256 + master  # uint8 moments + an fp32 absmax per 256
    moment = 4 if param_bytes == 4 or master_weights else param_bytes
    return 2 * moment * trainable + master


# --------------------------------------------------------------------------- #
# Activations, tensor by tensor (bytes per token unless said otherwise)
# --------------------------------------------------------------------------- #
@dataclass
class _Step:
    shape: ModelShape
    method: str
    cfg: Mapping[str, Any]
    targets: list[Target]
    batch: int
    seq: int
    c: int              # bytes of the compute dtype
    w: int              # bytes of the weights' dtype (> c: autocast)
    cuda: bool
    kernel: str         # sdpa | math | eager
    quantized: bool
    checkpointing: bool
    task: str           # lm | classification
    padded: bool        # an attention mask is passed

    @property
    def autocast(self) -> bool:
        return self.w > self.c

    @property
    def mask(self) -> int:  # bytes per dropout-mask element
        return 1 if self.cuda else self.c

    @property
    def virtual_tokens(self) -> int:
        return int(self.cfg.get("num_virtual_tokens", 0)) if self.method in ("prefix", "prompt") else 0

    @property
    def tokens(self) -> int:  # prompt tuning lengthens every sequence
        return self.batch * (self.seq + (self.virtual_tokens if self.method == "prompt" else 0))


def _attention_core(x: _Step) -> float:
    """What attention keeps: q, k, v and the output (SDPA), or q, k, v and the a·s² matrix (math)."""
    a, d, c = x.shape.heads, x.shape.head_dim, x.c
    qd, kvd = a * d, x.shape.kv_heads * d
    if x.kernel == "sdpa":  # with a mask, transformers repeats grouped K/V to every head first
        return c * (2 * qd + 2 * (qd if x.padded else kvd)) + 4 * a  # + fp32 logsumexp per head
    if x.kernel == "math" and not x.cuda:
        c = 4  # torch's math kernel computes 16-bit inputs in fp32 on CPU
    dropout = x.shape.attention_dropout > 0
    probs = c + ((1 if x.cuda else c) + c if dropout else 0) + (4 if x.kernel == "eager" and c < 4 else 0)
    return c * 3 * qd + a * (x.seq + x.virtual_tokens) * probs  # q, k, v (repeated to every head), softmax


STAGES = ("attn", "o", "mlp", "down")  # where a block's tensors sit, in forward order (INPUT_GROUP's values)


def _block_bytes(x: _Step, adapted: Any, from_stage: str = "attn") -> float:
    """Bytes per token one block keeps for backward; ``adapted`` is FULL or the block's targets.

    ``from_stage``: in the first adapted block, nothing before the first adapter needs a gradient,
    so only the stages from there on count.
    """
    s, c, mask = x.shape, x.c, (x.mask if x.shape.hidden_dropout > 0 else 0)
    h, i = s.hidden, s.intermediate
    full = adapted == FULL
    if s.family == "llama":  # RMSNorm: fp32 input + 1/rms (+ its normalised input when its weight trains)
        norm = 4 * h + 4 + (x.w * h if full else 0)
        qk_norm = 4 * (s.heads + s.kv_heads) * s.head_dim if s.qk_norm else 0
        stage = {"attn": norm + qk_norm + _attention_core(x), "o": 0.0,
                 "mlp": norm + 3 * c * i, "down": 0.0}           # SwiGLU: gate out, SiLU out, up out
    elif s.family == "bert":  # post-LN: attention, o + dropout + LayerNorm, GELU, down + dropout + LayerNorm
        layer_norm = x.w * h + 8  # input (fp32 under autocast) + mean, rstd
        stage = {"attn": _attention_core(x), "o": mask * h + layer_norm,
                 "mlp": c * i, "down": mask * h + layer_norm}
    else:  # gpt2, pre-LN; gelu_new keeps four intermediates
        layer_norm = x.w * h + 8
        stage = {"attn": layer_norm + _attention_core(x), "o": mask * h,
                 "mlp": layer_norm + (4 if s.gelu_tanh_python else 1) * c * i, "down": mask * h}
    width = {"attn": h, "o": s.heads * s.head_dim, "mlp": h, "down": i}
    if x.kernel == "sdpa" and not x.autocast:
        width["o"] = 0  # the o-projection reads the kernel's output, kept already
    if full:  # every linear keeps its input: shared, or one autocast copy per linear
        for name in s.linears():
            group = INPUT_GROUP[name]
            stage[group] += c * width[group] / (1 if x.autocast else sum(INPUT_GROUP[n] == group for n in s.linears()))
    else:
        _add_adapter_bytes(x, adapted, width, stage)
    return sum(stage[g] for g in STAGES[STAGES.index(from_stage):])


def _add_adapter_bytes(x: _Step, targets: list[Target], width: dict[str, int], stage: dict[str, float]) -> None:
    """What the adapters of one block keep, by stage: inputs (shared unless autocast or dropout), their own."""
    c, method = x.c, x.method
    dropout = float(x.cfg.get("dropout", 0.0) or 0.0)
    feedforward = set(x.cfg.get("feedforward") or [])
    shared = set()
    for t in targets:
        group = INPUT_GROUP[t.short]
        reads_input = method not in ("vera", "adapter") and not (method == "ia3" and t.short not in feedforward)
        extra = 0.0
        if dropout > 0 and method in LORA_LIKE + ("vera",):
            extra += t.d_in * (c + (1 if x.cuda else x.w))  # its own dropped copy + mask
        elif reads_input and x.autocast and method != "ia3":
            extra += c * t.d_in  # autocast casts the input again for each adapter
        elif reads_input:
            shared.add(group)
        if method in LORA_LIKE:
            extra += c * t.rank  # A x, for B's gradient
        if method == "dora":
            extra += c * t.d_out  # W0 x + s B A x, for the magnitude's gradient
        if method == "vera":
            extra += c * (t.rank + t.d_out)  # A x and B diag(d) A x, for d's and b's gradients
        if method == "ia3" and t.short not in feedforward:
            extra += c * t.d_out  # W0 x, for the scale's gradient
        if method == "loha" and _khatri_rao(t):
            extra += c * t.rank * t.rank  # V x, the rank-r² intermediate
        if method == "lokr":
            from peftlab.methods.lokr import factorization

            factor = int(x.cfg["decompose_factor"])
            extra += c * factorization(t.d_out, factor)[0] * factorization(t.d_in, factor)[1]  # W1 X
        if method == "adapter":  # the sublayer output; the bottleneck's pre-activation unless ReLU/tanh
            extra += c * (t.d_out + t.rank * (1 if x.cfg.get("nonlinearity") in ("relu", "tanh") else 2))
        stage[group] += extra
    for group in shared:
        stage[group] += c * width[group]


def _khatri_rao(t: Target) -> bool:
    """peftlab's LoHa computes x ↦ U(Vx) when that is cheaper than building ΔW."""
    return t.rank * t.rank * (t.d_in + t.d_out) < t.d_in * t.d_out


def _per_block_plan(x: _Step) -> list[tuple[Any, str] | None]:
    """For every block: (FULL or its targets, the stage gradients start at), or None when none reach it."""
    s = x.shape
    if x.method == "full":
        return [(FULL, "attn")] * s.layers
    by_layer: dict[int, list[Target]] = {}
    for t in x.targets:
        by_layer.setdefault(t.layer, []).append(t)
    if x.method in ("prompt", "prefix", "bitfit"):  # the input embeddings or every attention train
        return [(by_layer.get(n, []), "attn") for n in range(s.layers)]
    first = min(by_layer, default=s.layers)
    plan: list[tuple[Any, str] | None] = [None] * first
    if first < s.layers:
        plan.append((by_layer[first], min((INPUT_GROUP[t.short] for t in by_layer[first]), key=STAGES.index)))
    return plan + [(by_layer.get(n, []), "attn") for n in range(first + 1, s.layers)]


def _stem_bytes(x: _Step) -> float:
    """Per token, outside the blocks: final norm, embeddings' LayerNorm, lm_head input, token ids."""
    s, c, h = x.shape, x.c, x.shape.hidden
    full = x.method == "full"
    if s.family == "llama":
        return 4 * h + 4 + (2 * c * h if full else 0) + 16
    embeddings_train = full or x.method in ("bitfit", "prompt")
    embed_ln = (x.w * h + 8 + (x.mask * h if s.hidden_dropout > 0 else 0)) if embeddings_train else 0
    if s.family == "gpt2":
        return x.w * h + 8 + (c * h if full else 0) + embed_ln + 16
    pooled = c * h if full and s.model_type == "bert" else 0  # a trainable pooler keeps the last hidden state
    return embed_ln + pooled + 16


def _weight_copies(x: _Step, blocks: int) -> float:
    """Bytes independent of tokens: low-precision weight copies kept for backward, dense ΔWs."""
    s, c = x.shape, x.c
    block_weights = sum(d_in * d_out for d_in, d_out, _ in s.linears().values())
    lm_head = s.vocab * s.hidden if s.is_decoder else 0
    total = 0.0
    if x.autocast and not x.quantized:  # each linear's bf16 weight cast, kept for its input gradient
        total += c * (blocks * block_weights + lm_head)
    elif x.autocast:
        total += c * lm_head
    if x.method == "full" and not x.autocast:
        return total
    if x.c < 4:  # adapters are fp32, cast to the compute dtype per use
        total += c * sum(t.rank * (t.d_in + t.d_out) for t in x.targets if x.method in LORA_LIKE)
    if x.method == "loha":  # the dense form keeps W1a W1b, W2a W2b and ΔW (out, in)
        total += sum(3 * c * t.d_in * t.d_out for t in x.targets if not _khatri_rao(t))
    if x.quantized:
        total += c * max(d_in * d_out for d_in, d_out, _ in s.linears().values())  # one dequantized weight
    return total


def _logits_bytes(x: _Step) -> float:
    """Per token when backward starts. lm: the loss's fp32 log-softmax and the two fp32 gradients its
    backward makes (peftlab's loss drops the logits themselves; a loop that keeps the model output
    alive adds their bytes). A causal LM scoring one position: the full-size gradient of the logits."""
    if not x.shape.is_decoder:
        return 0.0
    return x.shape.vocab * (12 if x.task == "lm" else x.c)


def _training_activations(x: _Step) -> tuple[float, float]:
    """(bytes when backward starts, bytes of the last block's backward: its tensors and their gradients)."""
    blocks = [_block_bytes(x, *entry) for entry in _per_block_plan(x) if entry is not None]
    tokens, s = x.tokens, x.shape
    prefix = 0.0
    if x.method == "prefix":  # the virtual keys and values, expanded over the batch, in every block
        prefix = s.layers * x.batch * 2 * x.virtual_tokens * s.kv_heads * s.head_dim * x.c
    logits = x.batch * x.seq * _logits_bytes(x)  # prompt tuning's virtual positions are cut before the loss
    mask = x.batch * (x.seq + x.virtual_tokens) ** 2 if x.padded else 0  # one bool mask, shared by the blocks
    fixed = prefix + mask + tokens * _stem_bytes(x)
    block = tokens * max(blocks, default=0.0)
    workspace = BACKWARD_WORKSPACE * block
    if not x.checkpointing:
        start = fixed + _weight_copies(x, len(blocks)) + tokens * sum(blocks) + max(logits, workspace)
        return start, block + workspace
    inputs = tokens * s.layers * x.c * s.hidden  # each block's input
    one_block = _weight_copies(x, 1) + block + workspace  # recomputed, then its backward
    return fixed + inputs + max(logits, one_block), one_block


def _heap_activations(x: _Step, activations: float) -> float:
    """The activations that glibc's heap holds: all but logits-sized tensors of ``GLIBC_MMAP_MAX`` or more
    (smollm2's (b, s, 49152) logits at 8 × 64 are 96 MiB), which glibc maps and unmaps by themselves."""
    if not x.shape.is_decoder or x.batch * x.seq * x.shape.vocab * 4 < GLIBC_MMAP_MAX:
        return activations
    return max(activations - x.batch * x.seq * _logits_bytes(x), 0.0)


def _inference_activations(x: _Step) -> float:
    """One block's working set for the whole prompt, plus the last position's logits per sequence."""
    s, c, h = x.shape, x.c, x.shape.hidden
    qd, kvd = s.heads * s.head_dim, s.kv_heads * s.head_dim
    mlp = c * (3 * s.intermediate + 2 * h) + 4 * h
    attention = c * (2 * qd + 2 * kvd + 2 * h)
    if x.kernel != "sdpa":
        attention += s.heads * (x.seq + x.virtual_tokens) * (c + 4)
    logits = x.batch * s.vocab * (c + 4) if s.is_decoder else 0
    dequant = c * max(d_in * d_out for d_in, d_out, _ in s.linears().values()) if x.quantized else 0
    return x.tokens * max(mlp, attention) + logits + dequant


__all__ = [
    "Estimate", "KNOWN_METHODS", "ModelShape", "PARTS", "Target", "as_shape", "bias_parameters", "block_parameters",
    "count_parameters", "estimate", "head_parameters", "list_presets", "load_arch", "load_config", "method_targets",
    "quantizable_parameters", "resolve_method_config", "trainable_parameters",
]


# --------------------------------------------------------------------------- #
# The sanity table a researcher knows (peftlab/presets/README.md, tests)
# --------------------------------------------------------------------------- #
LLAMA2_7B_REFERENCE = [
    # (row, reference GB, estimate() arguments)
    ("bf16 inference, 2k context, batch 1", 16.0,
     dict(method="lora", mode="inference", batch_size=1, seq_len=2048, precision="bf16")),
    ("LoRA (r=8, q v) bf16, batch 4 × 2k, checkpointing", 25.0,
     dict(method="lora", batch_size=4, seq_len=2048, precision="bf16", gradient_checkpointing=True)),
    ("QLoRA (r=64, all-linear, NF4 + DQ), batch 4 × 2k, checkpointing", 12.0,
     dict(method="qlora", batch_size=4, seq_len=2048, precision="bf16", gradient_checkpointing=True)),
    ("full fine-tuning bf16 + AdamW, batch 4 × 2k, checkpointing", 80.0,
     dict(method="full", batch_size=4, seq_len=2048, precision="bf16", gradient_checkpointing=True)),
]


def sanity_table(model: str = "llama-2-7b") -> str:
    """Markdown: the Llama-2-7B rows of the usual sanity table beside this estimator's numbers."""
    lines = ["| configuration | reference | estimate (GB) | weights | trainable + grads + optimizer | activations "
             "| KV cache | overhead |", "|---|---|---|---|---|---|---|---|"]
    for row, reference, kwargs in LLAMA2_7B_REFERENCE:
        e = estimate(model, **kwargs)
        ref = f"> {reference:.0f} GB" if kwargs["method"] == "full" else f"~{reference:.0f} GB"
        state = e.trainable_weights + e.gradients + e.optimizer_states
        weights = (e.frozen_weights + e.quant_constants) / GB
        lines.append(f"| {row} | {ref} | **{e.total_bytes / GB:.1f}** | {weights:.2f} "
                     f"| {state / GB:.2f} | {e.activations / GB:.2f} | {e.kv_cache / GB:.2f} | {e.overhead / GB:.2f} |")
    return "\n".join(lines)
