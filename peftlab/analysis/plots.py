"""PNG plots of spectra, ranks, similarity and learning vs forgetting.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg
canvas, so importing this module never switches the global (pyplot) backend:
notebooks keep their own. Every function saves to ``path`` and returns the
figure, which a notebook can display.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# A module inside a repeated block: "<...>.layers.<i>.<rest>" (llama), ".layer." (bert), ".h." (gpt2).
BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def layer_index(module: str) -> int | None:
    """Block index parsed from a module name (``model.layers.3.self_attn.q_proj`` -> 3), or None."""
    match = BLOCK.search(module)
    return int(match.group(1)) if match else None


def module_kind(module: str) -> str:
    """The module's name inside its block (``self_attn.q_proj``); the full name outside blocks."""
    match = BLOCK.search(module)
    return module[match.end():] if match else module


def _figure(n_panels: int = 1, width: float = 5.0, height: float = 3.6) -> tuple[Figure, list]:
    cols = min(n_panels, 4)
    rows = -(-n_panels // cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _save(fig: Figure, path: str | Path) -> Figure:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return fig


def plot_spectra(spectra: pd.DataFrame, path: str | Path, title: str = "") -> Figure:
    """σ_i against i (log-y), one panel per module kind, one line per layer (colored by depth).

    ``spectra``: columns module, index, sigma (one run). Zero σ are left out of the log scale.
    """
    kinds = sorted({module_kind(m) for m in spectra["module"]})
    fig, axes = _figure(len(kinds))
    layers = [layer_index(m) for m in spectra["module"].unique()]
    depth = max([i for i in layers if i is not None], default=0)
    colors = matplotlib.colormaps["viridis"]
    norm = matplotlib.colors.Normalize(0, max(depth, 1))
    for ax, kind in zip(axes, kinds):
        for module, rows in spectra[spectra["module"].map(module_kind) == kind].groupby("module", sort=False):
            rows = rows[rows["sigma"] > 0]
            ax.plot(rows["index"], rows["sigma"], color=colors(norm(layer_index(module) or 0)), lw=1)
        ax.set_yscale("log")
        ax.set(title=kind, xlabel="i", ylabel="σ_i")
    if depth > 0:
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=colors), ax=axes, label="layer")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_effective_rank_by_layer(ranks: pd.DataFrame, path: str | Path, title: str = "") -> Figure:
    """Effective rank against block index, one line per (run, module kind).

    ``ranks``: columns module, effective_rank and optionally run. Modules outside
    repeated blocks are placed by their order instead of a block index.
    """
    fig, (ax,) = _figure(1, width=6.5, height=4.0)
    frame = ranks.assign(
        kind=ranks["module"].map(module_kind),
        layer=[layer_index(m) if layer_index(m) is not None else k for k, m in enumerate(ranks["module"])],
    )
    group_keys = ["run", "kind"] if "run" in frame and frame["run"].nunique() > 1 else ["kind"]
    for key, rows in frame.groupby(group_keys, sort=True):
        label = " / ".join(map(str, key)) if isinstance(key, tuple) else str(key)
        rows = rows.sort_values("layer")
        ax.plot(rows["layer"], rows["effective_rank"], marker="o", ms=3, lw=1, label=label)
    ax.set(xlabel="layer", ylabel="effective rank", title=title or "effective rank of ΔW by layer")
    ax.legend(fontsize="small", ncols=2)
    return _save(fig, path)


def plot_similarity_heatmap(grid: np.ndarray, path: str | Path, title: str = "") -> Figure:
    """φ(i, j) as a heatmap, i on the y axis and j on the x axis (LoRA paper, Figure 3)."""
    fig, (ax,) = _figure(1, width=4.6, height=4.0)
    image = ax.imshow(grid, origin="upper", vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto",
                      extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5))
    fig.colorbar(image, ax=ax, label="φ(i, j)")
    ax.set(xlabel="j", ylabel="i", title=title)
    return _save(fig, path)


def learn_forget_point(result: Mapping[str, Any], metric: str | None = None, higher_is_better: bool = True) -> dict:
    """(method, rank, forgetting, gain) of one result.json.

    gain = after - before of the test ``metric`` (sign flipped when lower is
    better); ``metric=None`` takes the first test metric present before and after.
    forgetting = result["forgetting"]["mean"] (signed; larger = more forgotten).
    """
    before = result["metrics"]["before"]["test"]
    after = result["metrics"]["after"]["test"]
    metric = metric or next(k for k in after if k in before)
    gain = after[metric] - before[metric]
    method = result["method"]
    return {
        "method": method["name"],
        "rank": (method.get("config") or {}).get("r"),
        "forgetting": result["forgetting"]["mean"],
        "gain": gain if higher_is_better else -gain,
        "metric": metric,
    }


def plot_learn_vs_forget(
    rows: Iterable[Mapping[str, Any]], path: str | Path, metric: str | None = None, higher_is_better: bool = True,
) -> Figure:
    """Task gain against forgetting, a point per run, colored by method, labeled by rank
    (as in Biderman et al. 2024, "LoRA Learns Less and Forgets Less", arXiv:2405.09673)."""
    points = pd.DataFrame([learn_forget_point(r, metric, higher_is_better) for r in rows])
    fig, (ax,) = _figure(1, width=5.5, height=4.2)
    for method, group in points.groupby("method", sort=True):
        ax.scatter(group["forgetting"], group["gain"], label=method, s=30)
        for _, p in group.iterrows():
            if p["rank"] is not None and not pd.isna(p["rank"]):
                ax.annotate(f"r={int(p['rank'])}", (p["forgetting"], p["gain"]), fontsize="small",
                            xytext=(3, 3), textcoords="offset points")
    ylabel = f"task gain ({points['metric'].iloc[0]})" if len(points) else "task gain"
    ax.set(xlabel="forgetting (larger = more forgotten)", ylabel=ylabel, title="learning vs forgetting")
    ax.axvline(0.0, color="0.8", lw=0.8, zorder=0)
    ax.legend(fontsize="small")
    return _save(fig, path)
