"""Issue 6 check: `peftlab estimate` against a measured peak, on this machine.

For each (model, method) it runs `peftlab estimate ... --measure --json` (3 real training
steps through the trainer; CPU: RSS growth over the training phase, so the estimate compared
is the part training adds: gradients + optimizer states + activations) and writes
results/memory/estimate_vs_measured.{md,csv,json}.

    .venv/bin/python experiments/memory_check/run.py
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "results" / "memory"
CASES = {
    "minilm": ["model=minilm", "task=sentiment", "trainer.batch_size=32", "task.max_length=64"],
    "smollm2-135m": ["model=smollm2-135m", "task=sentiment", "trainer.batch_size=8", "task.max_length=64"],
}
METHODS = ["full", "lora", "qlora", "dora"]


def main() -> int:
    rows = []
    for model, overrides in CASES.items():
        for method in METHODS:
            command = [str(ROOT / ".venv/bin/peftlab"), "estimate", *overrides, f"method={method}", "--json", "--measure"]
            proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                rows.append({"model": model, "method": method, "error": proc.stderr.strip().splitlines()[-1]})
                continue
            out = json.loads(proc.stdout[proc.stdout.index("{"):])
            # what training adds on top of the loaded, adapted model (that is what RSS growth measures):
            # gradients, optimizer states and activations; weights and adapters exist before it starts
            estimate = out["allocated_bytes"] - out["frozen_weights"] - out["quant_constants"] - out["trainable_weights"]
            measured = out["measured_peak_bytes"]
            rows.append({"model": model, "method": method, "estimate_MiB": round(estimate / 2**20, 1),
                         "measured_MiB": round(measured / 2**20, 1),
                         "error_pct": round(100 * (estimate / measured - 1), 1) if measured else None,
                         "command": " ".join(["peftlab", "estimate", *overrides, f"method={method}", "--measure"])})
            print(rows[-1], flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "estimate_vs_measured.json").write_text(json.dumps(rows, indent=2))
    keys = ["model", "method", "estimate_MiB", "measured_MiB", "error_pct", "error"]
    with (OUT / "estimate_vs_measured.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| model | method | estimate (MiB) | measured (MiB) | error |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r.get('estimate_MiB', '')} | {r.get('measured_MiB', '')} | "
                     f"{r.get('error_pct', r.get('error', ''))} |")
    (OUT / "estimate_vs_measured.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
