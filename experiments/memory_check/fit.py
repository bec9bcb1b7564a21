"""Fit the estimator's two CPU terms to the calibration rows of results/memory/estimate_vs_measured.json.

    measured RSS growth ≈ tensors + CPU_RUNTIME + HEAP_SLACK_BASE + CPU_HEAP_SLACK × heap activations

``tensors`` is what the estimate counts without the CPU terms; CPU_RUNTIME is measured, not
fitted; ``heap activations`` are the activations outside glibc's own mmaps
(peftlab.memory.estimate._heap_activations). Weighted least squares on the relative error, so small
and large rows count alike. Only rows with role ``calibration`` (glibc's default allocator) are
read. Prints the two constants to copy into peftlab/memory/estimate.py, and each row's error.

    PYTHONPATH=. .venv/bin/python experiments/memory_check/fit.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

import peftlab.memory.estimate as estimate_module
from peftlab.memory.cli import build_estimate, parse_overrides

RESULTS = Path(__file__).resolve().parents[2] / "results" / "memory" / "estimate_vs_measured.json"


def terms(command: str) -> tuple[float, float]:
    """(tensor bytes training adds + cpu runtime, heap activations) of one row's configuration.

    Estimated with a unit slack and no base, so that the slack part is the heap activations.
    """
    estimate_module.HEAP_SLACK_BASE, estimate_module.CPU_HEAP_SLACK = 0, 1.0
    e = build_estimate(parse_overrides(command.split()[2:-1]), device_hint="cpu")  # peftlab estimate ... --measure
    return e.training_bytes - e.cpu_heap_slack, e.cpu_heap_slack


def main() -> int:
    rows = json.loads(RESULTS.read_text())
    calibration = [r for r in rows if r["role"] == "calibration"]
    tensors, base = np.array([terms(r["command"]) for r in calibration]).T
    measured = np.array([r["measured_bytes"] for r in calibration], dtype=float)
    design = np.stack([np.ones_like(base), base], axis=1) / measured[:, None]
    (constant, slope), *_ = np.linalg.lstsq(design, (measured - tensors) / measured, rcond=None)
    print(f"HEAP_SLACK_BASE = {constant / 2**20:.0f} * MiB, CPU_HEAP_SLACK = {slope:.2f}")
    for r, t, b, m in zip(calibration, tensors, base, measured):
        print(f"{r['model']:>13} {r['method']:>5} {r['batch']:>3} x {r['length']:<3} "
              f"{100 * ((t + constant + slope * b) / m - 1):+6.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
