"""peftlab.analysis.amplification: amplification of W0's directions by ΔW against closed forms."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis_support import _seed, orthonormal  # noqa: F401  (_seed: a fixture)
from peftlab.analysis import amplification

pytestmark = pytest.mark.usefixtures("_seed")  # every test sees the same random matrices


def w0_with_known_directions(out_f=40, in_f=30, seed=11):
    s0 = np.array([10.0, 5.0, 3.0, 2.0, 1.0, 0.2, 0.1])
    u0, v0 = orthonormal(out_f, 7, seed), orthonormal(in_f, 7, seed + 1)
    return u0 @ np.diag(s0) @ v0.T, s0, u0, v0


def test_amplification_along_w0s_top_directions():
    w0, s0, u0, v0 = w0_with_known_directions()
    delta = u0[:, :2] @ np.diag([2.0, 1.0]) @ v0[:, :2].T
    row = amplification(torch.from_numpy(delta), torch.from_numpy(w0), r=2)
    assert row["proj_delta"] == pytest.approx(math.hypot(10, 5), rel=1e-10)
    assert row["proj_w0_top"] == pytest.approx(math.hypot(10, 5), rel=1e-10)
    assert row["norm_delta"] == pytest.approx(math.sqrt(5), rel=1e-10)
    assert row["amplification"] == pytest.approx(math.sqrt(5) / math.hypot(10, 5), rel=1e-10)
    assert row["norm_w0"] == pytest.approx(np.linalg.norm(s0), rel=1e-10)


def test_amplification_along_weak_directions_from_factors():
    w0, s0, u0, v0 = w0_with_known_directions()
    b = torch.from_numpy(u0[:, 5:7] * np.array([3.0, 4.0]))  # ΔW = B A on W0's two weakest directions
    a = torch.from_numpy(v0[:, 5:7].T.copy())
    row = amplification((b, a), torch.from_numpy(w0))   # r defaults to the factor rank, 2
    assert row["r"] == 2
    assert row["proj_delta"] == pytest.approx(math.hypot(0.2, 0.1), rel=1e-10)
    assert row["amplification"] == pytest.approx(5.0 / math.hypot(0.2, 0.1), rel=1e-10)
    # random directions: E‖Qᵀ W0 P‖_F² = r² ‖W0‖_F² / (out · in) (mean of norms: a bit below its root)
    expected = 2 * np.linalg.norm(s0) / math.sqrt(40 * 30)
    assert 0.5 * expected < amplification((b, a), torch.from_numpy(w0), n_random=200)["proj_random"] < 1.1 * expected
    with pytest.raises(ValueError, match="r is required"):
        amplification(torch.from_numpy(w0), torch.from_numpy(w0))
