"""How far did each method move the weights? ‖ΔW‖_F per adapted matrix, relative to ‖W0‖_F.

    python experiments/method_smoke/update_size.py RUN_DIR... [--csv OUT]

A method whose update stays tiny after the same number of steps as LoRA leaves the
features (and so the fresh task head) where the base had them; this is the check behind
the issue-3 finding that AdaLoRA, LoHa and LoKr stay at the majority class on minilm.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

import torch

from peftlab.methods.base import base_weight
from peftlab.reporting.runs import load_run


def update_sizes(run_dir: Path) -> dict:
    model, method, result = load_run(run_dir)
    absolute, relative = [], []
    with torch.no_grad():
        for name, layer in method.delta_weights(model):
            delta = layer.delta_weight().float()
            w0 = base_weight(layer.base)
            absolute.append(float(delta.norm()))
            relative.append(float(delta.norm() / w0.norm()))
    after = result["metrics"]["after"]["test"]
    return {
        "run": str(run_dir),
        "method": result["method"]["name"],
        "lr": result["config"]["optim"]["lr"],
        "modules": len(absolute),
        "dW_fro_mean": statistics.fmean(absolute),
        "dW_rel_mean": statistics.fmean(relative),
        "dW_rel_max": max(relative),
        "test_accuracy": after.get("accuracy"),
        "test_loss": after.get("loss"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args(argv)
    rows = [update_sizes(run) for run in args.runs]
    keys = list(rows[0])
    print(" | ".join(keys[1:]))
    for row in rows:
        print(" | ".join(f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in keys[1:]))
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
