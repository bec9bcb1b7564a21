"""Helpers shared by the tests of peftlab/analysis/: matrices with a known spectrum, a relative error
and a fixed seed (``pytestmark = pytest.mark.usefixtures("_seed")`` in the files that want it).

pytest imports every conftest.py outside a package under the one module name ``conftest``, and
loading this file replaces tests/conftest.py in ``sys.modules``: names not defined here are looked
up in the root conftest (``__getattr__`` below), so that ``from conftest import tiny_llama`` keeps
working in the test files collected after this folder. Only attribute access falls through; pytest,
which scans ``dir()`` for fixtures and hooks, does not see the root's fixtures twice.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(2)

ROOT_CONFTEST = Path(__file__).resolve().parent.parent / "conftest.py"
_root = None  # tests/conftest.py's module, found once pytest has registered this file


def pytest_configure(config):
    """Called as pytest registers this conftest (documented for conftests imported during collection)."""
    global _root
    for plugin in config.pluginmanager.get_plugins():
        file = getattr(plugin, "__file__", None)
        if file and Path(file).resolve() == ROOT_CONFTEST:
            _root = plugin


def __getattr__(name: str):
    if _root is not None and not name.startswith(("_", "pytest", "collect_ignore")) and hasattr(_root, name):
        return getattr(_root, name)
    raise AttributeError(f"module {__name__!r} ({__file__}) has no attribute {name!r}")


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
