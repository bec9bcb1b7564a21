"""Singular values (and vectors) of a learned update ΔW, dense or low-rank.

A low-rank update is given by its factors, ΔW = B A with B (out, r) and
A (r, in). Its spectrum comes from an r×r problem, never from a full SVD of
the (out, in) product (Halko, Martinsson & Tropp 2011, §5.1)::

    B  = Q_B R_B            Q_B (out, r), R_B (r, r)     reduced QR
    Aᵀ = Q_A R_A            Q_A (in, r),  R_A (r, r)
    ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ
    R_B R_Aᵀ = U_c Σ V_cᵀ   SVD of the r×r core
    ΔW = (Q_B U_c) Σ (Q_A V_c)ᵀ

so σ(ΔW) = σ(R_B R_Aᵀ), with left / right singular vectors Q_B U_c and Q_A V_c.
Cost: O((out + in) r²) instead of O(out · in · min(out, in)).

Dense updates (full fine-tuning, LoHa, LoKr, DoRA's effective update) use a
full SVD, or a randomized truncated one (``method="randomized", k=...``,
Halko et al. 2011 via ``torch.svd_lowrank``) for large matrices.
"""
from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch

Factors = tuple[torch.Tensor, torch.Tensor]
Update = Union[torch.Tensor, Factors]  # a dense (out, in) ΔW, or (B, A) with ΔW = B @ A
DENSE_METHODS = ("full", "randomized")


def _as_tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x.detach()
    return t.to(device="cpu", dtype=dtype)


def raw_update(x: Any) -> Any:
    """A layer's ``factors()`` when it returns (B, A), else its ``delta_weight()``; other inputs as they are."""
    if hasattr(x, "delta_weight"):
        factors = x.factors() if hasattr(x, "factors") else None
        return factors if factors is not None else x.delta_weight()
    return x


def _eps(part: Any) -> float:
    if isinstance(part, torch.Tensor) and part.is_floating_point():
        return torch.finfo(part.dtype).eps
    if isinstance(part, np.ndarray) and part.dtype.kind == "f":
        return float(np.finfo(part.dtype).eps)
    return float(np.finfo(np.float64).eps)


def input_eps(x: Any) -> float:
    """Machine epsilon of the dtype ΔW is stored in (the coarser of B and A): the
    precision numpy's matrix_rank tolerance refers to. fp64 for non-float input."""
    x = raw_update(x)
    return max(_eps(part) for part in (x if isinstance(x, (tuple, list)) else (x,)))


def as_update(x: Any, dtype: torch.dtype = torch.float64) -> Update:
    """Normalize ``x`` to a dense (out, in) tensor or a (B, A) pair, on CPU in ``dtype``.

    ``x`` may be a tensor / ndarray (dense ΔW), a (B, A) tuple, or a layer with
    ``factors()`` (preferred when it returns factors) and ``delta_weight()``.
    Raises ValueError when the update has non-finite entries.
    """
    x = raw_update(x)
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"factors must be a pair (B, A); got {len(x)} items")
        b, a = (_as_tensor(f, dtype) for f in x)
        if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"factors do not multiply: B {tuple(b.shape)}, A {tuple(a.shape)}")
        _check_finite(b, a)
        return b, a
    dense = _as_tensor(x, dtype)
    if dense.ndim != 2:
        raise ValueError(f"a dense update must be 2-D; got shape {tuple(dense.shape)}")
    _check_finite(dense)
    return dense


def _check_finite(*tensors: torch.Tensor) -> None:
    # One reduction first (a NaN or ±inf entry makes the sum non-finite); the
    # elementwise test, much slower, runs only to rule out an overflowing sum.
    for t in tensors:
        if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
            raise ValueError("update has non-finite entries (diverged run?)")


def is_factored(update: Update) -> bool:
    return isinstance(update, tuple)


def update_shape(update: Update) -> tuple[int, int]:
    """(out, in) of ΔW."""
    if is_factored(update):
        return update[0].shape[0], update[1].shape[1]
    return tuple(update.shape)


