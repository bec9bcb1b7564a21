"""How ΔW relates to W0: the amplification factor of the LoRA paper (Hu et al. 2021, §7.3, Table 7).

With U (out, r) and V (in, r) the top-r left / right singular vectors of ΔW,
W0 is projected onto ΔW's r-dimensional subspace::

    proj_delta  = ‖Uᵀ W0 V‖_F                      W0 seen through ΔW's directions
    proj_w0_top = ‖U₀ᵀ W0 V₀‖_F = √Σ_{i≤r} σ_i(W0)²  the same with W0's own top-r directions
    proj_random = ‖Qᵀ W0 P‖_F                      random orthonormal Q (out, r), P (in, r), mean
                                                   over draws; √E[‖Qᵀ W0 P‖_F²] = ‖W0‖_F r / √(out in)
    amplification = ‖ΔW‖_F / proj_delta

The paper finds proj_random < proj_delta ≪ proj_w0_top (ΔW amplifies directions
W0 does not emphasise) and a large factor at small r (21.5 for r=4 on GPT-3 W_q).
Factored ΔW gives exact U, V; top-r directions of a dense matrix come from a
full SVD, or a randomized one when min(out, in) > EXACT_SVD_MAX_DIM.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch

from peftlab.analysis.spectra import as_update, dense_svd, is_factored, singular_triplets, update_shape

EXACT_SVD_MAX_DIM = 2048  # above this min(out, in), top-r directions come from a randomized SVD
RANDOMIZED_NITER = 8      # power iterations then: W0's spectrum decays slowly (Halko et al. 2011, §4.5)


def projection_norm(w0: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> float:
    """‖Uᵀ W0 V‖_F for W0 (out, in), U (out, r), V (in, r)."""
    return float(torch.linalg.matrix_norm(u.T @ w0 @ v))


def random_projection_norm(w0: torch.Tensor, r: int, n_random: int = 4, seed: int = 0) -> float:
    """Mean of ‖Qᵀ W0 P‖_F over ``n_random`` pairs of random orthonormal Q (out, r), P (in, r)."""
    generator = torch.Generator().manual_seed(seed)
    out_f, in_f = w0.shape
    norms = []
    for _ in range(n_random):
        q = torch.linalg.qr(torch.randn(out_f, r, generator=generator, dtype=w0.dtype))[0]
        p = torch.linalg.qr(torch.randn(in_f, r, generator=generator, dtype=w0.dtype))[0]
        norms.append(projection_norm(w0, q, p))
    return sum(norms) / len(norms)


def _svd_method(shape: tuple[int, int]) -> str:
    return "full" if min(shape) <= EXACT_SVD_MAX_DIM else "randomized"


def top_directions_norm(w0: torch.Tensor, r: int) -> float:
    """‖U₀ᵀ W0 V₀‖_F with W0's own top-r directions, i.e. √Σ_{i≤r} σ_i(W0)²."""
    sigma = dense_svd(w0, method=_svd_method(tuple(w0.shape)), k=r, niter=RANDOMIZED_NITER)[1]
    return float(torch.linalg.vector_norm(sigma))


def _frobenius(update: Any) -> float:
    """‖ΔW‖_F; for ΔW = B A it is ‖R_B R_Aᵀ‖_F from the QR factors (no product formed)."""
    if is_factored(update):
        b, a = update
        return float(torch.linalg.matrix_norm(torch.linalg.qr(b)[1] @ torch.linalg.qr(a.T)[1].T))
    return float(torch.linalg.matrix_norm(update))


def default_rank(update: Any) -> int:
    """The adapter's rank r for a factored update (columns of B); dense updates need an explicit r."""
    if not is_factored(update):
        raise ValueError("r is required for a dense update (e.g. the LoRA rank it is compared with)")
    return update[0].shape[1]


def amplification(delta: Any, w0: Any, r: int | None = None, n_random: int = 4, seed: int = 0) -> dict:
    """One Table-7 row for ΔW against W0 (both (out, in)); see the module docstring.

    ``delta``: dense tensor, (B, A) factors or layer; ``r`` defaults to the factor rank.
    Returns r, norm_delta, proj_delta, proj_w0_top, proj_random, norm_w0, amplification
    (``inf`` when ΔW's subspace is orthogonal to W0; proj_delta and amplification
    are NaN for ΔW = 0, e.g. LoRA before training).
    """
    update = as_update(delta)
    w0 = as_update(w0)
    if update_shape(update) != tuple(w0.shape):
        raise ValueError(f"ΔW shape {update_shape(update)} != W0 shape {tuple(w0.shape)}")
    r = default_rank(update) if r is None else r
    if not 1 <= r <= min(w0.shape):
        raise ValueError(f"r: got {r}; allowed: an integer in [1, {min(w0.shape)}]")
    u, _, v = singular_triplets(update, k=r, method=_svd_method(tuple(w0.shape)))  # exact when factored
    if u.shape[1] < r:
        raise ValueError(f"r: got {r}; the update has only {u.shape[1]} singular directions")
    norm_delta = _frobenius(update)
    proj_delta = projection_norm(w0, u, v) if norm_delta > 0 else math.nan  # ΔW = 0 has no directions
    return {
        "r": r,
        "norm_delta": norm_delta,
        "proj_delta": proj_delta,
        "proj_w0_top": top_directions_norm(w0, r),
        "proj_random": random_projection_norm(w0, r, n_random, seed),
        "norm_w0": float(torch.linalg.matrix_norm(w0)),
        "amplification": norm_delta / proj_delta if proj_delta != 0 else math.inf,
    }


def amplification_table(
    named: Iterable[tuple[str, Any]], base_weights: Mapping[str, Any], r: int | None = None, **kwargs: Any,
) -> list[dict]:
    """One row per module (``{"module": name, **amplification(...)}``) for modules with a W0.

    ``base_weights`` maps module name -> W0 (out, in); modules absent from it are skipped.
    Dense updates use ``r`` (required for them); factored ones their own rank unless ``r`` is given.
    """
    rows = []
    for name, layer in named:
        if name not in base_weights:
            continue
        rows.append({"module": name, **amplification(layer, base_weights[name], r, **kwargs)})
    return rows
