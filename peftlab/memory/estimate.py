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
trainable weights  counted by the method itself: it is applied to a meta-device copy of the model
                   (shapes, no data), so the count is what ``peftlab train`` trains, exactly;
                   adapters and the task head are fp32 (peftlab creates them so), a method that
                   trains the base's weights (full fine-tuning) trains them in their own dtype.
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
                   glibc returns freed tensors to the OS. With 16-bit compute (bf16 autocast)
                   oneDNN JIT-compiles its matmul kernels into anonymous memory on first use:
                   + ``CPU_LOWP_RUNTIME_BASE`` (10 MiB) + ``CPU_LOWP_RUNTIME_PER_SHAPE`` (2 MiB)
                   per distinct linear shape of the base (minilm 1 × 32 bf16: 5.4 MiB of tensors
                   by the profiler, 50 MiB of RSS growth, 28 MiB in fp32). Each new batch width
                   compiles again (~2 MiB per shape), so a long bf16 run on CPU with many widths
                   grows past this (up to oneDNN's primitive cache, 1024 kernels).
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
it and against profiler peaks of real steps in tests/memory/test_estimate.py:

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
  bytes); 15 · b · s · vocab with 16-bit logits (autocast: the fp32 copy the loss reads, and the
  16-bit gradients of that cast and of the shifting slice, measured with the profiler). Scoring one position (classification with a causal LM) costs one logits-sized gradient;
* padded batches: transformers passes SDPA the mask (b·s² bytes) and repeats grouped K/V;
* a block's backward briefly adds gradients of its tensors, ``BACKWARD_WORKSPACE`` = 0.4 of its
  saved bytes (measured); so does the moment backward ends, when every gradient exists but only
  the first block's tensors are left (this one can set a full fine-tuning's peak), except the input
  embeddings' gradients, made after that block (unless tied to the output layer);
* gradient checkpointing keeps each block's input and recomputes one block at a time in
  backward: inputs + max(logits and loss buffers, 1.4 × one block);
* inference: one block's working set plus the last position's logits (generation keeps one).

