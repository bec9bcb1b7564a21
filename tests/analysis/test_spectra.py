"""peftlab.analysis.spectra: singular values of dense and factored (B, A) updates against numpy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis_support import _seed, rel_err, with_spectrum  # noqa: F401  (_seed: a fixture)
from peftlab.analysis import analyze_update, nominal_rank, singular_triplets, singular_values

pytestmark = pytest.mark.usefixtures("_seed")  # every test sees the same random matrices


def test_dense_spectrum_is_the_given_sigma():
    sigma = [9.0, 4.0, 2.5, 1.0, 0.25]
    values = singular_values(torch.from_numpy(with_spectrum(sigma, 40, 30)))
    assert values.dtype == np.float64 and values.shape == (30,)
    assert rel_err(values[:5], sigma) < 1e-12
    assert np.all(values[5:] < 1e-12)
    assert np.all(np.diff(values) <= 0)


@pytest.mark.parametrize("out_f, r, in_f", [(200, 8, 150), (64, 16, 512), (5, 8, 20)])
def test_factored_sigma_equals_numpy_svd_of_product(out_f, r, in_f):
    rng = np.random.default_rng(out_f + r)
    b, a = rng.standard_normal((out_f, r)), rng.standard_normal((r, in_f))
    expected = np.linalg.svd(b @ a, compute_uv=False)[: min(out_f, r, in_f)]
    values = singular_values((torch.from_numpy(b), torch.from_numpy(a)))
    assert values.shape == expected.shape
    assert rel_err(values, expected) < 1e-6


def test_factored_sigma_of_fp32_factors_and_rank_deficient_b():
    rng = np.random.default_rng(3)
    b = (rng.standard_normal((96, 3)) @ rng.standard_normal((3, 8))).astype(np.float32)  # rank 3, r = 8
    a = rng.standard_normal((8, 80)).astype(np.float32)
    expected = np.linalg.svd(b.astype(np.float64) @ a.astype(np.float64), compute_uv=False)[:8]
    values = singular_values((torch.from_numpy(b), torch.from_numpy(a)))
    assert rel_err(values, expected) < 1e-6
    # numpy's tolerance uses the eps of the data's dtype: fp32 rounding of B is not rank
    assert nominal_rank(values, shape=(96, 80), eps=float(np.finfo(np.float32).eps)) == 3
    assert analyze_update((torch.from_numpy(b), torch.from_numpy(a)))[1]["nominal_rank"] == 3
    assert analyze_update((torch.from_numpy(b).double(), torch.from_numpy(a).double()))[1]["nominal_rank"] == 8


def test_factored_path_never_decomposes_the_product(monkeypatch):
    seen = []
    for namespace, name in [(torch.linalg, "svd"), (torch.linalg, "svdvals"), (np.linalg, "svd")]:
        original = getattr(namespace, name)
        monkeypatch.setattr(namespace, name,
                            lambda x, *a, _f=original, **k: seen.append(tuple(x.shape)) or _f(x, *a, **k))
    factors = (torch.randn(1024, 4), torch.randn(4, 768))
    singular_values(factors)
    singular_triplets(factors)
    assert len(seen) == 2 and all(max(shape) <= 4 for shape in seen)


def test_randomized_top_k_close_to_full():
    sigma = 0.7 ** np.arange(60)
    x = torch.from_numpy(with_spectrum(sigma, 300, 200, seed=5))
    values = singular_values(x, method="randomized", k=10)
    assert values.shape == (10,)
    assert rel_err(values, sigma[:10]) < 1e-6
    with pytest.raises(ValueError, match="needs k"):
        singular_values(x, method="randomized")


def test_non_finite_update_is_an_error():
    x = torch.ones(4, 4)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        singular_values(x)
