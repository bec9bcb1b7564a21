"""Turn a study's sweeps into its committed results: ``python -m peftlab.analysis.studies SWEEP... --out DIR``.

    SWEEP... ─► DIR/runs/<sweep>/<job>/{result.json, predictions.json}   (result.json holds the config and the
                metrics; no config.yaml copy, no per-step metrics.jsonl, no adapters, no checkpoints)
             ─► DIR/table.md, table.csv           (peftlab table over every run)
             ─► DIR/metric_vs_params.png        (each configuration: mean ± std over seeds vs trainable params)
             ─► DIR/learn_vs_forget.png         (when runs measured forgetting: a point per run)

A study's ``run.sh`` trains its sweeps, then calls this; anything that needs the
adapters (spectra, similarity) runs before, with ``peftlab analyze``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Sequence

from peftlab.errors import ConfigError

SMALL_FILES = ("result.json", "predictions.json")  # predictions.json: what `peftlab paired` reads


def copy_runs(sweeps: Sequence[Path], out: Path) -> int:
    """Copy each run's small files into ``out/runs/<sweep name>/<job>/``; returns the number of runs."""
    copied = 0
    for sweep in map(Path, sweeps):
        for result in sorted(sweep.rglob("result.json")):
            job = result.parent
            target = out / "runs" / sweep.name / job.relative_to(sweep)
            target.mkdir(parents=True, exist_ok=True)
            for name in SMALL_FILES:
                if (job / name).exists():
                    shutil.copy2(job / name, target / name)
            copied += 1
    return copied


def row_label(row, keys: Sequence[str]) -> str:
    """A short label for a row: its key values, without the key names where they are obvious."""
    parts = []
    for key in keys:
        value = row.config.get(key)
        if value is None:
            continue
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        parts.append(text if key in ("method.name", "model.name", "task.name") else f"{key.split('.')[-1]}={text}")
    return " ".join(parts)


def plot_metric_vs_params(table, path: Path, title: str = ""):
    """Each configuration's test metric (mean ± std over seeds) against its trainable parameters (log x)."""
    from peftlab.analysis.plots import _figure, _save

    rows = [r for r in table.rows if r.test is not None and r.trainable]
    fig, (ax,) = _figure(1, width=7.0, height=4.8)
    for row in rows:
        ax.errorbar(row.trainable, row.test.mean, yerr=row.test.std or 0.0, fmt="o", capsize=3)
        ax.annotate(row_label(row, table.keys), (row.trainable, row.test.mean), fontsize="x-small",
                    xytext=(4, 3), textcoords="offset points")
    bases = [r.base for r in rows if r.base is not None]
    if bases:
        ax.axhline(sum(bases) / len(bases), color="0.6", ls="--", lw=0.8, label="base model")
        ax.legend(fontsize="small")
    metric = table.metric() or "metric"
    ax.set(xscale="log", xlabel="trainable parameters (excluding the task head)", ylabel=f"test {metric}",
           title=title or f"{metric} vs trainable parameters (mean ± std over seeds)")
    return _save(fig, path)


def report(sweeps: Sequence[Path], out: Path, title: str = "") -> dict:
    """Copy the runs, write the table (md, csv) and the plots; returns what was written."""
    from peftlab.analysis.plots import plot_learn_vs_forget
    from peftlab.reporting.table import build_table

    out.mkdir(parents=True, exist_ok=True)
    table = build_table(sweeps)
    written = {"runs": copy_runs(sweeps, out)}
    (out / "table.md").write_text(table.render("md") + "\n", encoding="utf-8")
    (out / "table.csv").write_text(table.render("csv"), encoding="utf-8")
    plot_metric_vs_params(table, out / "metric_vs_params.png", title)
    written["plots"] = ["metric_vs_params.png"]
    finished = [run.result for row in table.rows for run in row.runs
                if run.status == "ok" and (run.result.get("forgetting") or {}).get("mean") is not None]
    if finished:
        metric = table.metric()
        higher = not (metric and metric.startswith(("perplexity", "loss")))
        plot_learn_vs_forget(finished, out / "learn_vs_forget.png", metric, higher_is_better=higher)
        written["plots"].append("learn_vs_forget.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftlab.analysis.studies", description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep directories of the study")
    parser.add_argument("--out", type=Path, required=True, help="results/<study>")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    try:
        written = report(args.sweeps, args.out, args.title)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{written['runs']} runs -> {args.out}/runs; table.md, table.csv, {', '.join(written['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
