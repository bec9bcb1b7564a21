"""Paper-style tables from runs: ``peftlab table DIR... [--by KEYS] [--metric NAME] [--select-lr]``.

    DIR... --peftlab.reporting.sweeps.collect_runs--> Run (ok | failed | diverged | missing)
           --group by the --by keys------> Row (one configuration, aggregated over seeds)
           --Table.render----------------> Markdown | CSV | LaTeX

A row is one configuration: the values of the ``--by`` keys, dotted config
paths (default: ``method.name`` and every other key whose value differs between
runs, except bookkeeping keys such as ``seed``, ``out_dir`` and ``logger.*``).
Its numbers come from the runs that finished (status ``ok``): the metric on the
test split after tuning as mean ± sample std (ddof=1) and median over the ``n``
seeds, the base model's value (before tuning), trainable parameters, training
time, peak and estimated memory and forgetting (``forgetting.mean`` of
result.json). Failed, diverged and missing runs are counted in ``status`` and
explained in ``reason``.

``select_lr``: among rows that differ only in ``optim.lr``, keep the one with the
best mean *validation* value and report its *test* value (no peeking at test).

No torch: a table of hundreds of runs builds in about a second.
"""
from __future__ import annotations

import csv
import difflib
import io
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from peftlab.errors import ConfigError
from peftlab.memory.measure import RESIDENT_PARTS, training_growth
from peftlab.reporting.sweeps import Run, collect_runs

FORMATS = ("md", "csv", "latex")
# keys that never become default row keys: they do not change what a run computes
BOOKKEEPING = ("seed", "out_dir", "run_dir", "logger.", "study.", "trainer.progress", "trainer.log_every",
               "trainer.save_adapter", "trainer.threads")  # study.*: a sweep's settings, seen through optim.lr etc.
MIB = 2**20
REASON_WIDTH = 100  # characters of a failure reason shown in Markdown / LaTeX (CSV keeps all)


# --------------------------------------------------------------------------- #
# Metrics of one run
# --------------------------------------------------------------------------- #
def dig(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def metric_value(result: dict, name: str, split: str = "test", when: str = "after") -> float | None:
    """``metrics.<when>.<split>.<name>``; ``forgetting`` is ``forgetting.mean`` and
    ``forgetting.<probe>`` one probe's forgetting (both only after tuning, no split)."""
    if name == "forgetting" or name.startswith("forgetting."):
        if (split, when) != ("test", "after"):
            return None
        if name == "forgetting":
            return dig(result, "forgetting", "mean")
        return dig(result, "forgetting", "probes", name[len("forgetting."):], "forgetting")
    value = dig(result, "metrics", when, split, name)
    return float(value) if isinstance(value, (int, float)) else None


def lower_is_better(metric: str) -> bool:
    return metric in ("loss", "perplexity") or metric.startswith("forgetting")


def available_metrics(runs: list[Run]) -> list[str]:
    names = set()
    for run in runs:
        values = dig(run.result, "metrics", "after", "test") or {}
        names |= {k for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)} - {"n"}
        probes = dig(run.result, "forgetting", "probes") or {}
        if probes:
            names |= {"forgetting"} | {f"forgetting.{probe}" for probe in probes}
    return sorted(names)


def task_metric(runs: list[Run]) -> str:
    """The metric the runs' task reports (result.json task.metric), e.g. accuracy or perplexity."""
    names = Counter(dig(run.result, "task", "metric") or run.config.get("task.metric") for run in runs)
    names.pop(None, None)
    return names.most_common(1)[0][0] if names else "accuracy"


# --------------------------------------------------------------------------- #
# Rows
# --------------------------------------------------------------------------- #
@dataclass
class Stats:
    mean: float
    std: float | None  # sample std (ddof=1); None for one value
    median: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stats | None:
        if not values:
            return None
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(statistics.fmean(values), std, statistics.median(values), len(values))


@dataclass
class Row:
    """One configuration: its key values, its runs, and numbers over the runs that finished."""

    config: dict[str, Any]      # --by key -> value
    runs: list[Run]
    metric: str                 # the metric reported (test split, after tuning)
    selection: str              # the metric whose validation value picks the lr
    test: Stats | None
    validation: float | None    # mean validation value of ``selection``
    base: float | None          # mean test value of the base model (before tuning)
    trainable: int | None
    train_time_s: float | None
    peak_mib: float | None      # the training phase's peak: RSS on CPU, max_memory_allocated on CUDA
    train_mib: float | None     # what training added at its peak (CPU: RSS growth; CUDA: the peak itself)
    estimate_mib: float | None  # peftlab estimate of the same quantity as train_mib
    forgetting: float | None
    lr_tried: tuple = ()        # select_lr: every lr of this configuration

    def status(self) -> str:
        """``ok``; ``2 ok / 3`` with some failures; ``failed (3)`` when none finished."""
        counts = Counter(run.status for run in self.runs)
        ok = counts.pop("ok", 0)
        if not counts:
            return "ok"
        if ok:
            return f"{ok} ok / {len(self.runs)}"
        return ", ".join(f"{status} ({n})" for status, n in sorted(counts.items()))

    def reason(self) -> str:
        """Distinct reasons of the runs that did not finish, each with its status and count."""
        counts = Counter((run.status, " ".join(str(run.reason or "no reason recorded").split()))
                         for run in self.runs if run.status != "ok")
        return "; ".join(f"{status}: {reason}" + (f" (x{n})" if n > 1 else "") for (status, reason), n in counts.items())