def factored_singular_values(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """σ of ΔW = B A from R_B and R_A alone (QR without forming Q): σ(R_B R_Aᵀ), descending."""
    r_b = torch.linalg.qr(b, mode="r")[1]      # (p, r)   p = min(out, r)
    r_a = torch.linalg.qr(a.T, mode="r")[1]    # (s, r)   s = min(in, r)
    return torch.linalg.svdvals(r_b @ r_a.T)   # (min(p, s),)


def factored_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ΔW = B A from its factors: returns U (out, q), σ (q,), V (in, q), q = min(r, out, in).

    ΔW = U diag(σ) Vᵀ; see the module docstring for the QR + r×r core method.
    """
    q_b, r_b = torch.linalg.qr(b)       # (out, p), (p, r)   p = min(out, r)
    q_a, r_a = torch.linalg.qr(a.T)     # (in, s),  (s, r)   s = min(in, r)
    core = r_b @ r_a.T                  # (p, s)
    u_c, sigma, vh_c = torch.linalg.svd(core, full_matrices=False)
    return q_b @ u_c, sigma, q_a @ vh_c.T


def dense_svd(
    x: torch.Tensor, method: str = "full", k: int | None = None, niter: int = 4, oversample: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of a dense (out, in) ΔW: U (out, q), σ (q,), V (in, q).

    ``method="full"``: exact thin SVD, q = min(out, in) (truncated to ``k`` if given).
    ``method="randomized"``: the top ``k`` triplets by a randomized range finder
    with ``oversample`` extra columns and ``niter`` power iterations
    (Halko et al. 2011, Alg. 4.4), via ``torch.svd_lowrank``.
    """
    if method not in DENSE_METHODS:
        raise ValueError(f"method: got {method!r}; allowed: {', '.join(DENSE_METHODS)}")
    if method == "full":
        u, sigma, vh = torch.linalg.svd(x, full_matrices=False)
        v = vh.T
    else:
        if k is None:
            raise ValueError("method='randomized' needs k (the number of singular values)")
        q = min(k + oversample, *x.shape)
        u, sigma, v = torch.svd_lowrank(x, q=q, niter=niter)
    if k is not None:
        u, sigma, v = u[:, :k], sigma[:k], v[:, :k]
    return u, sigma, v


def singular_triplets(
    x: Any, k: int | None = None, method: str = "full", dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, σ, V) of ΔW, top ``k`` (all when None), σ descending; factored when possible.

    U (out, k) and V (in, k) hold the left / right singular vectors as columns.
    ``method`` applies to dense updates only; factors always use the exact r×r core.
    """
    update = as_update(x, dtype)
    if is_factored(update):
        u, sigma, v = factored_svd(*update)
        return (u, sigma, v) if k is None else (u[:, :k], sigma[:k], v[:, :k])
    return dense_svd(update, method=method, k=k)


def singular_values(
    x: Any, method: str = "full", k: int | None = None, dtype: torch.dtype = torch.float64,
) -> np.ndarray:
    """σ of ΔW as a 1-D float64 array sorted descending.

    ``x``: a dense (out, in) tensor / ndarray, a (B, A) pair with ΔW = B @ A,
    or a layer with ``factors()`` / ``delta_weight()``.

    Factors: min(r, out, in) values from the QR + r×r core SVD (exact; no
    full SVD of B @ A). Dense: all min(out, in) values by ``torch.linalg.svdvals``
    in ``dtype`` (fp64 by default), or the top ``k`` with ``method="randomized"``.
    """
    return spectrum(as_update(x, dtype), method=method, k=k)


def spectrum(update: Update, method: str = "full", k: int | None = None) -> np.ndarray:
    """:func:`singular_values` of an update already normalized by :func:`as_update`."""
    if is_factored(update):
        sigma = factored_singular_values(*update)
    elif method == "full":
        sigma = torch.linalg.svdvals(update)
        sigma = sigma if k is None else sigma[:k]
    else:
        sigma = dense_svd(update, method=method, k=k)[1]
    values = sigma.double().numpy()
    return np.sort(np.clip(values, 0.0, None))[::-1].copy()
