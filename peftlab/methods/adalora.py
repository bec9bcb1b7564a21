"""AdaLoRA: an SVD-form update whose rank budget moves to where it matters.

    x ──► base (W0, frozen) ──────────────────────────────────────────┐
    │                                                                (+)──► y
    └──► dropout ──► Q (r×in) ──► ⊙ (Λ ⊙ m) ──► P (out×r) ──► ×s ────┘

    y = W0 x + s · P diag(Λ ⊙ m) Q x,   s = α / init_r      (Zhang et al. 2023, arXiv:2303.10512)

Each triplet (P[:, i], λ_i, Q[i, :]) is one "singular" direction; the boolean
``rank_mask`` m switches triplets off. Training shrinks the total number of
active triplets from ``init_r`` per matrix to ``target_r`` per matrix on
average, and gives the survivors to the matrices that need them:

- importance, per parameter w (paper Eq. 8-10, peft's ``RankAllocator``)::

      I = |w · ∂L/∂w|                       sensitivity, this step
      Ī ← β1 Ī + (1 - β1) I                 smoothed sensitivity
      Ū ← β2 Ū + (1 - β2) |I - Ī|           uncertainty
      s(w) = Ī · Ū

  and per triplet S_i = s(λ_i) + mean_j s(Q[i, j]) + mean_k s(P[k, i]).

- budget (total active triplets), cubic in the step t (T = total steps)::

      b(t) = b_init                                              t <= tinit
      b(t) = b_target + (b_init - b_target)(1 - (t-tinit)/(T-tfinal-tinit))³   otherwise
      b(t) = b_target                                            t >= T - tfinal (fixed mask)

  Every ``deltaT`` steps of the middle phase the triplets with the lowest
  S_i are masked until b(t) remain (a threshold over all matrices at once).

- orthogonality of P and Q through :meth:`AdaLoRA.extra_loss` (never hidden in
  ``forward``): ``orth_reg_weight · mean over all P and Q of ‖PᵀP − I‖_F / ‖QQᵀ − I‖_F``.
  This is the authors' code and peft (the paper writes squared norms summed).

Init (peft's ``AdaLoraLayer.reset_lora_parameters``, as the authors' code): Λ = 0,
so ΔW = 0 at step 0; P and Q ~ N(0, 0.02²).

The trainer drives the schedule: ``on_train_start(model, total_steps)`` gives T
and ``after_backward(model, step)`` updates importance and masks, so no user can
forget the allocation step. Differences from peft, all deliberate:

- ``after_backward`` runs before the optimizer step, so sensitivities use the
  weights the gradient was taken at (as the paper's Algorithm 1; peft and the
  authors' code call it after the step).
- the mask is applied in ``forward``, so a masked triplet stays out of the model
  whatever the optimizer does to its λ until the next allocation (peft zeroes λ
  in place, and the optimizer can revive it between allocations).
- a masking step with no measured importance yet (all scores 0, e.g. step 1
  with tinit = 0, since Λ = 0 gives P and Q no gradient) prunes nothing; peft
  would prune every tied triplet. A budget equal to the initial one prunes
  nothing (peft's ``kthvalue`` raises there).
- s = α / init_r; peft divides by (init_r + 1e-5), a relative difference of 1e-6.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

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
    check_positive,
    check_rank_fits,
    linear_shape,
)

log = logging.getLogger(__name__)


@dataclass
class AdaLoRAConfig(LayerConfig):    # + targets (default q, v) and layers (default: every block)
    name: str = "adalora"
    init_r: int = 12                 # starting rank of every adapted matrix (peft default)
    target_r: int = 8                # average rank per matrix at the end of the budget schedule
    alpha: float = 8.0               # scale s = alpha / init_r (peft default lora_alpha)
    dropout: float = 0.0             # dropout on the branch input
    tinit: int = 0                   # warm-up steps before any masking
    tfinal: int = 0                  # final steps with the mask frozen at the target budget
    deltaT: int = 1                  # steps between two allocations in the middle phase
    beta1: float = 0.85              # EMA factor of the sensitivity
    beta2: float = 0.85              # EMA factor of the uncertainty
    orth_reg_weight: float = 0.5     # weight of the orthogonality regularizer (peft default)


class AdaLoRALayer(WeightDeltaLayer):
    """y = base(x) + s · P diag(Λ ⊙ m) Q dropout(x); ΔW = s · P diag(Λ ⊙ m) Q."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base)
        out_features, in_features = linear_shape(base)
        device = base.weight.device
        self.r = r
        self.scaling = alpha / r
        self.lora_P = nn.Parameter(torch.empty(out_features, r, device=device))  # (out, r) left vectors
        self.lora_E = nn.Parameter(torch.zeros(r, device=device))                # (r,) singular values Λ
        self.lora_Q = nn.Parameter(torch.empty(r, in_features, device=device))   # (r, in) right vectors
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=device))  # m
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.lora_E)
        nn.init.normal_(self.lora_P, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_Q, mean=0.0, std=0.02)
        self.rank_mask.fill_(True)

    @property
    def rank(self) -> int:
        """Active triplets (unmasked singular values)."""
        return int(self.rank_mask.sum())

    def singular_values(self) -> torch.Tensor:
        return self.lora_E * self.rank_mask  # (r,), masked entries exactly 0

    @torch.no_grad()
    def set_mask(self, keep: torch.Tensor) -> None:
        """Keep only triplets where ``keep`` (r,) is true; zero the others' λ as peft does."""
        self.rank_mask.copy_(keep)
        self.lora_E.masked_fill_(~self.rank_mask, 0.0)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        q = self.lora_Q.to(x.dtype)
        p = self.lora_P.to(x.dtype)
        e = self.singular_values().to(x.dtype)
        return F.linear(F.linear(self.dropout(x), q) * e, p) * self.scaling  # (..., out)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s·P·diag(Λ⊙m), Q): ΔW = B @ A, shapes (out, r) and (r, in), fp32."""
        b = self.lora_P.detach().float() * self.singular_values().detach().float() * self.scaling
        return b, self.lora_Q.detach().float()

    def orthogonality(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖PᵀP − I‖_F, ‖QQᵀ − I‖_F), differentiable."""
        eye = torch.eye(self.r, device=self.lora_P.device, dtype=self.lora_P.dtype)
        return (torch.linalg.matrix_norm(self.lora_P.T @ self.lora_P - eye),
                torch.linalg.matrix_norm(self.lora_Q @ self.lora_Q.T - eye))

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_P": self.lora_P, "lora_E": self.lora_E, "lora_Q": self.lora_Q}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, rank={self.rank}, scaling={self.scaling:g}"


def budget_schedule(step: int, total_steps: int, tinit: int, tfinal: int, deltaT: int,
                    init_budget: int, target_budget: int) -> tuple[int, bool]:
    """(budget, whether to mask at this step): peft's ``RankAllocator.budget_schedule``."""
    if step <= tinit:
        return init_budget, False
    if step > total_steps - tfinal:
        return target_budget, True
    remaining = 1 - (step - tinit) / (total_steps - tfinal - tinit)
    return int((init_budget - target_budget) * remaining ** 3 + target_budget), step % deltaT == 0


