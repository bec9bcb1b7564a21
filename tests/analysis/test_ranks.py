"""peftlab.analysis.ranks: effective, stable, energy and nominal rank against closed forms."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis_support import _seed, with_spectrum  # noqa: F401  (_seed: a fixture)
from peftlab.analysis import effective_rank, energy_rank, nominal_rank, rank_summary, singular_values, stable_rank

pytestmark = pytest.mark.usefixtures("_seed")  # every test sees the same random matrices


@pytest.mark.parametrize("k", [1, 3, 16])
def test_k_equal_singular_values_have_rank_k_under_every_measure(k):
    sigma = np.r_[np.full(k, 2.5), np.zeros(5)]
    assert effective_rank(sigma) == pytest.approx(k, rel=1e-12)
    assert stable_rank(sigma) == pytest.approx(k, rel=1e-12)
    assert nominal_rank(sigma) == k
    for tau in (0.5, 0.9, 0.99, 1.0):
        assert energy_rank(sigma, tau) == math.ceil(round(tau * k, 9))


def test_rank_measures_match_closed_forms():
    sigma = [2.0, 1.0, 1.0]  # p = (1/2, 1/4, 1/4), σ² share = (2/3, 1/6, 1/6)
    assert effective_rank(sigma) == pytest.approx(2**1.5, rel=1e-12)  # exp(1.5 ln 2)
    assert stable_rank(sigma) == pytest.approx(6 / 4)
    assert [energy_rank(sigma, t) for t in (0.5, 0.8, 0.9, 0.99)] == [1, 2, 3, 3]
    summary = rank_summary(sigma)
    assert summary["frobenius_norm"] == pytest.approx(math.sqrt(6))
    assert (summary["energy_rank_90"], summary["energy_rank_95"], summary["energy_rank_99"]) == (3, 3, 3)


def test_nominal_rank_matches_numpy_matrix_rank():
    x = with_spectrum([1.0, 1e-3, 1e-9, 1e-20], 50, 40, seed=2)
    assert nominal_rank(singular_values(x), shape=x.shape) == np.linalg.matrix_rank(x) == 3


def test_zero_matrix_has_rank_zero():
    sigma = singular_values((torch.zeros(20, 4), torch.randn(4, 10)))
    assert (effective_rank(sigma), stable_rank(sigma), energy_rank(sigma, 0.9), nominal_rank(sigma)) == (0, 0, 0, 0)
    assert effective_rank([]) == 0.0 and nominal_rank([]) == 0
    with pytest.raises(ValueError, match="tau"):
        energy_rank([1.0], 0.0)
