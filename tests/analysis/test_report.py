"""peftlab.analysis.report: analyze_layers on factored and dense updates, and write_report's files."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from analysis_support import _seed, rel_err, with_spectrum  # noqa: F401  (_seed: a fixture)
from peftlab.analysis import analyze_layers, write_report

pytestmark = pytest.mark.usefixtures("_seed")  # every test sees the same random matrices


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