class RankAllocator:
    """Smoothed sensitivity Ī and uncertainty Ū of every adapter parameter (fp32).

    Keys are ``"<layer name>.<role>"`` with roles lora_P, lora_E, lora_Q.
    """

    def __init__(self, beta1: float, beta2: float):
        self.beta1, self.beta2 = beta1, beta2
        self.sensitivity: dict[str, torch.Tensor] = {}
        self.uncertainty: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.sensitivity, self.uncertainty = {}, {}

    @torch.no_grad()
    def update(self, layers: dict[str, AdaLoRALayer]) -> None:
        for name, layer in layers.items():
            for role, p in layer.adapter_parameters().items():
                key = f"{name}.{role}"
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                now = (p * grad).abs().float()
                smooth = self.sensitivity.get(key, torch.zeros_like(now))
                smooth = self.beta1 * smooth + (1 - self.beta1) * now
                unc = self.uncertainty.get(key, torch.zeros_like(now))
                self.sensitivity[key] = smooth
                self.uncertainty[key] = self.beta2 * unc + (1 - self.beta2) * (now - smooth).abs()

    def score(self, key: str, like: torch.Tensor) -> torch.Tensor:
        if key not in self.sensitivity:
            return torch.zeros_like(like, dtype=torch.float32)
        return self.sensitivity[key] * self.uncertainty[key]

    def triplet_scores(self, layers: dict[str, AdaLoRALayer]) -> dict[str, torch.Tensor]:
        """Layer name -> S (r,): s(λ_i) + mean s(Q[i, :]) + mean s(P[:, i])."""
        scores = {}
        for name, layer in layers.items():
            s_q = self.score(f"{name}.lora_Q", layer.lora_Q).mean(dim=1)
            s_p = self.score(f"{name}.lora_P", layer.lora_P).mean(dim=0)
            scores[name] = self.score(f"{name}.lora_E", layer.lora_E) + (s_q + s_p)
        return scores


