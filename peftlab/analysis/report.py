"""Analyze every ΔW of a run and write the report (tables, summary, plots).

    analyze_layers(method.delta_weights(model), run, method)  ->  spectra, ranks, summary
    write_report(out_dir, spectra, ranks, summary)            ->  spectra.csv  ranks.csv  summary.json  *.png

``spectra`` has one row per singular value: run, method, module, index (i of
σ_i, 1 = largest), sigma. ``ranks`` has one row per module: its shape, how
the spectrum was computed (``factored``: exact, from B and A; ``full``: full
SVD of the dense ΔW; ``top-k``: randomized, the measures then describe the
top-k part only), and the measures of :func:`rank_summary`.
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from peftlab.analysis.plots import (
    layer_index,
    module_kind,
    plot_effective_rank_by_layer,
    plot_similarity_heatmap,
    plot_spectra,
)
from peftlab.analysis.ranks import ENERGY_LEVELS, rank_summary
from peftlab.analysis.spectra import as_update, input_eps, is_factored, raw_update, spectrum, update_shape

log = logging.getLogger(__name__)

SPECTRA_COLUMNS = ["run", "method", "module", "index", "sigma"]
RANK_COLUMNS = [
    "run", "method", "module", "layer", "kind", "out_features", "in_features", "spectrum",
    "nominal_rank", "effective_rank", "stable_rank",
    *[f"energy_rank_{round(t * 100)}" for t in ENERGY_LEVELS],
    "frobenius_norm", "sigma_max",
]


def analyze_update(update: Any, dense_method: str = "full", k: int | None = None) -> tuple[np.ndarray, dict]:
    """σ (descending) and the per-module row (shape, spectrum kind, rank measures) of one ΔW."""
    raw = raw_update(update)  # a layer's factors() or delta_weight(), computed once
    eps = input_eps(raw)
    update = as_update(raw)
    out_f, in_f = update_shape(update)
    sigma = spectrum(update, method=dense_method, k=k)
    if is_factored(update):
        how = "factored"
    else:
        how = "full" if dense_method == "full" and k is None else "top-k"
    row = {"out_features": out_f, "in_features": in_f, "spectrum": how}
    return sigma, {**row, **rank_summary(sigma, shape=(out_f, in_f), eps=eps)}


def analyze_layers(
    named: Iterable[tuple[str, Any]],
    run: str,
    method: str,
    dense_method: str = "full",
    k: int | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Spectra, ranks and a summary for (module name, layer) pairs, e.g. ``method.delta_weights(model)``.

    Each layer's ``factors()`` is used when it returns (B, A), else ``delta_weight()``;
    (B, A) tuples and dense tensors are accepted as well. ``dense_method`` /
    ``k`` choose the SVD for dense updates (see :func:`singular_values`).
    """
    spectra, ranks = [], []
    for name, layer in tqdm(list(named), desc=f"spectra {run}", disable=None if progress else True):
        try:
            sigma, row = analyze_update(layer, dense_method, k)
        except ValueError as err:
            raise ValueError(f"module {name}: {err}") from err
        spectra.append(pd.DataFrame({"module": name, "index": np.arange(1, len(sigma) + 1), "sigma": sigma}))
        ranks.append({"module": name, "layer": layer_index(name), "kind": module_kind(name), **row})
    spectra_df = pd.concat(spectra, ignore_index=True) if spectra else pd.DataFrame(columns=SPECTRA_COLUMNS[2:])
    spectra_df = spectra_df.assign(run=run, method=method)[SPECTRA_COLUMNS]
    ranks_df = pd.DataFrame(ranks, columns=[c for c in RANK_COLUMNS if c not in ("run", "method")])
    ranks_df = ranks_df.assign(run=run, method=method)[RANK_COLUMNS]
    ranks_df["layer"] = ranks_df["layer"].astype("Int64")
    return spectra_df, ranks_df, summarize(ranks_df, run, method)