Methods own their terms: what each adapted layer keeps (``saved_for_backward``), copies of its
weights kept for backward, extra optimizer state, virtual tokens, a quantized base (the "memory
terms" hooks of peftlab/methods/base.py). This module, peftlab/memory/activations.py and
peftlab/memory/shapes.py name no method. A method whose terms were not checked tensor by tensor
(``memory_approximate``, the default for a new method) gets a note saying its estimate is
approximate: today AdaLoRA (counted at its initial rank; masked triplets stay allocated), prefix
and prompt tuning, bottleneck adapters, LoHa / LoKr / DoRA / VeRA (their extra saved tensors
follow peftlab's implementations of them, not a published count).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Mapping

import torch

from peftlab.errors import ConfigError
from peftlab.memory.activations import (
    Step,
    Target,
    heap_activations,
    inference_activations,
    training_activations,
)
from peftlab.memory.measure import RESIDENT_PARTS
from peftlab.memory.shapes import (
    ModelShape,
    as_shape,
    bias_parameters,
    block_parameters,
    count_parameters,
    head_names,
    head_parameters,
    list_presets,
    load_arch,
    load_config,
    meta_model,
    quantizable_parameters,
)
from peftlab.methods import METHODS
from peftlab.methods.base import Method, logical_numel
from peftlab.models.targets import BLOCK, FAMILIES

MiB, GiB, GB = 2**20, 2**30, 10**9
DEFAULT_CUDA_OVERHEAD = int(0.75 * GiB)

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
QUANT_BITS = {"int8": 8, "nf4": 4, "fp4": 4}
OPTIMIZERS = ("adamw", "adamw8bit")
MODES = ("train", "inference")
DEVICES = ("cuda", "cpu")
ATTENTION = ("auto", "sdpa", "math", "eager")
# A task type's loss, as the activation model sees it: next-token logits at every position (lm; generation's
# completion loss computes them too), or one score per sequence (a multiple-choice option is a sequence of
# its own: estimate it at batch × options)
LOSS_KIND = {"lm": "lm", "generation": "lm", "classification": "classification", "regression": "classification",
             "multiple_choice": "classification"}
KNOWN_METHODS = tuple(METHODS)  # every registered method; the estimate asks each for its own terms
# CPU training only: process memory that is not tensors (module docstring, "cpu runtime" and "cpu heap
# slack"). The runtime is measured directly; the slack is fitted (experiments/memory_check/fit.py).
CPU_RUNTIME = 20 * MiB
# CPU with 16-bit compute (bf16 autocast): oneDNN JIT-compiles its low-precision matmul kernels on first
# use, into anonymous memory (RSS that is no tensor): a one-time base and some per distinct linear shape
# (measured: experiments/memory_check, 10 MiB + ~2 MiB per (in, out) shape and batch width; fp32 calls
# precompiled BLAS and adds nothing).
CPU_LOWP_RUNTIME_BASE = 10 * MiB
CPU_LOWP_RUNTIME_PER_SHAPE = 2 * MiB
HEAP_SLACK_BASE = 90 * MiB
CPU_HEAP_SLACK = 0.38


# --------------------------------------------------------------------------- #
# The method, applied to a shapes-only copy of the model
# --------------------------------------------------------------------------- #
def make_method(method: str, method_cfg: Mapping[str, Any] | None = None) -> Method:
    """The registered method with its defaults, overridden and checked as ``peftlab train`` does."""
    if method not in METHODS:
        raise ConfigError("method", f"unknown method {method!r}; allowed: {', '.join(sorted(METHODS))}")
    cls = METHODS[method]
    allowed = [f.name for f in dataclasses.fields(cls.config_class) if f.name != "name"]
    values = {k: v for k, v in dict(method_cfg or {}).items() if k != "name"}
    for key in values:
        if key not in allowed:
            raise ConfigError(f"method.{key}", f"not a setting of {method}; allowed: {', '.join(allowed)}")
    return cls(cls.config_class(**values))  # the method's own checks, each naming its key


@dataclass
class Adapted:
    """What the estimate reads off the method applied to a meta-device copy of the model."""

    method: Method
    trainable: int              # parameters that train, the task head included
    trainable_base: int         # of those, the base's own (head, biases, every weight for full fine-tuning)
    added_frozen_bytes: int     # frozen tensors the method adds (VeRA's shared projections, masks)
    largest_trainable: int      # elements of the largest trainable tensor (the CPU optimizer's temporaries)
    targets: list[Target]       # its layers inside the blocks, with their shapes


def adapt(shape: ModelShape, method: Method, seq_len: int | None = None) -> Adapted:
    """Apply a fresh copy of ``method`` to a meta-device model of ``shape``, exactly as ``peftlab train``
    does (its checks included: a rank that cannot fit raises the same ConfigError), and count."""
    model = meta_model(shape)
    head = set(head_names(model))
    before = {id(t) for t in [*model.parameters(), *model.buffers()]}
    fresh = type(method)(method.config)
    arch = SimpleNamespace(head_parameters=sorted(head), max_length=seq_len, tokenizer=None, path=None,
                           kind="causal" if shape.is_decoder else "encoder")
    with torch.random.fork_rng(devices=[]):  # planning never shifts the run's random stream
        fresh.check(model, arch)
        fresh.apply(model, arch)
    for name, p in model.named_parameters():
        if name in head:  # the trainer trains the new head under every method
            p.requires_grad_(True)
    params = {id(p): p for p in model.parameters()}.values()
    trainable = [p for p in params if p.requires_grad]
    added = [t for t in [*params, *{id(b): b for b in model.buffers()}.values()]
             if id(t) not in before and not getattr(t, "requires_grad", False)]
    return Adapted(
        method=fresh,
        trainable=sum(p.numel() for p in trainable),
        trainable_base=sum(p.numel() for p in trainable if id(p) in before),
        added_frozen_bytes=sum(logical_numel(t) * t.element_size() for t in added),
        largest_trainable=max((p.numel() for p in trainable if id(p) not in before or fresh.trains_base_weights),
                              default=0),
        targets=_targets(shape, fresh.layers(model)),
    )


def _targets(shape: ModelShape, layers: Mapping[str, Any]) -> list[Target]:
    """The method's layers that sit inside a block and wrap one of its linear layers."""
    linears = shape.linears()
    short_of = {FAMILIES[shape.family][s]: s for s in reversed(list(FAMILIES[shape.family])) if s in linears}
    found = []
    for name, layer in layers.items():
        match = BLOCK.search(name)
        if match and match.group(2) in short_of:
            short = short_of[match.group(2)]
            d_in, d_out, _ = linears[short]
            found.append(Target(int(match.group(1)), short, d_in, d_out, layer))
    return sorted(found, key=lambda t: t.layer)


def trainable_parameters(shape: Any, method: str, method_cfg: Mapping[str, Any] | None = None) -> int:
    """What ``method`` trains on ``shape``, the task head included: counted by the method itself."""
    return adapt(as_shape(shape), make_method(method, method_cfg)).trainable


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
    chosen = make_method(method, method_cfg)
    cfg = dataclasses.asdict(chosen.config)
    batch_size = _positive("trainer.batch_size", batch_size)
    seq_len = _positive("task.max_length", seq_len)
    precision = _dtype("trainer.precision", precision)
    weights_dtype = _dtype("model.dtype", weights_dtype or precision)
    _choice("optim.name", optimizer, OPTIMIZERS)
    _choice("mode", mode, MODES)
    _choice("trainer.device", device, DEVICES)
    _choice("estimate.attention", attention, ATTENTION)
    task = _choice("task.type", ("lm" if shape.is_decoder else "classification") if task == "auto"
                   else LOSS_KIND.get(task, task), ("lm", "classification") if shape.is_decoder else ("classification",))
    if kv_cache_len is not None:
        kv_cache_len = _positive("estimate.kv_cache_len", kv_cache_len)
    base_quant, double_quant = _check_quant(chosen, base_quant, double_quant)
    adapted = adapt(shape, chosen, seq_len)
    chosen, targets, trainable = adapted.method, adapted.targets, adapted.trainable

    train, c, w = mode == "train", DTYPE_BYTES[precision], DTYPE_BYTES[weights_dtype]
    notes = [f"{method}: approximate, see peftlab/memory/estimate.py"] if chosen.memory_approximate else []
    if shape.max_positions and seq_len > shape.max_positions:
        notes.append(f"seq_len {seq_len} > max_position_embeddings {shape.max_positions} of this model")
    frozen, quant_consts, trainable_bytes = _weight_bytes(shape, adapted, w, base_quant, double_quant, train)
    grads = opt_states = opt_temp = 0
    if train:
        grads, opt_states, opt_temp = _training_state(shape, adapted, w, optimizer, master_weights, device, notes)

    kernel = attention if attention != "auto" else (
        "math" if device == "cpu" and train and shape.attention_dropout > 0 else "sdpa")
    if kernel != "sdpa":
        why = " (CPU flash attention has no dropout)" if attention == "auto" else ""
        notes.append(f"attention: the {kernel} kernel keeps the a·s² attention matrix{why}")
    step = Step(shape=shape, method=chosen, targets=targets, batch=batch_size, seq=seq_len, c=c,
                 w=w, cuda=device == "cuda", kernel=kernel, quantized=base_quant is not None,
                 checkpointing=bool(gradient_checkpointing), task=task, padded=bool(padded))
    activations, last_block = training_activations(step) if train else (inference_activations(step), 0.0)
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
        early_grads = grads if not chosen.trains_base_weights else min(grads, first * w)
        # when the first block's backward runs, the input embeddings' gradients are still to come (unless
        # they are the output layer's, tied, made first)
        late = _input_embedding_parameters(shape) * w if chosen.trains_base_weights else 0
        end = max(grads - late + last_block, grads)
        peak_phase, transient = _peak(activations + early_grads, end, grads + opt_temp, notes,
                                      grads - early_grads, last_block, opt_temp)
    else:
        peak_phase, transient = "forward", activations
    cpu = train and device == "cpu"
    runtime = (CPU_RUNTIME + (_lowp_kernels(shape) if c < 4 else 0)) if cpu else 0
    slack = int(HEAP_SLACK_BASE + CPU_HEAP_SLACK * heap_activations(step, activations)) if cpu and heap_slack else 0

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


def _input_embedding_parameters(shape: ModelShape) -> int:
    """Token (unless tied to a decoder's output layer), position and token-type embeddings."""
    tokens = 0 if shape.is_decoder and shape.tied else shape.vocab
    positions = shape.max_positions if shape.family != "llama" else 0  # llama: rotary, no table
    return (tokens + positions + shape.type_vocab) * shape.hidden


def _lowp_kernels(shape: ModelShape) -> int:
    """CPU, 16-bit compute: what oneDNN's JIT-compiled kernels take, by the base's distinct linear shapes
    (the blocks' and the output layer's; one batch width each)."""
    shapes = {(d_in, d_out) for d_in, d_out, _ in shape.linears().values()}
    shapes.add((shape.hidden, shape.vocab if shape.is_decoder else 2))
    return CPU_LOWP_RUNTIME_BASE + CPU_LOWP_RUNTIME_PER_SHAPE * len(shapes)


def _weight_bytes(shape: ModelShape, adapted: Adapted, w: int, base_quant: str | None, double_quant: bool,
                  train: bool) -> tuple[float, float, float]:
    """(frozen weights, quantization constants, trainable weights)."""
    trainable = adapted.trainable
    if adapted.method.trains_base_weights:  # the weights train in their own dtype; inference: just weights
        return (0 if train else trainable * w), 0, (trainable * w if train else 0)
    frozen = count_parameters(shape) - adapted.trainable_base
    weights, constants = _frozen_weight_bytes(shape, frozen, w, base_quant, double_quant)
    return weights + adapted.added_frozen_bytes, constants, 4 * trainable  # adapters and head: fp32


def _training_state(shape: ModelShape, adapted: Adapted, w: int, optimizer: str, master_weights: bool,
                    device: str, notes: list) -> tuple[float, float, float]:
    """(gradients, optimizer states, the optimizer step's temporaries)."""
    method, trainable = adapted.method, adapted.trainable
    param_bytes = w if method.trains_base_weights else 4
    grads = trainable * param_bytes
    states = _optimizer_state_bytes(trainable, param_bytes, optimizer, master_weights)
    extra, note = method.training_state_bytes(trainable - adapted.trainable_base)
    states += extra
    if note:
        notes.append(note)
    if method.trains_base_weights and param_bytes < 4:
        notes.append(f"{method.name} trains 16-bit weights: " + (
            "assumes fp32 master weights (+4 bytes/param in optimizer states)" if master_weights
            else "no master weights, moments in the weights' dtype"))
    temp = 0
    if optimizer == "adamw":  # foreach (CUDA) makes one state-sized temporary; CPU goes tensor by tensor (two)
        temp = 4 * (trainable if device == "cuda" else min(2 * trainable, 2 * adapted.largest_trainable))
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


def _check_quant(method: Method, base_quant: str | None, double_quant: bool | None) -> tuple[str | None, bool]:
    if base_quant in ("none", "None", "null", ""):
        base_quant = None
    own = method.base_quantization()  # a method that quantizes the base says how (QLoRA)
    if own is not None:
        base_quant = base_quant or own[0]
        double_quant = (own[1] if double_quant is None else double_quant) and base_quant != "int8"
        if base_quant not in QUANT_BITS:
            raise ConfigError("method.base_quant", f"{method.name} cannot use a {base_quant!r} base; allowed: "
                              "nf4, fp4 (bits=4), int8 (bits=8)")
    if base_quant is not None and base_quant not in QUANT_BITS:
        raise ConfigError("method.base_quant", f"got {base_quant!r}; allowed: none, {', '.join(QUANT_BITS)}")
    if base_quant is not None and method.trains_base_weights:
        raise ConfigError("method.base_quant", f"{method.name} trains the base weights, which cannot be "
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
# The sanity table a researcher knows (peftlab/models/presets/README.md, tests)
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
        lower_bound = METHODS[kwargs["method"]].trains_base_weights  # "does not fit one 80 GB GPU"
        ref = f"> {reference:.0f} GB" if lower_bound else f"~{reference:.0f} GB"
        state = e.trainable_weights + e.gradients + e.optimizer_states
        weights = (e.frozen_weights + e.quant_constants) / GB
        lines.append(f"| {row} | {ref} | **{e.total_bytes / GB:.1f}** | {weights:.2f} "
                     f"| {state / GB:.2f} | {e.activations / GB:.2f} | {e.kv_cache / GB:.2f} | {e.overhead / GB:.2f} |")
    return "\n".join(lines)


__all__ = [
    "Adapted", "Estimate", "KNOWN_METHODS", "ModelShape", "PARTS", "adapt", "as_shape", "bias_parameters",
    "block_parameters", "count_parameters", "estimate", "head_parameters", "list_presets", "load_arch",
    "load_config", "make_method", "quantizable_parameters", "trainable_parameters",
]
