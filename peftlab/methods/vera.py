"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024, arXiv:2310.11454).

    x ──► base (W0, frozen) ─────────────────────────────────────────────┐
    │                                                                    (+)──► y
    └──► dropout ──► A[:r, :in] (frozen) ──► ⊙ d ──► B[:out, :r] (frozen) ──► ⊙ b ┘

    y = W0 x + Λ_b B Λ_d A x,     ΔW = diag(b) · B · diag(d) · A

One pair of random matrices A (r × in_max) and B (out_max × r) is shared by
every adapted layer; each layer uses the top-left slice that fits it (as
peft), so A and B are sized to the largest adapted layer. They are frozen and
regenerated from a seed (``projection_prng_key``): kaiming-uniform (gain √2,
fan-in), A then B from one ``torch.Generator`` seeded with the key — the same
recipe and draw order as peft, so the same key gives peft's matrices. Only
the vectors train: b (out,) initialised to 0, so ΔW = 0 at step 0, and
d (r,) initialised to ``d_initial`` (paper Table 6c: small values such as 0.1).

The adapter file holds b and d of every layer plus the seed and the
projections' shape as tensors (``vera_prng_key``, ``vera_projection_shape``)
and a fingerprint of A and B; loading checks all three, so an adapter is never
applied with different random matrices. A and B themselves are not saved.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import ConfigError
from peftlab.methods.base import (
    LayerConfig,
    LayerMethod,
    SavedForBackward,
    WeightDeltaLayer,
    check_float_range,
    check_int_range,
    check_rank_fits,
    linear_shape,
)

SEED_KEY, SHAPE_KEY, FINGERPRINT_KEY = "vera_prng_key", "vera_projection_shape", "vera_projection_fingerprint"
MAX_SEED = 2**63 - 1  # stored as an int64 tensor


