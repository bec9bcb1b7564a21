"""Subspace similarity between two learned updates (LoRA paper, Hu et al. 2021, §7.2, eq. 4).

    φ(ΔW₁, ΔW₂, i, j) = ‖V₁^{(i)ᵀ} V₂^{(j)}‖_F² / min(i, j)   ∈ [0, 1]

V^{(i)} (in, i) holds the top-i right-singular vectors of ΔW (its row space,
the input directions the update reads). The paper takes them from A; for
ΔW = B A with B of full column rank the row spaces coincide, and here they
are ordered by ΔW's own σ. φ = 1 when one subspace contains the other, 0 when
they are orthogonal; for independent random subspaces of R^d,
E‖V₁^{(i)ᵀ} V₂^{(j)}‖_F² = i·j/d, i.e. E φ = max(i, j)/d.

Only the first nominal-rank singular vectors are used by default: beyond the
rank of ΔW they are an arbitrary basis of the null space.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np
import torch

from peftlab.analysis.ranks import nominal_rank
from peftlab.analysis.spectra import as_update, input_eps, raw_update, singular_triplets, update_shape

log = logging.getLogger(__name__)


def right_singular_vectors(x: Any, k: int | None = None) -> torch.Tensor:
    """Top right-singular vectors of ΔW as columns, (in, k), fp64.

    ``k=None`` keeps the nominal rank (vectors of nonzero σ only); a ``k``
    above it raises ValueError, since those directions are not determined by ΔW.
    """
    raw = raw_update(x)
    update = as_update(raw)
    _, sigma, v = singular_triplets(update)
    rank = nominal_rank(sigma.numpy(), shape=update_shape(update), eps=input_eps(raw))
    if k is None:
        return v[:, :rank]
    if not 1 <= k <= rank:
        raise ValueError(f"asked for {k} singular directions; the update has rank {rank}")
    return v[:, :k]


def similarity_grid(v1: torch.Tensor, v2: torch.Tensor) -> np.ndarray:
    """φ(i, j) for i = 1..k1, j = 1..k2 from orthonormal columns v1 (d, k1), v2 (d, k2).

    With M = v1ᵀ v2, ‖V₁^{(i)ᵀ} V₂^{(j)}‖_F² is the sum of M² over the leading
    i×j block: a 2-D cumulative sum gives the whole grid at once.
    """
    if v1.shape[0] != v2.shape[0]:
        raise ValueError(f"input dimensions differ: {v1.shape[0]} vs {v2.shape[0]}")
    overlap = (v1.T @ v2).double().numpy() ** 2             # (k1, k2)
    block_sums = overlap.cumsum(axis=0).cumsum(axis=1)       # Σ over [:i, :j]
    i = np.arange(1, overlap.shape[0] + 1)[:, None]
    j = np.arange(1, overlap.shape[1] + 1)[None, :]
    return block_sums / np.minimum(i, j)


def subspace_similarity(delta1: Any, delta2: Any, i_max: int | None = None, j_max: int | None = None) -> np.ndarray:
    """The (i_max × j_max) grid of φ(ΔW₁, ΔW₂, i, j), row i-1 / column j-1 for (i, j).

    ``delta1`` / ``delta2``: dense tensors, (B, A) factors or layers. ``i_max``
    and ``j_max`` default to each update's nominal rank (e.g. 8 and 64 for an
    r=8 vs r=64 comparison, as in the paper's Figure 3).
    """
    v1 = right_singular_vectors(delta1, i_max)
    v2 = right_singular_vectors(delta2, j_max)
    return similarity_grid(v1, v2)


def compare_runs(
    layers1: Mapping[str, Any], layers2: Mapping[str, Any], i_max: int | None = None, j_max: int | None = None,
) -> dict[str, np.ndarray]:
    """φ grids for every module present in both runs, by module name.

    Values of the mappings are layers, (B, A) factors or dense updates. Modules
    whose ΔW is zero in either run (e.g. LoRA's B = 0 before training) have no
    subspace and are left out, with a log warning. Raises ValueError when no
    module name matches, or when every matching module has a zero update.
    """
    common = [name for name in layers1 if name in layers2]
    if not common:
        raise ValueError(
            f"no matching modules between runs: first has {_preview(layers1)}, second has {_preview(layers2)}"
        )
    grids = {name: subspace_similarity(layers1[name], layers2[name], i_max, j_max) for name in common}
    zero = [name for name, grid in grids.items() if grid.size == 0]
    if zero:
        log.warning("left out %d modules whose ΔW is zero in one run: %s", len(zero), _preview(dict.fromkeys(zero)))
    if len(zero) == len(grids):
        raise ValueError(f"every matching module has a zero update in one of the runs ({_preview(grids)})")
    return {name: grid for name, grid in grids.items() if grid.size}


def _preview(names: Mapping[str, Any], n: int = 3) -> str:
    keys = list(names)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return (", ".join(keys[:n]) or "none") + more