def summarize(ranks: pd.DataFrame, run: str, method: str) -> dict:
    """Run-level numbers: counts, mean / median / min / max effective rank, mean stable and
    energy ranks, max nominal rank, and the total ‖ΔW‖_F = √Σ_modules ‖ΔW_m‖_F²."""
    summary: dict[str, Any] = {"run": run, "method": method, "n_modules": int(len(ranks)),
                               "sigma_index_base": 1}
    if ranks.empty:
        return summary
    erank = ranks["effective_rank"]
    summary.update({
        "spectrum": ranks["spectrum"].value_counts().to_dict(),
        "effective_rank": {"mean": erank.mean(), "median": erank.median(), "min": erank.min(), "max": erank.max()},
        "stable_rank_mean": ranks["stable_rank"].mean(),
        **{f"energy_rank_{round(t * 100)}_mean": ranks[f"energy_rank_{round(t * 100)}"].mean() for t in ENERGY_LEVELS},
        "nominal_rank_max": int(ranks["nominal_rank"].max()),
        "frobenius_norm_total": float(np.sqrt(np.sum(ranks["frobenius_norm"] ** 2))),
    })
    return _json_ready(summary)


def _json_ready(value: Any) -> Any:
    """numpy scalars -> Python, NaN / inf -> None (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def file_label(text: str) -> str:
    """A string safe as part of a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def write_report(
    out_dir: str | Path, spectra: pd.DataFrame, ranks: pd.DataFrame, summary: Mapping[str, Any], plots: bool = True,
) -> list[Path]:
    """Write spectra.csv, ranks.csv, summary.json and (``plots``) spectra_<run>.png per run and
    effective_rank_by_layer.png into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "spectra.csv", out / "ranks.csv", out / "summary.json"]
    spectra.to_csv(written[0], index=False)
    ranks.to_csv(written[1], index=False)
    written[2].write_text(json.dumps(_json_ready(summary), indent=2, allow_nan=False) + "\n")
    if plots and not ranks.empty:
        for run, rows in spectra.groupby("run", sort=False):
            path = out / f"spectra_{file_label(str(run))}.png"
            plot_spectra(rows, path, title=f"σ of ΔW — {run}")
            written.append(path)
        written.append(out / "effective_rank_by_layer.png")
        plot_effective_rank_by_layer(ranks, written[-1])
    log.info("wrote %d files to %s", len(written), out)
    return written


def similarity_frame(grids: Mapping[str, np.ndarray], run: str, other: str) -> pd.DataFrame:
    """Long form of φ grids: run, other, module, i, j, phi (i, j from 1)."""
    frames = []
    for module, grid in grids.items():
        i, j = np.meshgrid(np.arange(1, grid.shape[0] + 1), np.arange(1, grid.shape[1] + 1), indexing="ij")
        frames.append(pd.DataFrame({"module": module, "i": i.ravel(), "j": j.ravel(), "phi": grid.ravel()}))
    frame = pd.concat(frames, ignore_index=True)
    return frame.assign(run=run, other=other)[["run", "other", "module", "i", "j", "phi"]]


def write_similarity(
    out_dir: str | Path, grids: Mapping[str, np.ndarray], run: str, other: str,
    plots: bool = True, max_heatmaps: int = 12,
) -> list[Path]:
    """similarity_<run>_vs_<other>.csv, a heatmap of φ averaged over modules of equal grid
    shape, and one heatmap for each of the first ``max_heatmaps`` modules."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"similarity_{file_label(run)}_vs_{file_label(other)}"
    written = [out / f"{stem}.csv"]
    similarity_frame(grids, run, other).to_csv(written[0], index=False)
    if not plots:
        return written
    shapes = pd.Series({m: g.shape for m, g in grids.items()})
    common_shape = shapes.value_counts().index[0]
    mean_grid = np.mean([g for g in grids.values() if g.shape == common_shape], axis=0)
    written.append(out / f"{stem}_mean.png")
    plot_similarity_heatmap(mean_grid, written[-1], title=f"mean φ over modules: {run} vs {other}")
    for module in list(grids)[:max_heatmaps]:
        written.append(out / stem / f"{file_label(module)}.png")
        plot_similarity_heatmap(grids[module], written[-1], title=module)
    return written
