"""Rank measures of a spectrum σ₁ ≥ σ₂ ≥ … ≥ 0 (from :func:`singular_values`).

    effective rank   erank = exp(H(p)),  p_i = σ_i / Σ_j σ_j,  H(p) = -Σ p_i log p_i
                     (Roy & Vetterli 2007, "The effective rank: a measure of effective dimensionality")
    stable rank      srank = Σ σ_i² / σ₁² = ‖ΔW‖_F² / ‖ΔW‖₂²   (Rudelson & Vershynin 2007)
    energy rank      smallest k with Σ_{i≤k} σ_i² / Σ_i σ_i² ≥ τ
    nominal rank     #{σ_i > tol},  tol = σ₁ · max(out, in) · eps   (numpy.linalg.matrix_rank)

For k equal nonzero singular values every measure equals k. The zero matrix
(all σ = 0, or no σ at all) has rank 0 under every measure: effective and
stable rank return 0.0, energy and nominal rank return 0.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

ENERGY_LEVELS = (0.90, 0.95, 0.99)


def _sigma(sigma: Sequence[float] | np.ndarray) -> np.ndarray:
    s = np.asarray(sigma, dtype=np.float64).ravel()
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError("singular values must be finite and >= 0")
    return s


def effective_rank(sigma: Sequence[float] | np.ndarray) -> float:
    """exp of the Shannon entropy of p = σ / Σσ (Roy & Vetterli 2007); 0.0 for the zero matrix."""
    s = _sigma(sigma)
    total = s.sum()
    if total == 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def stable_rank(sigma: Sequence[float] | np.ndarray) -> float:
    """Σσ² / σ₁² (in [1, nominal rank]); 0.0 for the zero matrix."""
    s = _sigma(sigma)
    top = s.max(initial=0.0)
    if top == 0:
        return 0.0
    return float(np.sum((s / top) ** 2))


def energy_rank(sigma: Sequence[float] | np.ndarray, tau: float) -> int:
    """Smallest k with Σ_{i≤k} σ_i² / Σ σ² ≥ τ, τ ∈ (0, 1]; 0 for the zero matrix.

    σ is sorted descending first. A relative slack of 1e-12 on τ absorbs
    round-off in the cumulative sum (so four equal σ reach τ = 0.5 at k = 2).
    """
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau: got {tau!r}; allowed: a number in (0, 1]")
    energy = np.sort(_sigma(sigma))[::-1] ** 2
    total = energy.sum()
    if total == 0:
        return 0
    fraction = np.cumsum(energy) / total
    k = int(np.searchsorted(fraction, tau * (1.0 - 1e-12), side="left")) + 1
    return min(k, int(np.count_nonzero(energy)))


def nominal_rank(
    sigma: Sequence[float] | np.ndarray,
    tol: float | None = None,
    shape: tuple[int, int] | None = None,
    eps: float = float(np.finfo(np.float64).eps),
) -> int:
    """Number of σ above ``tol``; numpy's default tol = σ₁ · max(out, in) · eps.

    ``shape`` is ΔW's (out, in); without it max(out, in) is taken as len(σ)
    (right for a full spectrum of a square matrix, smaller than numpy's for a
    factored spectrum). ``eps`` is the machine epsilon of the dtype ΔW is stored
    in, as numpy uses the array's own (fp32 factors: 1.2e-7, even though the
    SVD runs in fp64, so that their rounding noise does not count as rank).
    """
    s = _sigma(sigma)
    if s.size == 0:
        return 0
    if tol is None:
        size = max(shape) if shape is not None else s.size
        tol = s.max() * size * eps
    return int(np.count_nonzero(s > tol))


def rank_summary(
    sigma: Sequence[float] | np.ndarray,
    shape: tuple[int, int] | None = None,
    eps: float = float(np.finfo(np.float64).eps),
) -> dict:
    """All measures of one spectrum, plus ‖ΔW‖_F = √Σσ² and σ₁.

    ``shape`` and ``eps`` set the nominal rank's tolerance (see :func:`nominal_rank`).

    Keys: nominal_rank, effective_rank, stable_rank, energy_rank_90 / _95 / _99,
    frobenius_norm, sigma_max.
    """
    s = _sigma(sigma)
    row = {
        "nominal_rank": nominal_rank(s, shape=shape, eps=eps),
        "effective_rank": effective_rank(s),
        "stable_rank": stable_rank(s),
    }
    for tau in ENERGY_LEVELS:
        row[f"energy_rank_{round(tau * 100)}"] = energy_rank(s, tau)
    row["frobenius_norm"] = float(np.sqrt(np.sum(s**2)))
    row["sigma_max"] = float(s.max(initial=0.0))
    return row
