"""Activation memory of one step, tensor by tensor (bytes per token unless said otherwise).

The model behind these numbers is in peftlab/memory/estimate.py's docstring. What a method adds
beyond the frozen base comes from the method itself (its "memory terms" hooks,
peftlab/methods/base.py); nothing here names a method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftlab.memory.shapes import ModelShape
from peftlab.methods.base import Method

MiB = 2**20
# Which input a projection reads: q, k and v share one; gate and up share one.
INPUT_GROUP = {"q": "attn", "k": "attn", "v": "attn", "o": "o", "gate": "mlp", "up": "mlp", "down": "down"}
FULL = "full"  # marks a block whose every weight trains
# A block's backward holds gradients of its saved tensors while freeing them: measured on CPU
# (profiler peaks, llama and bert blocks, fp32 and bf16) at 0.35-0.45 of the block's saved bytes.
BACKWARD_WORKSPACE = 0.4
GLIBC_MMAP_MAX = 32 * MiB  # glibc serves requests this large with their own mmap, unmapped when freed


@dataclass(frozen=True)
class Target:
    """One adapted linear layer inside a block: where it sits and the wrapper the method put there."""

    layer: int
    short: str          # q | k | v | o | gate | up | down (GPT-2's fused c_attn is q)
    d_in: int
    d_out: int
    module: Any         # the method's layer, asked for its saved tensors and weight copies


@dataclass
class Step:
    """One training step (or inference pass) as the activation model sees it."""

    shape: ModelShape
    method: Method          # asked for its terms (peftlab/methods/base.py, "memory terms")
    targets: list[Target]   # its adapted layers inside the blocks
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
        return self.method.virtual_tokens()

    @property
    def tokens(self) -> int:  # prompt tuning lengthens every sequence
        return self.batch * (self.seq + (self.virtual_tokens if self.method.lengthens_sequence else 0))

    @property
    def trains_base(self) -> bool:
        return self.method.trains_base_weights


def _attention_core(x: Step) -> float:
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


def _block_bytes(x: Step, adapted: Any, from_stage: str = "attn") -> float:
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


def _add_adapter_bytes(x: Step, targets: list[Target], width: dict[str, int], stage: dict[str, float]) -> None:
    """What the adapters of one block keep, by stage: inputs (shared unless autocast or dropout), their own
    intermediates (each method's ``saved_for_backward``)."""
    c = x.c
    shared = set()
    for t in targets:
        group = INPUT_GROUP[t.short]
        saved = x.method.saved_for_backward(t.module)
        extra = 0.0
        if saved.dropout:
            extra += t.d_in * (c + (1 if x.cuda else x.w))  # its own dropped copy + mask
        elif saved.reads_input and x.autocast and saved.casts_input:
            extra += c * t.d_in  # autocast casts the input again for each adapter
        elif saved.reads_input:
            shared.add(group)
        stage[group] += extra + c * saved.elements
    for group in shared:
        stage[group] += c * width[group]


def _per_block_plan(x: Step) -> list[tuple[Any, str] | None]:
    """For every block: (FULL or its targets, the stage gradients start at), or None when none reach it."""
    s = x.shape
    if x.trains_base:
        return [(FULL, "attn")] * s.layers
    by_layer: dict[int, list[Target]] = {}
    for t in x.targets:
        by_layer.setdefault(t.layer, []).append(t)
    if x.method.gradient_reaches_every_block:  # the input embeddings or every attention train
        return [(by_layer.get(n, []), "attn") for n in range(s.layers)]
    first = min(by_layer, default=s.layers)
    plan: list[tuple[Any, str] | None] = [None] * first
    if first < s.layers:
        plan.append((by_layer[first], min((INPUT_GROUP[t.short] for t in by_layer[first]), key=STAGES.index)))
    return plan + [(by_layer.get(n, []), "attn") for n in range(first + 1, s.layers)]


def _stem_bytes(x: Step) -> float:
    """Per token, outside the blocks: final norm, embeddings' LayerNorm, lm_head input, token ids."""
    s, c, h = x.shape, x.c, x.shape.hidden
    full = x.trains_base
    if s.family == "llama":
        return 4 * h + 4 + (2 * c * h if full else 0) + 16
    embeddings_train = full or x.method.gradient_reaches_embeddings
    embed_ln = (x.w * h + 8 + (x.mask * h if s.hidden_dropout > 0 else 0)) if embeddings_train else 0
    if s.family == "gpt2":
        return x.w * h + 8 + (c * h if full else 0) + embed_ln + 16
    pooled = c * h if full and s.model_type == "bert" else 0  # a trainable pooler keeps the last hidden state
    return embed_ln + pooled + 16


def _weight_copies(x: Step, blocks: int) -> float:
    """Bytes independent of tokens: low-precision weight copies kept for backward, dense ΔWs."""
    s, c = x.shape, x.c
    block_weights = sum(d_in * d_out for d_in, d_out, _ in s.linears().values())
    lm_head = s.vocab * s.hidden if s.is_decoder else 0
    total = 0.0
    if x.autocast and not x.quantized:  # each linear's bf16 weight cast, kept for its input gradient
        total += c * (blocks * block_weights + lm_head)
    elif x.autocast:
        total += c * lm_head
    if x.trains_base and not x.autocast:
        return total
    total += sum(x.method.weight_copy_bytes(t.module, c) for t in x.targets)  # e.g. fp32 adapters' casts
    if x.quantized:
        total += c * max(d_in * d_out for d_in, d_out, _ in s.linears().values())  # one dequantized weight
    return total


def _logits_bytes(x: Step) -> float:
    """Per token when backward starts. lm: the loss's fp32 log-softmax and the two fp32 gradients its
    backward makes (peftlab's loss drops the logits themselves; a loop that keeps the model output
    alive adds their bytes). A causal LM scoring one position: the full-size gradient of the logits."""
    if not x.shape.is_decoder:
        return 0.0
    if x.task != "lm":
        return x.shape.vocab * x.c
    # 16-bit logits (autocast): their ``.float()`` copy feeds the loss, and backward makes the 16-bit
    # gradients of the cast and of the slice beside the fp32 ones: 15 bytes measured (profiler, the loss
    # alone on (8, 128, 49152) logits: 11.94 fp32, 15.05 bf16 autocast)
    return x.shape.vocab * (12 if x.c == 4 else 15)


def training_activations(x: Step) -> tuple[float, float]:
    """(bytes when backward starts, bytes of the last block's backward: its tensors and their gradients)."""
    blocks = [_block_bytes(x, *entry) for entry in _per_block_plan(x) if entry is not None]
    tokens, s = x.tokens, x.shape
    prefix = x.method.fixed_activation_bytes(s, x.batch, x.c)  # e.g. prefix tuning's expanded keys, values
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


def heap_activations(x: Step, activations: float) -> float:
    """The activations that glibc's heap holds: all but logits-sized tensors of ``GLIBC_MMAP_MAX`` or more
    (smollm2's (b, s, 49152) logits at 8 × 64 are 96 MiB), which glibc maps and unmaps by themselves."""
    if not x.shape.is_decoder or x.batch * x.seq * x.shape.vocab * 4 < GLIBC_MMAP_MAX:
        return activations
    return max(activations - x.batch * x.seq * _logits_bytes(x), 0.0)


def inference_activations(x: Step) -> float:
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
