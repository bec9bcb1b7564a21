"""peftlab.analysis.similarity: subspace similarity of identical, orthogonal, nested and random subspaces;
compare_runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis_support import _seed, orthonormal, with_spectrum  # noqa: F401  (_seed: a fixture)
from peftlab.analysis import compare_runs, subspace_similarity

pytestmark = pytest.mark.usefixtures("_seed")  # every test sees the same random matrices


def test_similarity_of_identical_subspaces_is_one_and_factored_equals_dense():
    b, a = torch.randn(48, 6, dtype=torch.float64), torch.randn(6, 32, dtype=torch.float64)
    grid = subspace_similarity((b, a), (b, a))
    assert grid.shape == (6, 6)
    np.testing.assert_allclose(grid, 1.0, atol=1e-10)
    other = (torch.randn(48, 4, dtype=torch.float64), torch.randn(4, 32, dtype=torch.float64))
    np.testing.assert_allclose(subspace_similarity((b, a), other), subspace_similarity(b @ a, other[0] @ other[1]),
                               atol=1e-10)


def test_similarity_of_orthogonal_subspaces_is_zero():
    eye = torch.eye(32, dtype=torch.float64)
    delta1 = torch.randn(20, 8, dtype=torch.float64) @ eye[:8]     # row space e1..e8
    delta2 = torch.randn(20, 8, dtype=torch.float64) @ eye[8:16]   # row space e9..e16
    np.testing.assert_allclose(subspace_similarity(delta1, delta2), 0.0, atol=1e-12)


def test_similarity_of_nested_subspaces_is_one_at_the_smaller_rank():
    rows = torch.from_numpy(orthonormal(64, 16, seed=7)).T                  # (16, 64) orthonormal rows
    big = torch.from_numpy(with_spectrum(np.linspace(4, 1, 16), 30, 16, seed=8)) @ rows
    small = torch.randn(30, 4, dtype=torch.float64) @ torch.randn(4, 16, dtype=torch.float64) @ rows
    grid = subspace_similarity(small, big, i_max=4, j_max=16)
    assert grid.shape == (4, 16)
    assert grid[3, 15] == pytest.approx(1.0, abs=1e-10)  # the 4-dim row space lies in the 16-dim one


def test_similarity_of_random_subspaces_matches_expectation():
    d, k = 256, 64
    grid = subspace_similarity(torch.randn(k, d, dtype=torch.float64), torch.randn(k, d, dtype=torch.float64))
    # E ‖V1ᵀ V2‖_F² = i·j/d for independent random subspaces: 16 here (std ≈ 0.4)
    assert grid[-1, -1] * k == pytest.approx(k * k / d, rel=0.15)
    assert np.all((grid >= 0) & (grid <= 1 + 1e-12))


def test_compare_runs_matches_modules_by_name_and_rejects_disjoint_runs():
    run1 = {"layers.0.q": (torch.randn(8, 2), torch.randn(2, 8)), "layers.0.v": torch.randn(8, 8)}
    run2 = {"layers.0.q": (torch.randn(8, 3), torch.randn(3, 8)), "layers.0.k": torch.randn(8, 8)}
    grids = compare_runs(run1, run2)
    assert list(grids) == ["layers.0.q"] and grids["layers.0.q"].shape == (2, 3)
    with pytest.raises(ValueError, match="no matching modules between runs"):
        compare_runs({"a": torch.randn(4, 4)}, {"b": torch.randn(4, 4)})
    untrained = {"layers.0.q": (torch.zeros(8, 2), torch.randn(2, 8)), "layers.0.v": torch.randn(8, 8)}
    assert list(compare_runs(untrained, run1)) == ["layers.0.v"]  # ΔW = 0 has no subspace
    with pytest.raises(ValueError, match="zero update"):
        compare_runs({"layers.0.q": untrained["layers.0.q"]}, run1)
