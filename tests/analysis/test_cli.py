"""peftlab.analysis: spectra, ranks, similarity and amplification against closed forms,
and `peftlab analyze` on an adapter trained and saved by HF peft itself."""
from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from peftlab.analysis import (
    amplification,
    analyze_layers,
    analyze_update,
    compare_runs,
    effective_rank,
    energy_rank,
    learn_forget_point,
    nominal_rank,
    plot_learn_vs_forget,
    rank_summary,
    singular_triplets,
    singular_values,
    stable_rank,
    subspace_similarity,
    write_report,
)
from peftlab.analysis.cli import analyze_main

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
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


# --------------------------------------------------------------------------- #
# spectra
# --------------------------------------------------------------------------- #
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


# --------------------------------------------------------------------------- #
# ranks
# --------------------------------------------------------------------------- #
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


# --------------------------------------------------------------------------- #
# subspace similarity
# --------------------------------------------------------------------------- #
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


# --------------------------------------------------------------------------- #
# amplification
# --------------------------------------------------------------------------- #
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


# --------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------- #
class DenseLayer:
    """A layer with a dense update only (like full FT, LoHa, LoKr, DoRA)."""

    def __init__(self, delta: torch.Tensor):
        self.delta = delta

    def factors(self):
        return None

    def delta_weight(self) -> torch.Tensor:
        return self.delta


def peftlab_lora_layer(out_f: int, in_f: int, r: int, seed: int):
    from peftlab.methods.lora import LoRALayer

    torch.manual_seed(seed)
    layer = LoRALayer(nn.Linear(in_f, out_f), r=r, alpha=2.0 * r)
    nn.init.normal_(layer.lora_B)
    return layer


def test_analyze_layers_uses_factors_and_dense_updates(tmp_path):
    lora = peftlab_lora_layer(24, 16, r=4, seed=0)
    dense = torch.from_numpy(with_spectrum([3.0, 2.0, 1.0], 12, 10, seed=4)).float()
    named = [("model.layers.0.self_attn.q_proj", lora), ("model.layers.1.mlp.up_proj", DenseLayer(dense))]
    spectra, ranks, summary = analyze_layers(named, run="r4", method="lora", progress=False)

    assert list(spectra.columns) == ["run", "method", "module", "index", "sigma"]
    q = spectra[spectra["module"] == named[0][0]]
    expected = np.linalg.svd(lora.delta_weight().double().numpy(), compute_uv=False)[:4]
    assert list(q["index"]) == [1, 2, 3, 4] and rel_err(q["sigma"], expected) < 1e-6
    assert ranks["spectrum"].tolist() == ["factored", "full"]
    assert ranks["layer"].tolist() == [0, 1] and ranks["kind"].tolist() == ["self_attn.q_proj", "mlp.up_proj"]
    assert ranks["nominal_rank"].tolist() == [4, 3]
    assert (ranks["out_features"].tolist(), ranks["in_features"].tolist()) == ([24, 12], [16, 10])
    assert summary["n_modules"] == 2 and summary["nominal_rank_max"] == 4

    written = write_report(tmp_path, spectra, ranks, summary)
    names = {p.name for p in written}
    assert {"spectra.csv", "ranks.csv", "summary.json", "spectra_r4.png", "effective_rank_by_layer.png"} <= names
    assert all(p.stat().st_size > 0 for p in written)
    assert json.loads((tmp_path / "summary.json").read_text())["run"] == "r4"
    assert len(pd.read_csv(tmp_path / "spectra.csv")) == 4 + 10


def test_learn_vs_forget_point_and_plot(tmp_path):
    def result(name, r, forgetting, before, after):
        return {"method": {"name": name, "config": {"r": r} if r else {}}, "forgetting": {"mean": forgetting},
                "metrics": {"before": {"test": {"accuracy": before}}, "after": {"test": {"accuracy": after}}}}

    rows = [result("lora", 8, 0.05, 0.5, 0.8), result("lora", 64, 0.1, 0.5, 0.85), result("full", None, 0.3, 0.5, 0.9)]
    point = learn_forget_point(rows[0])
    assert point == {"method": "lora", "rank": 8, "forgetting": 0.05, "gain": pytest.approx(0.3), "metric": "accuracy"}
    assert learn_forget_point(rows[2], higher_is_better=False)["gain"] == pytest.approx(-0.4)
    plot_learn_vs_forget(rows, tmp_path / "learn_forget.png")
    assert (tmp_path / "learn_forget.png").stat().st_size > 0