class AdaLoRA(LayerMethod):
    """Adaptive budget allocation over SVD-form low-rank updates (Zhang et al. 2023)."""

    name = "adalora"
    config_class = AdaLoRAConfig
    mergeable = True
    layer_class = AdaLoRALayer
    size_key = "init_r"  # see size_fields

    def size_fields(self, value: int) -> dict[str, Any]:
        """init_r = ``value``, target_r scaled to keep the configured target_r / init_r (default 8/12).

        Budget matching counts what trains: every matrix holds init_r triplets (masked ones keep
        their parameters and optimizer state), so the budget sets init_r. The active count at the
        end is about budget × target_r / init_r; to compare at an equal *final* budget, as the
        AdaLoRA paper does, give budget × init_r / target_r.
        """
        c = self.config
        return {"init_r": value, "target_r": max(1, round(value * c.target_r / c.init_r))}

    def __init__(self, config: Any):
        super().__init__(config)
        self.allocator = RankAllocator(config.beta1, config.beta2)
        self.total_steps: int | None = None
        self.budget: int | None = None   # active triplets allowed after the last allocation
        self._final_mask_set = False

    def validate_config(self) -> None:
        c = self.config
        check_int_range("method.init_r", c.init_r, 1)
        check_int_range("method.target_r", c.target_r, 1, c.init_r, " (at most init_r)")
        check_positive("method.alpha", c.alpha)
        check_float_range("method.dropout", c.dropout, 0.0, 1.0, high_open=True)
        check_int_range("method.tinit", c.tinit, 0)
        check_int_range("method.tfinal", c.tfinal, 0)
        check_int_range("method.deltaT", c.deltaT, 1)
        check_float_range("method.beta1", c.beta1, 0.0, 1.0, low_open=True, high_open=True)
        check_float_range("method.beta2", c.beta2, 0.0, 1.0, low_open=True, high_open=True)
        check_float_range("method.orth_reg_weight", c.orth_reg_weight, 0.0, math.inf)

    # ---- adaptation -------------------------------------------------------- #
    def plan_layer(self, name: str, module: nn.Module) -> int:
        return check_rank_fits("method.init_r", self.config.init_r, name, module)

    def make_layer(self, base: nn.Module, rank: int) -> AdaLoRALayer:
        c = self.config
        return AdaLoRALayer(base, rank, c.alpha, c.dropout)

    def expected_trainable(self, model: nn.Module) -> int:
        # P (out×r) + Λ (r) + Q (r×in) per matrix; the mask is a buffer, as peft's ranknum is frozen
        return sum(layer.r * (sum(layer.shape) + 1) for layer in self.layers(model).values())

    def budgets(self, model: nn.Module) -> tuple[int, int]:
        """(initial, target) total number of triplets over all adapted matrices."""
        layers = self.layers(model)
        return sum(layer.r for layer in layers.values()), self.config.target_r * len(layers)

    # ---- memory terms -------------------------------------------------------- #
    def saved_for_backward(self, layer: AdaLoRALayer) -> SavedForBackward:
        """As LoRA at the initial rank (masked triplets stay allocated): Q x, and x or its dropped copy."""
        return SavedForBackward(dropout=self.config.dropout > 0, elements=layer.r)

    def weight_copy_bytes(self, layer: AdaLoRALayer, compute_bytes: int) -> float:
        """P, Λ and Q are fp32, cast to a 16-bit compute dtype on every use."""
        return compute_bytes * layer.r * sum(layer.shape) if compute_bytes < 4 else 0.0

    def training_state_bytes(self, adapter_parameters: int) -> tuple[float, str]:
        return 2 * 4 * adapter_parameters, "adalora: + sensitivity and uncertainty EMAs, two fp32 copies of the adapter"

    # ---- trainer hooks ----------------------------------------------------- #
    def on_train_start(self, model: nn.Module, total_steps: int) -> None:
        c = self.config
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"adalora: total_steps must be a positive integer, got {total_steps!r}")
        if c.tinit + c.tfinal >= total_steps:
            raise ConfigError(
                "method.tinit",
                f"tinit={c.tinit} + method.tfinal={c.tfinal} leaves no budgeting phase in {total_steps} steps; "
                f"allowed: method.tinit + method.tfinal < total steps ({total_steps})",
            )
        self.total_steps = total_steps
        self.allocator.reset()
        self.budget = self.budgets(model)[0]
        self._final_mask_set = False

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.config.orth_reg_weight == 0:
            return None
        norms = [norm for layer in self.layers(model).values() for norm in layer.orthogonality()]
        return self.config.orth_reg_weight * torch.stack(norms).mean()

    @torch.no_grad()
    def after_backward(self, model: nn.Module, step: int) -> None:
        """Update importance, then mask to the step's budget (peft's ``update_and_allocate``)."""
        if self.total_steps is None:
            raise RuntimeError(
                "adalora: total steps unknown; the trainer must call "
                "method.on_train_start(model, total_steps) before after_backward(model, step)"
            )
        c = self.config
        layers = self.layers(model)
        init_budget, target_budget = self.budgets(model)
        final_step = self.total_steps - c.tfinal
        if step < final_step:
            self.allocator.update(layers)
            budget, mask_now = budget_schedule(step, self.total_steps, c.tinit, c.tfinal, c.deltaT,
                                               init_budget, target_budget)
            if mask_now:
                self.mask_to_budget(layers, budget, init_budget)
        elif not self._final_mask_set:  # step == T - tfinal: the last allocation, to the target
            self.mask_to_budget(layers, target_budget, init_budget)
            self.allocator.reset()
            self._final_mask_set = True
        else:  # final phase: the mask is fixed; keep masked λ at 0 as peft does
            for layer in layers.values():
                layer.set_mask(layer.rank_mask)

    def mask_to_budget(self, layers: dict[str, AdaLoRALayer], budget: int, init_budget: int) -> None:
        """Mask every triplet whose score is at or below the (init - budget)-th smallest."""
        scores = self.allocator.triplet_scores(layers)
        flat = torch.cat(list(scores.values()))
        to_prune = init_budget - budget
        if to_prune > 0 and not bool((flat > 0).any()):
            log.info("adalora: no importance measured yet; skipping this allocation")
            return
        threshold = torch.kthvalue(flat, to_prune).values.item() if to_prune > 0 else -math.inf
        for name, layer in layers.items():
            layer.set_mask(scores[name] > threshold)
        self.budget = budget

    def summary(self, model: nn.Module) -> dict:
        layers = self.layers(model)
        init_budget, target_budget = self.budgets(model)
        return {
            "modules": sorted(layers),
            "ranks": {n: layer.rank for n, layer in sorted(layers.items())},  # final rank per matrix
            "total_rank": sum(layer.rank for layer in layers.values()),
            "init_budget": init_budget,
            "target_budget": target_budget,
            "total_steps": self.total_steps,
            "scaling": next(iter(layers.values())).scaling if layers else None,
        }

    # ---- checkpoints: masks, importance EMAs and where the schedule stands -- #
    def train_state(self, model: nn.Module) -> dict:
        return {
            "rank_masks": {name: layer.rank_mask.detach().cpu().clone() for name, layer in self.layers(model).items()},
            "sensitivity": {k: v.detach().cpu().clone() for k, v in self.allocator.sensitivity.items()},
            "uncertainty": {k: v.detach().cpu().clone() for k, v in self.allocator.uncertainty.items()},
            "budget": self.budget,
            "final_mask_set": self._final_mask_set,
        }

    def load_train_state(self, model: nn.Module, state: dict) -> None:
        layers = self.layers(model)
        if set(state["rank_masks"]) != set(layers):
            raise ValueError("adalora: the checkpoint's rank masks do not fit this model's adapted modules")
        with torch.no_grad():
            for name, layer in layers.items():
                layer.rank_mask.copy_(state["rank_masks"][name])
        device = next(iter(layers.values())).lora_E.device
        self.allocator.sensitivity = {k: v.to(device) for k, v in state["sensitivity"].items()}
        self.allocator.uncertainty = {k: v.to(device) for k, v in state["uncertainty"].items()}
        self.budget = state["budget"]
        self._final_mask_set = state["final_mask_set"]

    # ---- the adapter file: trainable tensors plus each matrix's rank mask --- #
    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().state_dict(model)
        for name, layer in self.layers(model).items():
            state[f"{name}.rank_mask"] = layer.rank_mask.detach().cpu().contiguous()
        return state

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        masks = {name: state.pop(f"{name}.rank_mask", None) for name in self.layers(model)}
        missing = sorted(n for n, m in masks.items() if m is None)
        if missing:
            raise ValueError(f"adapter does not fit this model: missing {[f'{n}.rank_mask' for n in missing[:3]]}")
        super().load_state_dict(model, state)
        with torch.no_grad():
            for name, layer in self.layers(model).items():
                layer.rank_mask.copy_(masks[name].to(torch.bool))