def _mean(values: list) -> float | None:
    values = [float(v) for v in values if isinstance(v, (int, float))]
    return statistics.fmean(values) if values else None


def estimated_training_bytes(result: dict) -> int | None:
    """The estimate of what :func:`peftlab.memory.measure.training_growth` measures (like with like, see issue 6):
    ``allocated_bytes`` on CUDA, ``training_bytes`` on CPU (older results: rebuilt from the parts)."""
    memory = result.get("memory") or {}
    est = memory.get("estimate") or {}
    if str(memory.get("kind", "")).startswith("cuda"):
        return est.get("allocated_bytes")
    if "training_bytes" in est:
        return est["training_bytes"]
    if "total_bytes" not in est:
        return None
    return est["total_bytes"] - sum(est.get(part) or 0 for part in RESIDENT_PARTS)


def make_row(config: dict[str, Any], runs: list[Run], metric: str | None) -> Row:
    ok = [run.result for run in runs if run.status == "ok"]
    everyone = [run.result for run in runs]
    name = metric or task_metric(runs)
    selection = task_metric(runs) if name.startswith("forgetting") else name  # forgetting has no validation split
    test = [metric_value(result, name) for result in ok]
    estimate = _mean([estimated_training_bytes(r) for r in ok])
    peak = _mean([dig(r, "memory", "peak_bytes") for r in ok])
    grown = _mean([training_growth(r.get("memory") or {}) for r in ok])
    trainable = next((t for t in (dig(r, "params", "trainable") for r in everyone) if isinstance(t, int)), None)
    return Row(
        config=config, runs=runs, metric=name, selection=selection,
        test=Stats.of([v for v in test if v is not None]),
        validation=_mean([metric_value(r, selection, split="validation") for r in ok]),
        base=_mean([metric_value(r, name, when="before") for r in everyone]),  # the base does not depend on training
        trainable=trainable,
        train_time_s=_mean([dig(r, "train", "train_time_s") for r in ok]),
        peak_mib=None if peak is None else peak / MIB,
        train_mib=None if grown is None else grown / MIB,
        estimate_mib=None if estimate is None else estimate / MIB,
        forgetting=_mean([dig(r, "forgetting", "mean") for r in ok]),
    )


def row_keys(runs: list[Run], by: Sequence[str] | None = None, select_lr: bool = False) -> list[str]:
    """The --by keys, checked against the runs' configs; by default ``method.name`` and every
    other key that :func:`differs` between runs, except bookkeeping keys."""
    known: dict[str, None] = {}
    for run in runs:
        known.update(dict.fromkeys(run.config))
    if by:
        for key in by:
            if key not in known:
                close = difflib.get_close_matches(key, list(known), n=3)
                hint = f"did you mean {', '.join(close)}?" if close else "allowed: dotted keys of a run's config.yaml"
                raise ConfigError("--by", f"unknown key {key!r} (no run's config has it); {hint}")
        keys = list(dict.fromkeys(by))
    else:
        keys = ["method.name"] + [key for key in known if key != "method.name"
                                  and not key.startswith(BOOKKEEPING) and differs(runs, key)]
    if select_lr and "optim.lr" not in keys:
        keys.append("optim.lr")
    return keys


def differs(runs: list[Run], key: str) -> bool:
    """Whether ``key`` takes two values among the runs that state it, other than by following
    its group's choice (``model.package`` follows ``model.name``; ``method.r`` follows
    ``method.name`` unless two runs of one method differ in it)."""
    group_name = key.split(".")[0] + ".name"
    values: dict[Any, set] = defaultdict(set)
    for run in runs:
        if key in run.config:
            values[run.config.get(group_name) if key != group_name else None].add(run.config[key])
    return any(len(found) > 1 for found in values.values())


def _sort_key(value: Any) -> tuple:
    if value is None:
        return (2, "")
    if isinstance(value, (int, float)):
        return (0, value)
    return (1, str(value))


