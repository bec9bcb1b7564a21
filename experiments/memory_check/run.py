"""Issue 6 check: `peftlab estimate` against a measured peak, on this machine.

For each row it runs `peftlab estimate ... --measure --json` in a fresh process: 3 real training
steps through the trainer; on CPU the measured peak is the RSS growth over the training phase
(the weights paged in and the heap trimmed before it starts, peftlab.memory.measure.PeakMemory), so the
estimate compared is the part training adds: gradients + optimizer states + activations + the
CPU terms (cpu runtime, cpu heap slack). Writes results/memory/estimate_vs_measured.{md,csv,json}.

Rows by role:
  calibration  glibc's default allocator; the heap-slack term was fitted on these (fit.py)
  held-out     glibc's default allocator, other batch sizes and lengths; fitted on nothing
  returning    `--allocator returning` (the --measure default): glibc returns every freed tensor to the
               OS (mallopt M_MMAP_THRESHOLD = 128 KiB, as MALLOC_MMAP_THRESHOLD_=131072 would), so
               the estimate has no heap slack (estimate.cpu_heap_slack=false); fitted on nothing

    PYTHONPATH=. .venv/bin/python experiments/memory_check/run.py            # measures every row
    PYTHONPATH=. .venv/bin/python experiments/memory_check/run.py --reuse    # new estimates, old measurements
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from peftlab.memory.cli import build_estimate, parse_overrides

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "results" / "memory"
METHODS = ["full", "lora", "qlora", "dora"]
# (role, model, batch, length, methods). Sentiment snippets are padded to the longest in each batch:
# at length 64 the measured batches reach 47-61 tokens; at 48 (batch 64) and 32 every batch is cut to it.
CASES = [
    ("calibration", "minilm", 32, 64, METHODS),
    ("calibration", "smollm2-135m", 8, 64, METHODS),
    ("calibration", "minilm", 16, 32, ["lora"]),
    ("calibration", "smollm2-135m", 4, 32, ["lora"]),
    ("held-out", "minilm", 64, 48, METHODS),
    ("held-out", "smollm2-135m", 24, 32, METHODS),
    ("returning", "minilm", 32, 64, METHODS),
    ("returning", "smollm2-135m", 8, 64, METHODS),
    ("returning", "minilm", 64, 48, METHODS),
    ("returning", "smollm2-135m", 24, 32, METHODS),
]
COMMON = ["task=sentiment", "task.max_train_examples=1000", "estimate.padded=true"]
MiB = 2**20


def overrides(role: str, model: str, batch: int, length: int, method: str) -> list[str]:
    args = [f"model={model}", f"method={method}", f"trainer.batch_size={batch}", f"task.max_length={length}", *COMMON]
    return args + (["estimate.cpu_heap_slack=false"] if role == "returning" else [])


def allocator(role: str) -> list[str]:
    return ["--allocator", "returning" if role == "returning" else "default"]


def command_line(role: str, args: list[str]) -> str:
    return " ".join(["peftlab", "estimate", *args, "--measure", *allocator(role)])


def measure(role: str, args: list[str]) -> tuple[int, int | None]:
    """(RSS growth of 3 real steps, the widest measured batch's tokens per sequence):
    `peftlab estimate --measure --json` in a fresh process (RSS is per process)."""
    command = [sys.executable, "-m", "peftlab.cli", "estimate", *args, "--json", "--measure", *allocator(role)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled"}
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["no output"])[-1])
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    return out["measured_peak_bytes"], out.get("measured_seq_len")


def row(role: str, args: list[str], measured: int, width: int | None) -> dict:
    """The estimate of what training adds on CPU, part by part, beside the measured RSS growth.

    Batches are padded to their longest example; where the widest measured batch is shorter than
    task.max_length the estimate is made at its width (as `--measure` compares). Rows measured
    before the width was recorded (width None: the default-allocator rows, on which the heap
    slack was fitted) keep the estimate at task.max_length.
    """
    values = parse_overrides(args)
    model, method, batch, length = (a.partition("=")[2] for a in args[:4])
    if width and width < int(length):
        values["task.max_length"] = width
    e = build_estimate(values, device_hint="cpu")
    return {"role": role, "model": model, "method": method, "batch": int(batch), "length": int(length),
            "measured_seq_len": width,
            "tensors_MiB": round((e.training_bytes - e.cpu_runtime - e.cpu_heap_slack) / MiB, 1),
            "cpu_runtime_MiB": round(e.cpu_runtime / MiB, 1), "cpu_heap_slack_MiB": round(e.cpu_heap_slack / MiB, 1),
            "estimate_MiB": round(e.training_bytes / MiB, 1), "measured_MiB": round(measured / MiB, 1),
            "measured_bytes": measured, "error_pct": round(100 * (e.training_bytes / measured - 1), 1),
            "command": command_line(role, args)}


def write(rows: list[dict]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "estimate_vs_measured.json").write_text(json.dumps(rows, indent=2) + "\n")
    keys = ["role", "model", "method", "batch", "length", "measured_seq_len", "tensors_MiB", "cpu_runtime_MiB",
            "cpu_heap_slack_MiB", "estimate_MiB", "measured_MiB", "error_pct"]
    with (OUT / "estimate_vs_measured.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| rows | model | method | batch × length (widest measured) | tensors | + cpu runtime | + cpu heap slack | = estimate "
             "| measured RSS growth | error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['role']} | {r['model']} | {r['method']} | {r['batch']} × {r['length']}"
                     f"{' (' + str(r['measured_seq_len']) + ')' if r.get('measured_seq_len') else ''} "
                     f"| {r['tensors_MiB']} | {r['cpu_runtime_MiB']} | {r['cpu_heap_slack_MiB']} | **{r['estimate_MiB']}** "
                     f"| {r['measured_MiB']} | {r['error_pct']:+.1f}% |")
    lines.append("\nMiB. Largest error by role: " + ", ".join(
        f"{role} {max(abs(r['error_pct']) for r in rows if r['role'] == role):.1f}%"
        for role in dict.fromkeys(r["role"] for r in rows)) + ".")
    (OUT / "estimate_vs_measured.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reuse", action="store_true", help="keep the measurements already in "
                        "estimate_vs_measured.json (rows not there are measured), recompute every estimate")
    reuse = parser.parse_args().reuse
    path = OUT / "estimate_vs_measured.json"
    key = lambda r: (r["role"], r["model"], r["method"], r["batch"], r["length"])  # noqa: E731
    before = {key(r): (r["measured_bytes"], r.get("measured_seq_len")) for r in json.loads(path.read_text())
              if r["role"] != "returning" or r.get("measured_seq_len")} if reuse else {}
    rows = []
    for role, model, batch, length, methods in CASES:
        for method in methods:
            args = overrides(role, model, batch, length, method)
            command = command_line(role, args)
            here = {"role": role, "model": model, "method": method, "batch": batch, "length": length}
            measured, width = before[key(here)] if key(here) in before else measure(role, args)
            print(command, measured, width, flush=True)
            rows.append(row(role, args, measured, width))
    write(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
