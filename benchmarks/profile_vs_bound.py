"""Where does a method's step time go beyond the frozen-base bound? Op-by-op CPU profile.

    .venv/bin/python benchmarks/profile_vs_bound.py [--model smollm2-135m] [--method lora] [--steps 3]

Builds the bound and the method exactly as ``bench_methods.py`` does (same batch, shared frozen
weights), warms both up, profiles ``--steps`` steps of each with torch.profiler and prints the ops
whose self CPU time per step differs most (method − bound), with both totals.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import bench_methods as bm  # noqa: E402


def self_ms_per_step(variant, steps: int) -> collections.Counter:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            variant.step(i)
    return collections.Counter({e.key: e.self_cpu_time_total / steps / 1e3 for e in prof.key_averages()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(bm.BATCH))
    parser.add_argument("--method", default="lora", choices=list(bm.METHODS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (as bench_methods.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    arch, batch, copier = bm.prepare(args.model, torch.device("cpu"))
    bound = bm.build_bound(copier, batch)
    method = bm.build_peftlab(args.method, copier, arch, batch, 100, args.model)
    for variant in (bound, method, bound, method):  # warm-up: first-step allocations, optimizer state
        variant.step(0)
    base, tuned = self_ms_per_step(bound, args.steps), self_ms_per_step(method, args.steps)
    print(f"{args.model} {args.method}: {sum(tuned.values()):.0f} ms/step vs bound {sum(base.values()):.0f} "
          f"(self CPU time, {torch.get_num_threads()} threads, {args.steps} profiled steps each)")
    print(f"{'op':48s} {'bound':>8s} {args.method:>8s} {'diff':>8s}")
    for key in sorted(set(base) | set(tuned), key=lambda k: -(tuned[k] - base[k]))[:args.top]:
        print(f"{key[:48]:48s} {base[key]:8.1f} {tuned[key]:8.1f} {tuned[key] - base[key]:+8.1f}")


if __name__ == "__main__":
    main()