# --------------------------------------------------------------------------- #
# `peftlab analyze` on adapters saved by HF peft
# --------------------------------------------------------------------------- #
def tiny_llama64(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def save_peft_adapter(path, seed: int = 0, **lora_kwargs):
    """A peft LoRA adapter with random (non-zero) B, one optimizer step taken, saved by peft."""
    from peft import LoraConfig, get_peft_model

    options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    model = get_peft_model(tiny_llama64(seed), LoraConfig(**{**options, **lora_kwargs}))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.save_pretrained(str(path))
    return model


def peft_deltas(model) -> dict[str, tuple[float, np.ndarray]]:
    """Module name -> (scale, fp64 scale·B@A), read from peft's in-memory layers, independently of the file."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            b = module.lora_B["default"].weight.detach().double().numpy()
            a = module.lora_A["default"].weight.detach().double().numpy()
            scale = module.scaling["default"]
            deltas[name.removeprefix("base_model.model.")] = (scale, scale * b @ a)
    return deltas


@pytest.mark.parametrize("lora_kwargs, scales", [
    ({}, {"q_proj": 2.0, "v_proj": 2.0}),
    ({"use_rslora": True}, {"q_proj": 4.0, "v_proj": 4.0}),
    ({"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 16}}, {"q_proj": 4.0, "v_proj": 4.0}),
])
def test_analyze_peft_adapter_gives_sigma_of_independent_svd(tmp_path, lora_kwargs, scales):
    model = save_peft_adapter(tmp_path / "adapter", **lora_kwargs)
    out = tmp_path / "out"
    assert analyze_main([str(tmp_path / "adapter"), "--out", str(out), "--no-plots"]) == 0

    spectra = pd.read_csv(out / "spectra.csv")
    deltas = peft_deltas(model)
    assert set(spectra["module"]) == set(deltas) == {
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    for module, (scale, delta) in deltas.items():
        assert scale == scales[module.rsplit(".", 1)[-1]]
        rows = spectra[spectra["module"] == module].sort_values("index")
        expected = np.linalg.svd(delta, compute_uv=False)[: len(rows)]
        assert len(rows) == (2 if "v_proj" in module and lora_kwargs.get("rank_pattern") else 4)
        assert rel_err(rows["sigma"], expected) < 1e-6, module
    ranks = pd.read_csv(out / "ranks.csv")
    assert set(ranks["spectrum"]) == {"factored"}
    assert set(ranks["method"]) == {"rslora" if lora_kwargs.get("use_rslora") else "lora"}


def test_analyze_peft_adapter_with_base_writes_amplification(tmp_path, monkeypatch, capsys):
    model = save_peft_adapter(tmp_path / "adapter")
    base = tiny_llama64(0)  # the same base weights the adapter was trained on
    fake_models = types.ModuleType("peftlab.models.loading")
    fake_models.load_base = lambda name: (base, None)
    monkeypatch.setitem(sys.modules, "peftlab.models.loading", fake_models)

    out = tmp_path / "out"
    assert analyze_main([str(tmp_path / "adapter"), "--base", "tiny", "--out", str(out)]) == 0
    table = pd.read_csv(out / "amplification.csv")
    assert len(table) == 4
    for module, (_, delta) in peft_deltas(model).items():
        w0 = base.get_submodule(module).weight.detach().double()
        expected = amplification(torch.from_numpy(delta), w0, r=4)
        row = table[table["module"] == module].iloc[0]
        assert row["proj_delta"] == pytest.approx(expected["proj_delta"], rel=1e-6)
        assert row["amplification"] == pytest.approx(expected["amplification"], rel=1e-6)
    assert (out / "spectra_adapter.png").stat().st_size > 0

    assert analyze_main([str(tmp_path / "adapter"), "--out", str(tmp_path / "out2")]) == 0
    assert "amplification skipped" in capsys.readouterr().out


def test_compare_two_peft_adapters(tmp_path):
    save_peft_adapter(tmp_path / "seed0", seed=0)
    save_peft_adapter(tmp_path / "seed1", seed=1, r=8)
    out = tmp_path / "out"
    assert analyze_main([str(tmp_path / "seed0"), "--compare", str(tmp_path / "seed1"), "--out", str(out)]) == 0
    table = pd.read_csv(out / "similarity_seed0_vs_seed1.csv")
    assert len(table) == 4 * (4 * 8) and table["phi"].between(0, 1 + 1e-9).all()
    assert (out / "similarity_seed0_vs_seed1_mean.png").stat().st_size > 0

    assert analyze_main([str(tmp_path / "seed0"), "--compare", str(tmp_path / "seed0"), "--out", str(out)]) == 0
    self_table = pd.read_csv(out / "similarity_seed0_vs_seed0.csv")
    np.testing.assert_allclose(self_table["phi"], 1.0, atol=1e-9)


# --------------------------------------------------------------------------- #
# peftlab runs (load_run stubbed: it belongs to peftlab.reporting.runs)
# --------------------------------------------------------------------------- #
def fake_runs_module(monkeypatch, load_run):
    module = types.ModuleType("peftlab.reporting.runs")
    module.load_run = load_run
    monkeypatch.setitem(sys.modules, "peftlab.reporting.runs", module)


def make_run_dir(tmp_path, name="run"):
    run = tmp_path / name
    run.mkdir()
    (run / "result.json").write_text(json.dumps({"status": "ok"}))
    return run


def test_analyze_peftlab_run_with_lora_layers(tmp_path, monkeypatch):
    from peftlab.methods.lora import LoRA, LoRAConfig

    torch.manual_seed(0)
    model = tiny_llama64()
    method = LoRA(LoRAConfig(r=4, alpha=8.0, targets=["q", "v"]))
    method.apply(model)
    for layer in method.layers(model).values():
        nn.init.normal_(layer.lora_B)
    fake_runs_module(monkeypatch, lambda path: (model, method, {"method": {"name": "lora", "config": {"r": 4}}}))

    out = tmp_path / "out"
    assert analyze_main([str(make_run_dir(tmp_path)), "--out", str(out), "--no-plots"]) == 0
    spectra = pd.read_csv(out / "spectra.csv")
    for name, layer in method.layers(model).items():
        expected = np.linalg.svd(layer.delta_weight().double().numpy(), compute_uv=False)[:4]
        assert rel_err(spectra[spectra["module"] == name]["sigma"], expected) < 1e-6
    assert len(pd.read_csv(out / "amplification.csv")) == len(method.layers(model)) == 4


def test_analyze_full_finetuning_run_with_dense_updates(tmp_path, monkeypatch, capsys):
    from peftlab.methods.full import Full, FullConfig

    reference = tiny_llama64(seed=0)
    model = tiny_llama64(seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    method = Full(FullConfig())
    method.apply(model)
    method.reference = reference
    fake_runs_module(monkeypatch, lambda path: (model, method, {"method": {"name": "full", "config": {}}}))
    run = make_run_dir(tmp_path)

    out = tmp_path / "out"
    assert analyze_main([str(run), "--out", str(out), "--no-plots"]) == 0
    assert "amplification skipped for dense updates (pass --amp-rank R)" in capsys.readouterr().out
    ranks = pd.read_csv(out / "ranks.csv")
    assert len(ranks) == 2 * 7 and set(ranks["spectrum"]) == {"full"} and set(ranks["method"]) == {"full"}
    name = "model.layers.1.mlp.down_proj"
    delta = (model.get_submodule(name).weight - reference.get_submodule(name).weight).detach().double().numpy()
    spectra = pd.read_csv(out / "spectra.csv")
    assert rel_err(spectra[spectra["module"] == name]["sigma"], np.linalg.svd(delta, compute_uv=False)) < 1e-6

    assert analyze_main([str(run), "--out", str(out), "--no-plots", "--amp-rank", "4"]) == 0
    assert len(pd.read_csv(out / "amplification.csv")) == 2 * 7


def test_run_without_weight_delta_is_not_applicable(tmp_path, monkeypatch, capsys):
    method = types.SimpleNamespace(name="prefix", has_weight_delta=False)
    fake_runs_module(monkeypatch, lambda path: (nn.Linear(2, 2), method, {"method": {"name": "prefix"}}))
    run = make_run_dir(tmp_path)
    assert analyze_main([str(run), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"not applicable: {run}: method 'prefix' has no weight delta" in out
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- #
# bad input: one clear line, status 2
# --------------------------------------------------------------------------- #
def test_path_that_is_neither_run_nor_adapter(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert analyze_main([str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {empty}: neither a peftlab run") and "\n" not in err
    assert analyze_main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing'}: no such file or directory"


def test_failed_run_without_adapter(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "result.json").write_text(json.dumps({"status": "failed", "reason": "RuntimeError: out of memory\nmore"}))
    assert analyze_main([str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {run}: run status is 'failed' (RuntimeError: out of memory); it saved no adapter"


def test_compare_with_no_matching_modules(tmp_path, capsys):
    save_peft_adapter(tmp_path / "qv")
    save_peft_adapter(tmp_path / "ko", target_modules=["k_proj", "o_proj"])
    status = analyze_main([str(tmp_path / "qv"), "--compare", str(tmp_path / "ko"), "--out", str(tmp_path / "out")])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'qv'} vs {tmp_path / 'ko'}: no matching modules between runs")
    assert "\n" not in err


def test_non_lora_peft_adapter_is_rejected(tmp_path, capsys):
    save_peft_adapter(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "peft_type": "IA3"}))
    assert analyze_main([str(tmp_path / "adapter")]) == 2
    assert "peft_type 'IA3' is not supported" in capsys.readouterr().err


def test_diverged_adapter_gives_one_line(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    save_peft_adapter(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("layers.1.self_attn.v_proj.lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path))
    assert analyze_main([str(tmp_path / "adapter"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {tmp_path / 'adapter'}: module model.layers.1.self_attn.v_proj: "
                   "update has non-finite entries (diverged run?)")


def test_wandb_logger_gets_the_tables_and_plots(tmp_path, monkeypatch):
    """`--logger wandb` (offline, no login) writes a W&B run holding every table and plot."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    save_peft_adapter(tmp_path / "adapter")
    out = tmp_path / "out"
    assert analyze_main([str(tmp_path / "adapter"), "--out", str(out), "--logger", "wandb"]) == 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logged = {p.name for p in runs[0].rglob("*") if p.is_file()}
    assert any(name.endswith(".wandb") for name in logged)
    media = {p.stem.rsplit("_", 2)[0] for p in (runs[0] / "files" / "media").rglob("*") if p.is_file()}
    assert "ranks" in media and "spectra" in media and any(m.startswith("effective_rank") for m in media), media
