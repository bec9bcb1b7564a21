"""Helpers shared by the tests of peftlab/analysis/: matrices with a known spectrum, a relative error
and a fixed seed (import ``_seed`` and set ``pytestmark = pytest.mark.usefixtures("_seed")`` in the
files that want it). A plain module, not a conftest.py: every conftest outside a package is imported
under the one name ``conftest``, which would shadow tests/conftest.py's helpers.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def _seed():
    torch.manual_seed(0)  # every test sees the same random matrices


def orthonormal(n: int, k: int, seed: int) -> np.ndarray:
    """(n, k) with orthonormal columns."""
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((n, k)))[0]


def with_spectrum(sigma, out_f: int, in_f: int, seed: int = 0) -> np.ndarray:
    """U diag(σ) Vᵀ of shape (out, in) with random orthonormal U, V."""
    k = len(sigma)
    return orthonormal(out_f, k, seed) @ np.diag(sigma) @ orthonormal(in_f, k, seed + 1).T


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
