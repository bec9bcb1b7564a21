"""The contract every method obeys, and the small helpers they share.

A method is a :class:`Method` subclass with a dataclass config. The trainer
talks to it only through these hooks::

    method.apply(model, arch)                 freeze the base, inject modules
    method.trainable_parameters(model)        {name: parameter} the method owns
    method.param_groups(model, lr, wd)        optimizer groups (LoRA+ uses it)
    method.on_train_start(model, total_steps) schedules that need the run length
    method.extra_loss(model)                  a regulariser added to the loss, or None
    method.after_backward(model, step)        work between backward and the step
    method.state_dict(model) / load_state_dict(model, sd)   the adapter file
    method.train_state(model) / load_train_state(model, st) training state beyond parameters (checkpoints)

Methods that adapt target layers subclass :class:`LayerMethod`: one ``plan()`` resolves the
targets and runs every check that needs the model, and both ``check()`` and ``apply()`` use it.
Memory terms the estimate needs (what a layer keeps for backward, extra state, virtual tokens)
are hooks here too, with defaults that fit a weight-space method (peftlab/memory/estimate.py).

Weight-space methods wrap each target layer in a :class:`WeightDeltaLayer`:
the original module stays reachable as ``layer.base``, ``delta_weight()``
returns W - W0 in fp32 without touching the layer, and ``merge()`` /
``unmerge()`` fold the update in and out (a second call is a no-op).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from peftlab.errors import ConfigError
from peftlab.models.targets import is_conv1d, is_linear_like, linear_shape, resolve_targets


@dataclass
class MethodConfig:
    """Fields every method config has. Subclasses add their own."""

    name: str = "?"


@dataclass
class LayerConfig(MethodConfig):
    """Fields of every method that wraps target layers (:class:`LayerMethod`)."""

    targets: Any = field(default_factory=lambda: ["q", "v"])  # short names, groups, all-linear, re:<regex>
    layers: Any = None               # None = all blocks, or [0, 1] / "0-3"


@dataclass(frozen=True)
class SavedForBackward:
    """What one adapted layer keeps for its backward, per token, beyond what the frozen base keeps.

    reads_input  it needs the layer's input x (for its weight gradient): one copy per input, shared
                 by every layer reading it, or (under autocast) its own cast of x
    casts_input  under autocast it casts x for itself (False: it uses x elementwise, as IA³'s input scale)
    dropout      it keeps its own dropped copy of x and the dropout mask (instead of sharing x)
    elements     its own intermediates (A x, B A x, ...), elements per token in the compute dtype
    """

    reads_input: bool = True
    casts_input: bool = True
    dropout: bool = False
    elements: float = 0.0


# --------------------------------------------------------------------------- #
# Layer helpers (the layer kinds themselves live in peftlab/models/targets.py)
# --------------------------------------------------------------------------- #
def base_weight(module: nn.Module) -> torch.Tensor:
    """W0 as an fp32 (out, in) tensor; dequantizes 4-/8-bit bitsandbytes weights."""
    weight = module.weight
    if is_conv1d(module):
        return weight.detach().float().t()
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, quant_state).float()
    if weight.dtype == torch.int8 and getattr(weight, "SCB", None) is not None:  # bnb Int8Params
        return weight.data.float() * weight.SCB.float().unsqueeze(1) / 127.0
    return weight.detach().float()


def to_base_layout(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """An (out, in) update in the layout of ``module.weight`` (Conv1D is transposed)."""
    return delta.t() if is_conv1d(module) else delta


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, child = get_submodule_parent(model, name)
    setattr(parent, child, new)


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


# --------------------------------------------------------------------------- #
# Weight-space layers
# --------------------------------------------------------------------------- #
class WeightDeltaLayer(nn.Module):
    """A wrapper whose effect is W0 -> W0 + ΔW on a linear-like ``base``.

    Subclasses implement ``delta_weight()`` (fp32, (out, in)), ``branch(x)``
    (the update's contribution to the output, so that
    ``forward(x) == base(x) + branch(x)`` while unmerged) and
    ``adapter_parameters()`` (role -> parameter). Low-rank layers also
    implement ``factors()`` returning (B, A) with ΔW = B @ A.

    Merging replaces the base weight by W0 + ΔW and keeps W0 aside, so
    ``unmerge()`` restores it bit for bit (one extra copy of W0 while merged).
    """

    has_weight_delta: ClassVar[bool] = True

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.merged = False
        self._original_weight: torch.Tensor | None = None

    # -- the part a subclass writes ------------------------------------------ #
    def delta_weight(self) -> torch.Tensor:  # (out, in), fp32
        """Low-rank layers get ΔW = B @ A from ``factors()``; dense ones override this."""
        factors = self.factors()
        if factors is None:
            raise NotImplementedError(f"{type(self).__name__} must define delta_weight() or factors()")
        b, a = factors
        return b @ a

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, A) with ΔW = B @ A, for low-rank updates; None for dense ones."""
        return None

    # -- shared behaviour ---------------------------------------------------- #
    @property
    def shape(self) -> tuple[int, int]:
        return linear_shape(self.base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        return out + self.branch(x).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        weight = self.base.weight
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise RuntimeError(
                f"cannot merge into a {weight.dtype} base weight; export a dequantized copy instead"
            )
        self._original_weight = weight.data
        delta = to_base_layout(self.base, self.delta_weight())
        weight.data = (weight.data.float() + delta).to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base.weight.data = self._original_weight
        self._original_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        out_f, in_f = self.shape
        return f"in={in_f}, out={out_f}, merged={self.merged}"


# --------------------------------------------------------------------------- #
# The method contract
# --------------------------------------------------------------------------- #
class Method:
    """Base class: a method object knows how to adapt a model and what it owns.

    Class attributes a method sets:
      name              registry key, e.g. "lora"
      config_class      its dataclass config (unknown keys are errors)
      has_weight_delta  False for prefix/prompt/bottleneck adapters: analysis skips them
      mergeable         whether merge()/unmerge() exist for this method
      layer_class       the wrapper type it injects (None when it injects none)
      identity_at_init  whether the adapted model equals the base before training
      size_key          the config field that sets its size for budget matching (``r``,
                        ``num_virtual_tokens``, ...); None for a fixed size (peftlab/training/budget.py)
      checkpointing_conflict  None, or why trainer.gradient_checkpointing cannot run with it (the
                        trainer refuses the combination before any evaluation)

    What the memory estimate reads (peftlab/memory/estimate.py; defaults fit a weight-space method):
      trains_base_weights          the base's own weights train, in their dtype (full fine-tuning)
      gradient_reaches_every_block its parameters sit at the input or in every block (prompt, prefix,
                                   BitFit), so every block keeps activations; else they start at the
                                   first adapted layer
      gradient_reaches_embeddings  the embeddings' output needs a gradient (prompt tuning, BitFit)
      lengthens_sequence           its virtual tokens are positions every block computes (prompt tuning)
      memory_approximate           True until its terms were checked tensor by tensor (a note says so)
    and the hooks ``virtual_tokens``, ``base_quantization``, ``saved_for_backward``,
    ``weight_copy_bytes``, ``fixed_activation_bytes``, ``training_state_bytes`` below.
    """

    name: ClassVar[str] = "?"
    config_class: ClassVar[type] = MethodConfig
    has_weight_delta: ClassVar[bool] = True
    mergeable: ClassVar[bool] = False
    layer_class: ClassVar[type | None] = None
    identity_at_init: ClassVar[bool] = True  # False for prompt/prefix tuning: virtual tokens change outputs
    size_key: ClassVar[str | None] = None    # config field budget matching sets; None = a fixed size
    trains_base_weights: ClassVar[bool] = False
    gradient_reaches_every_block: ClassVar[bool] = False
    gradient_reaches_embeddings: ClassVar[bool] = False
    lengthens_sequence: ClassVar[bool] = False
    memory_approximate: ClassVar[bool] = True
    checkpointing_conflict: ClassVar[str | None] = None

    def __init__(self, config: Any):
        self.config = config
        self.validate_config()

    # ---- checks ------------------------------------------------------------ #
    def validate_config(self) -> None:
        """Check values that need no model (ranges). Raise ConfigError."""

    def check(self, model: nn.Module, arch: Any = None) -> None:
        """Check the config against the model without changing it (the trainer calls this
        before evaluating the base, so bad targets or ranks fail in seconds). Raise ConfigError."""

    # ---- adaptation -------------------------------------------------------- #
    def apply(self, model: nn.Module, arch: Any = None) -> nn.Module:
        raise NotImplementedError

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """Injected adapter layers by module name."""
        if self.layer_class is None:
            return {}
        return {n: m for n, m in model.named_modules() if isinstance(m, self.layer_class)}

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters this method trains (the task head is not included)."""
        params: dict[str, nn.Parameter] = {}
        for layer_name, layer in self.layers(model).items():
            for role, p in layer.adapter_parameters().items():
                if p.requires_grad:
                    params[f"{layer_name}.{role}"] = p
        return params

    def expected_trainable(self, model: nn.Module) -> int:
        """Closed-form count of trainable parameters (checked against the real count)."""
        raise NotImplementedError

    # ---- size (budget matching, peftlab/training/budget.py) ------------------------- #
    def size_fields(self, value: int) -> dict[str, Any]:
        """Config fields that give this method size ``value``; a method whose size has two
        coupled fields (adapter width vs reduction factor, AdaLoRA's init_r and target_r) extends it."""
        if self.size_key is None:
            raise ValueError(f"method '{self.name}' has a fixed size")
        return {self.size_key: value}

    def resized(self, value: int) -> "Method":
        """A fresh method of this kind and config, except that its size is ``value`` (validated)."""
        return type(self)(replace(self.config, **self.size_fields(value)))

    def planned_trainable(self, model: nn.Module, arch: Any = None) -> int:
        """Parameters ``apply`` would train on ``model``, found without changing or copying its weights:
        a fresh method of this config is applied to a meta-device copy (no data, so a 135M model
        costs milliseconds). Bad values raise ConfigError as ``apply`` would. The global RNG state
        is restored, so planning never shifts the run's random stream."""
        fresh = type(self)(self.config)
        skeleton = meta_copy(model)
        with torch.random.fork_rng(devices=[]):
            fresh.apply(skeleton, arch)
        return count(fresh.trainable_parameters(skeleton))

    # ---- memory terms (peftlab/memory/estimate.py asks; bytes) --------------- #
    def virtual_tokens(self) -> int:
        """Positions the method adds in front of every sequence's keys (prefix and prompt tuning)."""
        return 0

    def base_quantization(self) -> tuple[str, bool] | None:
        """(nf4 | fp4 | int8, double quantization) when the method runs over a quantized base."""
        return None

    def saved_for_backward(self, layer: nn.Module) -> SavedForBackward:
        """What one of its layers keeps for backward: by default its input, and for a low-rank layer
        the rank-r intermediate A x."""
        factors = layer.factors() if isinstance(layer, WeightDeltaLayer) else None
        return SavedForBackward(elements=factors[1].shape[0] if factors is not None else 0)

    def weight_copy_bytes(self, layer: nn.Module, compute_bytes: int) -> float:
        """Bytes independent of tokens that one of its layers keeps for backward (casts of its
        fp32 parameters to a 16-bit compute dtype, a dense ΔW it builds)."""
        return 0.0

    def fixed_activation_bytes(self, shape: Any, batch: int, compute_bytes: int) -> float:
        """Activation bytes outside the adapted layers that do not grow with the sequence
        (``shape`` is a peftlab.memory.shapes.ModelShape)."""
        return 0.0

    def training_state_bytes(self, adapter_parameters: int) -> tuple[float, str | None]:
        """State beyond AdamW's that training keeps per adapter parameter, and a note for the estimate."""
        return 0.0, None

    # ---- trainer hooks ----------------------------------------------------- #
    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        params = list(self.trainable_parameters(model).values())
        return [{"name": self.name, "params": params, "lr": lr, "weight_decay": weight_decay}]

    def on_train_start(self, model: nn.Module, total_steps: int) -> None:
        """Called once with the number of optimizer steps the run will take."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Called after gradients of optimizer step ``step`` exist, before the update."""

    def summary(self, model: nn.Module) -> dict:
        """Method-specific facts for result.json (final ranks, resolved groups...)."""
        return {"modules": sorted(self.layers(model))}

    # ---- checkpoints ------------------------------------------------------- #
    def train_state(self, model: nn.Module) -> dict:
        """What training changes besides the trainable parameters (buffers, schedules, statistics),
        so a run resumed from a checkpoint continues exactly. Tensors, numbers, strings, and
        lists / dicts of them (read back with ``torch.load(weights_only=True)``)."""
        return {}

    def load_train_state(self, model: nn.Module, state: dict) -> None:
        """Restore :meth:`train_state`; called after ``on_train_start`` and the parameters' restore."""

    # ---- merge ------------------------------------------------------------- #
    def merge(self, model: nn.Module) -> None:
        if not self.mergeable:
            raise RuntimeError(f"method '{self.name}' has no weight delta to merge")
        for layer in self.layers(model).values():
            layer.merge()

    def unmerge(self, model: nn.Module) -> None:
        if not self.mergeable:
            raise RuntimeError(f"method '{self.name}' has no weight delta to merge")
        for layer in self.layers(model).values():
            layer.unmerge()

    def delta_weights(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """(module name, layer) pairs whose ``delta_weight()`` analysis can read."""
        if not self.has_weight_delta:
            raise ValueError(f"method '{self.name}' has no weight delta (not applicable)")
        yield from self.layers(model).items()

    # ---- the adapter file -------------------------------------------------- #
    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.trainable_parameters(model).items()}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        own = self.trainable_parameters(model)
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"adapter does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for n, p in own.items():
                if p.shape != state[n].shape:
                    raise ValueError(f"adapter tensor {n}: shape {tuple(state[n].shape)} != {tuple(p.shape)}")
                p.copy_(state[n].to(p.dtype))


class LayerMethod(Method):
    """A method that wraps target layers of the model in its ``layer_class`` (LoRA and its kin,
    VeRA, IA³, LoHa, LoKr, bottleneck adapters).

    ``plan(model)`` resolves ``config.targets`` / ``config.layers`` to module names and runs every
    check that needs the model (a rank that fits, a factor that divides), returning module name ->
    what ``make_layer`` needs. ``check()`` is ``plan()``, and ``apply()`` plans before it changes
    anything, so whatever ``apply`` would refuse, ``check`` refuses first, before the trainer
    evaluates the base. A subclass writes ``plan_layer`` and ``make_layer`` (and ``prepare`` for
    work on the frozen model before wrapping).
    """

    def target_names(self, model: nn.Module) -> list[str]:
        return resolve_targets(model, self.config.targets, self.config.layers)

    def plan(self, model: nn.Module) -> dict[str, Any]:
        return {name: self.plan_layer(name, model.get_submodule(name)) for name in self.target_names(model)}

    def plan_layer(self, name: str, module: nn.Module) -> Any:
        """What ``make_layer`` needs for this module (a rank, a flag); raise ConfigError if it cannot fit."""
        return None

    def check(self, model: nn.Module, arch: Any = None) -> None:
        self.plan(model)

    def prepare(self, model: nn.Module, plan: dict[str, Any]) -> None:
        """Work on the frozen model before its layers are wrapped (shared projections, quantization)."""

    def make_layer(self, base: nn.Module, spec: Any) -> nn.Module:
        raise NotImplementedError

    def apply(self, model: nn.Module, arch: Any = None) -> nn.Module:
        plan = self.plan(model)  # every check runs before the model changes
        freeze(model)
        self.prepare(model, plan)
        for name, spec in plan.items():
            layer = self.make_layer(model.get_submodule(name), spec)
            layer.train(model.training)  # a new Dropout must follow the model's mode, not default to train
            replace_module(model, name, layer)
        return model


def check_rank_fits(key: str, rank: int, name: str, module: nn.Module) -> int:
    """A rank r of a low-rank update must be at most min(out, in) of the layer it adapts."""
    out_features, in_features = linear_shape(module)
    check_int_range(key, rank, 1, min(out_features, in_features), f" (min(d, k) of {name})")
    return rank


def check_positive(key: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ConfigError(key, f"got {value!r}; allowed: a number > 0")


def is_meta(model: nn.Module) -> bool:
    """A shapes-only model (the estimate's and budget matching's dry runs): no values to read or set."""
    return any(p.is_meta for p in model.parameters())


def check_int_range(key: str, value: int, low: int, high: int | float = math.inf, why: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not (low <= value <= high):
        allowed = f"an integer >= {low}" if high == math.inf else f"an integer in [{low}, {int(high)}]"
        raise ConfigError(key, f"got {value!r}; allowed: {allowed}{why}")


def check_float_range(key: str, value: float, low: float, high: float, *, low_open=False, high_open=False) -> None:
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high):
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ConfigError(key, f"got {value!r}; allowed: a number in {lo}{low}, {high}{hi}")


def logical_numel(p: torch.Tensor) -> int:
    """Elements of the weight a parameter stands for: a packed 4-bit tensor holds two per byte."""
    quant_state = getattr(p, "quant_state", None)
    return int(quant_state.shape.numel()) if quant_state is not None else p.numel()


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers live on the meta device (shapes only).

    Tied parameters stay tied and ``requires_grad`` is kept; plain tensor attributes that are not
    parameters or buffers are copied as they are (they are small).
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def count(params: dict[str, nn.Parameter] | list) -> int:
    values = params.values() if isinstance(params, dict) else params
    return sum(p.numel() for p in values)


__all__ = [
    "ConfigError",
    "LayerConfig",
    "LayerMethod",
    "Method",
    "MethodConfig",
    "SavedForBackward",
    "WeightDeltaLayer",
    "base_weight",
    "check_float_range",
    "check_int_range",
    "check_positive",
    "check_rank_fits",
    "count",
    "field",
    "freeze",
    "is_conv1d",
    "is_linear_like",
    "is_meta",
    "linear_shape",
    "meta_copy",
    "replace_module",
    "to_base_layout",
]