def build_rows(runs: list[Run], keys: list[str], metric: str | None = None, select_lr: bool = False) -> list[Row]:
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        groups[tuple(run.config.get(key) for key in keys)].append(run)
    rows = [make_row(dict(zip(keys, values)), members, metric) for values, members in groups.items()]
    if select_lr:
        rows = best_lr_rows(rows)
    return sorted(rows, key=lambda row: tuple(_sort_key(row.config[key]) for key in keys))


def best_lr_rows(rows: list[Row]) -> list[Row]:
    """Among rows that differ only in ``optim.lr`` keep the best mean validation value (lowest
    for loss / perplexity); a configuration with no finished lr keeps all its rows."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        groups[tuple((k, v) for k, v in row.config.items() if k != "optim.lr")].append(row)
    kept = []
    for group in groups.values():
        scored = [row for row in group if row.validation is not None]
        if not scored:
            kept += group
            continue
        sign = 1 if lower_is_better(scored[0].selection) else -1
        best = min(scored, key=lambda row: sign * row.validation)
        best.lr_tried = tuple(sorted((row.config["optim.lr"] for row in group), key=_sort_key))
        kept.append(best)
    return kept


# --------------------------------------------------------------------------- #
# The table and its formats
# --------------------------------------------------------------------------- #
def format_params(count: int | None) -> str:
    """Parameters as the LoRA paper prints them: 512, 73.7K, 0.3M, 22.7M, 7.0B."""
    if count is None:
        return ""
    if count < 1_000:
        return str(count)
    if count < 100_000:
        return f"{count / 1e3:.1f}K"
    if count < 1_000_000_000:
        return f"{count / 1e6:.1f}M"
    return f"{count / 1e9:.1f}B"


def _decimals(value: float) -> int:
    return 4 if abs(value) < 10 else 2 if abs(value) < 1000 else 1


def format_number(value: float | None, decimals: int | None = None) -> str:
    if value is None:
        return ""
    return f"{value:.{_decimals(value) if decimals is None else decimals}f}"


def format_stats(stats: Stats | None) -> str:
    """``0.8120 ± 0.0100``; one seed shows just the mean."""
    if stats is None:
        return ""
    mean = format_number(stats.mean)
    return mean if stats.std is None else f"{mean} ± {format_number(stats.std, _decimals(stats.mean))}"


def format_value(value: Any) -> str:
    """A config value as in a Hydra override: 0.0003, true, [q,v]; None is blank."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


@dataclass
class Column:
    title: str                      # Markdown / LaTeX header
    name: str                       # CSV / W&B header
    text: Callable[[Row], str]      # Markdown / LaTeX cell
    value: Callable[[Row], Any]     # CSV / W&B cell (raw number)
    numeric: bool = True
    optional: bool = True           # left out of Markdown / LaTeX when blank in every row
    where: str = "both"             # both | display (Markdown / LaTeX only) | csv


def _column(title: str, name: str, value: Callable[[Row], Any], text: Callable[[Any], str], **options) -> Column:
    return Column(title, name, lambda row: text(value(row)), value, **options)


