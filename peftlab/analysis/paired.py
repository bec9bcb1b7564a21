"""Did a run beat the base model on *these* examples? ``peftlab paired RUN... [--base RUN]``.

Every classification run writes ``predictions.json`` (per example, in split order: what the base
predicted when ``trainer.eval_before`` is on, what the trained model predicted, and the labels).
The base and the trained model answer the same test examples, so the right test is paired:

    b = examples the run gets right and the base got wrong     c = the reverse
    Δ = (b − c) / n,   95% interval Δ ± 1.96 · √(b + c − (b − c)²/n) / n
    p = exact McNemar: two-sided binomial test of b against b + c trials at ½
    p_holm = p adjusted (Holm–Bonferroni) for the number of runs of the same task tested together
             (runs of different tasks are separate families; the table says which task each row is)

An unpaired comparison of two accuracies near 0.8 on n = 1000 needs Δ ≈ 0.036 to reach p < 0.05;
the paired test needs only what the discordant examples say.

The base's predictions come from ``--base RUN`` (its ``before``), or else from each run's own
``before``. ``--against PATH`` compares trained runs with each other instead (the ``after`` of both):
PATH is one run that every run is tested against, or a folder of runs, where each run meets the run
of the same folder name (e.g. every method with ``model.pooling=mean`` against the same method with
``cls``). The ``base`` column then holds that run's accuracy. Bad input (no predictions.json,
different examples) is one ``error: PATH: ...`` line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence


class PairedError(Exception):
    """Bad input; the CLI prints ``error: <message>`` and returns 2."""


@dataclass
class Paired:
    run: str
    method: str
    n: int
    base: float       # base accuracy on these n examples
    accuracy: float   # the run's accuracy on them
    delta: float      # accuracy − base
    low: float        # 95% interval of delta (paired)
    high: float
    wins: int         # b: right now, wrong before
    losses: int       # c: wrong now, right before
    p: float          # exact McNemar, two-sided
    p_holm: float = float("nan")  # p adjusted for the runs of this task in the table (Holm), set by paired_table
    task: str = "?"   # the run's task: each task is its own Holm family


def mcnemar_p(wins: int, losses: int) -> float:
    """Exact two-sided McNemar p-value: P(X ≤ min(b, c)) doubled, X ~ Binomial(b + c, ½)."""
    trials = wins + losses
    if trials == 0:
        return 1.0
    tail = sum(math.comb(trials, k) for k in range(min(wins, losses) + 1)) / 2**trials
    return min(1.0, 2 * tail)


def compare(base: Sequence[int], predictions: Sequence[int], references: Sequence[int], run: str = "",
            method: str = "") -> Paired:
    """The paired comparison of two prediction lists over the same labelled examples."""
    if not len(base) == len(predictions) == len(references):
        raise PairedError(f"{run}: {len(predictions)} predictions vs {len(base)} base predictions and "
                          f"{len(references)} labels (not the same examples)")
    n = len(references)
    if n == 0:
        raise PairedError(f"{run}: no examples")
    base_right = [b == y for b, y in zip(base, references)]
    right = [p == y for p, y in zip(predictions, references)]
    wins = sum(r and not b for r, b in zip(right, base_right))
    losses = sum(b and not r for r, b in zip(right, base_right))
    delta = (wins - losses) / n
    half = 1.96 * math.sqrt(max(wins + losses - (wins - losses) ** 2 / n, 0.0)) / n
    return Paired(run, method, n, sum(base_right) / n, sum(right) / n, delta, delta - half, delta + half,
                  wins, losses, mcnemar_p(wins, losses))


def read_predictions(run: Path) -> dict:
    path = Path(run) / "predictions.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PairedError(f"{path}: missing (runs of classification tasks write it; older runs did not)") from None
    except (OSError, ValueError) as err:
        raise PairedError(f"{path}: cannot read ({err})") from None
    if data.get("format") != "peftlab-predictions-v1" or "references" not in data:
        raise PairedError(f"{path}: not a peftlab predictions file")
    return data


def run_names(run: Path) -> tuple[str, str]:
    """(method, task) of a run, from its result.json ("?" where it cannot be read)."""
    try:
        result = json.loads((Path(run) / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "?", "?"
    return (result.get("method") or {}).get("name", "?"), (result.get("task") or {}).get("name", "?")


def reference_for(run: Path, data: dict, base_data: dict | None, base: Path | None,
                  against: Path | None) -> tuple[dict, str, Path]:
    """(predictions file, side, its run folder) that ``run`` is compared with (see module docstring)."""
    if against is not None:
        where = against if (against / "predictions.json").exists() else against / run.name
        reference, side = read_predictions(where), "after"
        if side not in reference:
            raise PairedError(f"{where}: has no predictions after training (did it finish?)")
        return reference, side, where
    reference, where = (base_data, base) if base_data is not None else (data, run)
    if "before" not in reference:
        raise PairedError(f"{where}: has no base predictions ('before'); run it with trainer.eval_before=true "
                          "or pass --base RUN")
    return reference, "before", where


def paired_table(runs: Sequence[Path], base: Path | None = None, split: str = "test",
                 against: Path | None = None) -> list[Paired]:
    if base is not None and against is not None:
        raise PairedError("--base and --against exclude each other (base: its predictions before training; "
                          "against: a trained run's)")
    base_data = read_predictions(base) if base is not None else None
    rows = []
    for run in map(Path, runs):
        data = read_predictions(run)
        reference, side, where = reference_for(run, data, base_data, base, against)
        if "after" not in data:
            raise PairedError(f"{run}: has no predictions after training (did it finish?)")
        labels = data["references"].get(split)
        if labels is None:
            raise PairedError(f"{run}: no {split!r} split; has {sorted(data['references'])}")
        if labels != reference["references"].get(split):
            raise PairedError(f"{run}: its {split} labels differ from {where}'s (not the same examples)")
        method, task = run_names(run)
        row = compare(reference[side][split], data["after"][split], labels, run.name, method)
        row.task = task
        rows.append(row)
    for task in dict.fromkeys(r.task for r in rows):  # one Holm family per task
        family = [r for r in rows if r.task == task]
        for row, adjusted in zip(family, holm([r.p for r in family])):
            row.p_holm = adjusted
    return rows


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (same order as given): the k-th smallest is multiplied by
    m − k + 1, then made monotone; reject where adjusted < α controls the family-wise error at α."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def to_markdown(rows: Sequence[Paired], reference: str = "base") -> str:
    lines = [f"| run | method | n | {reference} | accuracy | Δ | 95% interval of Δ | wins / losses | p (McNemar) "
             "| p (Holm, within its task) | task |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.run} | {r.method} | {r.n} | {r.base:.3f} | {r.accuracy:.3f} | {r.delta:+.3f} | "
                     f"[{r.low:+.3f}, {r.high:+.3f}] | {r.wins} / {r.losses} | {r.p:.3g} | {r.p_holm:.3g} | {r.task} |")
    return "\n".join(lines) + "\n"


def paired_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftlab paired", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with predictions.json)")
    parser.add_argument("--base", type=Path, help="the run whose 'before' predictions are the base (default: each run's own)")
    parser.add_argument("--against", type=Path,
                        help="compare with a trained run's predictions (one run, or a folder: the run of the same name)")
    parser.add_argument("--split", default="test", help="validation | test (default test)")
    parser.add_argument("--format", choices=("md", "csv"), default="md")
    parser.add_argument("--out", type=Path, help="write the table here (default: print it)")
    args = parser.parse_args(argv)
    try:
        rows = paired_table(args.runs, args.base, args.split, args.against)
    except PairedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.format == "md":
        text = to_markdown(rows, "against" if args.against else "base")
    else:
        import pandas as pd

        text = pd.DataFrame([asdict(r) for r in rows]).to_csv(index=False)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(paired_main())