@dataclass
class VeRAConfig(LayerConfig):     # + targets (default q, v) and layers (default: every block)
    name: str = "vera"
    r: int = 256                   # rank of the shared random projections (paper: 256 on RoBERTa-base)
    d_initial: float = 0.1         # init of every d entry; b starts at 0 (paper Table 6c)
    projection_prng_key: int = 0   # seed of the shared frozen A and B (saved with the adapter)
    dropout: float = 0.0           # dropout on the VeRA branch input


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-√(6/fan_in), √(6/fan_in)) drawn from ``generator`` (peft's VeRA init, gain √2)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The frozen shared pair: A (r, in_max), B (out_max, r), from one seeded CPU generator.

    One instance is a child of every VeRA layer, so ``model.to(...)`` moves a
    single copy. Non-persistent buffers: they are rebuilt from the seed.
    """

    def __init__(self, r: int, in_max: int, out_max: int, seed: int):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("A", _kaiming_uniform((r, in_max), generator), persistent=False)
        self.register_buffer("B", _kaiming_uniform((out_max, r), generator), persistent=False)
        # Sums of A, B, A² and B² (fp64) of the matrices as drawn; a plain CPU tensor, so a later
        # model.to(dtype) leaves it alone. A generator that draws other numbers gives another one.
        a, b = self.A.double(), self.B.double()
        self.fingerprint = torch.stack([a.sum(), b.sum(), a.square().sum(), b.square().sum()])


class VeRALayer(WeightDeltaLayer):
    """y = base(x) + b ⊙ B[:out] (d ⊙ A[:, :in] dropout(x)); ΔW = diag(b) B diag(d) A."""

    def __init__(self, base: nn.Module, projections: VeRAProjections, r: int,
                 d_initial: float = 0.1, dropout: float = 0.0):
        super().__init__(base)
        out_features, _ = linear_shape(base)
        device = base.weight.device
        self.r = r
        self.projections = projections  # shared, frozen
        self.lambda_b = nn.Parameter(torch.zeros(out_features, device=device))       # (out,)
        self.lambda_d = nn.Parameter(torch.full((r,), float(d_initial), device=device))  # (r,)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _slices(self) -> tuple[torch.Tensor, torch.Tensor]:
        out_features, in_features = self.shape
        return self.projections.B[:out_features], self.projections.A[:, :in_features]  # (out, r), (r, in)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        b_matrix, a_matrix = self._slices()
        hidden = F.linear(self.dropout(x), a_matrix.to(x.dtype)) * self.lambda_d.to(x.dtype)  # (..., r)
        return F.linear(hidden, b_matrix.to(x.dtype)) * self.lambda_b.to(x.dtype)            # (..., out)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(diag(b) B, diag(d) A), shapes (out, r) and (r, in), fp32."""
        b_matrix, a_matrix = self._slices()
        b = self.lambda_b.detach().float().unsqueeze(1) * b_matrix.float()
        a = self.lambda_d.detach().float().unsqueeze(1) * a_matrix.float()
        return b, a

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lambda_b": self.lambda_b, "lambda_d": self.lambda_d}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}"


class VeRA(LayerMethod):
    """Shared frozen random A, B; trainable per-layer scaling vectors b and d (Kopiczko et al. 2024)."""

    name = "vera"
    config_class = VeRAConfig
    mergeable = True
    layer_class = VeRALayer
    size_key = "r"

    def validate_config(self) -> None:
        c = self.config
        check_int_range("method.r", c.r, 1)
        check_int_range("method.projection_prng_key", c.projection_prng_key, 0, MAX_SEED)
        if not isinstance(c.d_initial, (int, float)) or c.d_initial == 0 or not math.isfinite(c.d_initial):
            raise ConfigError(
                "method.d_initial",
                f"got {c.d_initial!r}; allowed: a finite non-zero number (b starts at 0, so d = 0 "
                "would give b and d zero gradients forever)",
            )
        check_float_range("method.dropout", c.dropout, 0.0, 1.0, high_open=True)

    def plan_layer(self, name: str, module: nn.Module) -> tuple[int, int]:
        """(out, in) of a target; r must fit it."""
        check_rank_fits("method.r", self.config.r, name, module)
        return linear_shape(module)

    def prepare(self, model: nn.Module, plan: dict[str, tuple[int, int]]) -> None:
        """The shared frozen A (r, max in) and B (max out, r), seeded, for every layer to slice."""
        c = self.config
        out_max = max(out_f for out_f, _ in plan.values())
        in_max = max(in_f for _, in_f in plan.values())
        device = model.get_submodule(next(iter(plan))).weight.device
        self._shared = VeRAProjections(c.r, in_max, out_max, c.projection_prng_key).to(device)

    def make_layer(self, base: nn.Module, shape: tuple[int, int]) -> VeRALayer:
        c = self.config
        return VeRALayer(base, self._shared, c.r, c.d_initial, c.dropout)

    def projections(self, model: nn.Module) -> VeRAProjections:
        layers = self.layers(model)
        if not layers:
            raise ValueError("no VeRA layer in this model; call apply() first")
        return next(iter(layers.values())).projections

    def expected_trainable(self, model: nn.Module) -> int:
        # b (out) + d (r) per layer
        return sum(layer.shape[0] + layer.r for layer in self.layers(model).values())

    def saved_for_backward(self, layer: VeRALayer) -> SavedForBackward:
        """A x and B diag(d) A x (r + out per token) for d's and b's gradients; A and B are frozen,
        so x itself is kept only as the dropped copy when there is dropout."""
        return SavedForBackward(reads_input=False, dropout=self.config.dropout > 0, elements=layer.r + layer.shape[0])

    def summary(self, model: nn.Module) -> dict:
        layers = self.layers(model)
        return {
            "modules": sorted(layers),
            "r": self.config.r,
            "projection_prng_key": self.config.projection_prng_key,
            "projection_shape": list(self._projection_shape(model)),
        }

    # ---- the adapter file: b, d per layer + the seed, shape and fingerprint of A, B ---- #
    def _projection_shape(self, model: nn.Module) -> tuple[int, int, int]:
        projections = self.projections(model)
        r, in_max = projections.A.shape
        return r, in_max, projections.B.shape[0]

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().state_dict(model)
        state[SEED_KEY] = torch.tensor([self.config.projection_prng_key], dtype=torch.int64)
        state[SHAPE_KEY] = torch.tensor(self._projection_shape(model), dtype=torch.int64)
        state[FINGERPRINT_KEY] = self.projections(model).fingerprint.clone()
        return state

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        if any(key not in state for key in (SEED_KEY, SHAPE_KEY, FINGERPRINT_KEY)):
            raise ConfigError("method", f"the adapter has no {SEED_KEY}/{SHAPE_KEY}/{FINGERPRINT_KEY}: "
                              "it is not a VeRA adapter; allowed: an adapter saved by method=vera")
        seed = int(state.pop(SEED_KEY).item())
        shape = tuple(int(v) for v in state.pop(SHAPE_KEY).tolist())
        fingerprint = state.pop(FINGERPRINT_KEY)
        if seed != self.config.projection_prng_key:
            raise ConfigError("method.projection_prng_key",
                              f"got {self.config.projection_prng_key}, but the adapter was trained with "
                              f"projections from seed {seed}; allowed: {seed}")
        ours = self._projection_shape(model)
        if shape != ours:
            raise ConfigError("method.r",
                              f"the adapter's shared projections are (r, in_max, out_max) = {shape}, this run's "
                              f"r and targets give {ours}; allowed: the r and targets the adapter was trained with")
        if not torch.allclose(fingerprint.double(), self.projections(model).fingerprint, rtol=1e-6, atol=1e-6):
            raise ConfigError("method.projection_prng_key",
                              f"seed {seed} gives other random projections here than where the adapter was saved "
                              "(a different torch generator); allowed: an adapter saved with this torch version")
        super().load_state_dict(model, state)