@dataclass
class Table:
    keys: list[str]
    rows: list[Row]
    select_lr: bool = False

    def metric(self) -> str | None:
        """The one metric every row reports, or None when rows report different ones."""
        names = {row.metric for row in self.rows}
        return names.pop() if len(names) == 1 else None

    def selection(self) -> str:
        names = {row.selection for row in self.rows}
        return names.pop() if len(names) == 1 else "metric"

    def columns(self) -> list[Column]:
        """Every column, in order; Markdown / LaTeX and CSV each take those meant for them."""
        metric = self.metric()
        label = metric or "metric"
        columns = [_column(key + (" (best val)" if self.select_lr and key == "optim.lr" else ""), key,
                           lambda r, k=key: _raw(r.config[k]), format_value, numeric=False, optional=False)
                   for key in self.keys]
        if self.select_lr:
            columns.append(_column("lr tried", "lr_tried", lambda r: " ".join(map(format_value, r.lr_tried)),
                                   lambda text: text.replace(" ", ", "), numeric=False))
        if metric is None:
            columns.append(_column("metric", "metric", lambda r: r.metric, str, numeric=False, optional=False))
        stat = lambda attr: lambda r: getattr(r.test, attr) if r.test else None  # noqa: E731
        columns += [
            _column("status", "status", Row.status, str, numeric=False, optional=False),
            _column("params", "trainable", lambda r: r.trainable, format_params),
            _column(f"base {label}", f"base_{label}", lambda r: r.base, format_number),
            Column(label, label, lambda r: format_stats(r.test), stat("mean"), optional=False, where="display"),
            _column("", f"{label}_mean", stat("mean"), format_number, where="csv"),
            _column("", f"{label}_std", stat("std"), format_number, where="csv"),
            _column("median", f"{label}_median", stat("median"), format_number),
            _column("n", "n", lambda r: r.test.n if r.test else 0, str, optional=False),
        ]
        if self.select_lr:
            selection = self.selection()
            columns.append(_column(f"val {selection}", f"val_{selection}", lambda r: r.validation, format_number))
        columns += [
            _column("train s", "train_time_s", lambda r: r.train_time_s, lambda v: format_number(v, 1)),
            _column("peak MiB", "peak_mib", lambda r: r.peak_mib, lambda v: format_number(v, 0)),
            _column("train MiB", "train_mib", lambda r: r.train_mib, lambda v: format_number(v, 0)),
            _column("est. MiB", "estimate_mib", lambda r: r.estimate_mib, lambda v: format_number(v, 0)),
        ]
        if not label.startswith("forgetting"):
            columns.append(_column("forgetting", "forgetting", lambda r: r.forgetting, lambda v: format_number(v, 4)))
        columns.append(_column("reason", "reason", Row.reason, _shorten, numeric=False))
        return columns

    def records(self) -> tuple[list[str], list[list[Any]]]:
        """CSV / W&B header and raw values (the metric as separate mean, std and median)."""
        columns = [c for c in self.columns() if c.where != "display"]
        return [c.name for c in columns], [[c.value(row) for c in columns] for row in self.rows]

    def render(self, fmt: str = "md") -> str:
        if fmt == "csv":
            return to_csv(*self.records())
        columns = [c for c in self.columns()
                   if c.where != "csv" and (not c.optional or any(c.text(row) for row in self.rows))]
        cells = [[c.text(row) for c in columns] for row in self.rows]
        if fmt == "latex":
            return to_latex(columns, cells)
        return to_markdown(columns, cells) + "\n\n" + self.note()

    def note(self) -> str:
        metric = self.metric() or "each row's metric"
        text = (f"{metric}: test split after tuning, mean ± sample std over n finished seeds "
                f"(base: the model before tuning); params: trainable, excluding a new task head; "
                f"peak MiB: the training phase's peak (CPU: process RSS; CUDA: max_memory_allocated); "
                f"train MiB: what training added to the loaded model at that peak (CPU: RSS growth, after an "
                f"evaluation it can reuse freed heap and read low; CUDA: the peak); est. MiB: peftlab estimate "
                f"of that same quantity.")
        if self.select_lr:
            text += f" optim.lr: per configuration, the lr with the best mean validation {self.selection()}."
        return text


def _raw(value: Any) -> Any:
    return format_value(value) if isinstance(value, (tuple, bool)) else value


def _shorten(text: str) -> str:
    return text if len(text) <= REASON_WIDTH else text[:REASON_WIDTH - 3] + "..."


def to_markdown(columns: list[Column], cells: list[list[str]]) -> str:
    cells = [[text.replace("|", "\\|") for text in row] for row in cells]
    widths = [max([len(c.title), 3] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(texts: list[str]) -> str:
        padded = [t.rjust(w) if c.numeric else t.ljust(w) for t, w, c in zip(texts, widths, columns)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if c.numeric else (":" + "-" * (w + 1)) for w, c in zip(widths, columns)) + "|"
    return "\n".join([line([c.title for c in columns]), rule] + [line(row) for row in cells])


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$"}


def latex_escape(text: str) -> str:
    return re.sub("|".join(map(re.escape, LATEX_SPECIAL)), lambda m: LATEX_SPECIAL[m.group()], text)


def to_latex(columns: list[Column], cells: list[list[str]]) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``)."""
    spec = "".join("r" if c.numeric else "l" for c in columns)
    row = lambda texts: " & ".join(latex_escape(t) for t in texts) + r" \\"  # noqa: E731
    return "\n".join([rf"\begin{{tabular}}{{{spec}}}", r"\toprule", row([c.title for c in columns]), r"\midrule",
                      *(row(texts) for texts in cells), r"\bottomrule", r"\end{tabular}"])


def to_csv(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buffer.getvalue()


def build_table(dirs: Sequence[str | Path], by: Sequence[str] | None = None, metric: str | None = None,
                select_lr: bool = False) -> Table:
    """Collect the runs under ``dirs`` and aggregate them into rows; bad input raises ConfigError."""
    runs = collect_runs(dirs)
    keys = row_keys(runs, by, select_lr)
    if metric is not None:
        known = available_metrics(runs)
        if known and metric not in known:
            raise ConfigError("--metric", f"no run reports {metric!r}; allowed: {', '.join(known)}")
    return Table(keys, build_rows(runs, keys, metric, select_lr), select_lr)


__all__ = ["Row", "Stats", "Table", "build_table", "row_keys", "build_rows", "format_params", "metric_value", "FORMATS"]
