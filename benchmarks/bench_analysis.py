"""Time the spectral analysis of every ΔW of a 7B-shaped LoRA adapter, against full SVDs.

Shapes are Llama-2-7B's: 32 layers × (q, k, v, o: 4096×4096; gate, up: 11008×4096;
down: 4096×11008) = 224 updates ΔW = B A with r = 16 and random fp32 factors.

    factored   analyze_layers(): σ from QR of B and Aᵀ + SVD of the r×r core, then every
               rank measure, for all 224 matrices (target: under 10 s in all)
    dense      singular_values(B @ A): the full SVD the factored path avoids, timed on one
               square and one rectangular matrix, projected to all 224

    .venv/bin/python benchmarks/bench_analysis.py [--layers 32] [--rank 16] [--threads 1]

Threads: the factored path is a sequence of tiny problems (QR of an out×16 panel)
with nothing to parallelize, so one thread is its natural setting; on a CPU shared
with other jobs, 2+ OpenMP threads make each QR wait on a descheduled peer and run
10-20× slower. The load average printed first says how busy the machine was.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from peftlab.analysis import analyze_layers, singular_values

HIDDEN, INTERMEDIATE = 4096, 11008
MODULES = {  # name within the block -> (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
DENSE_SAMPLES = ("self_attn.q_proj", "mlp.up_proj")  # one 4096×4096, one 11008×4096


def random_adapter(layers: int, rank: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (s·B (out, r), A (r, in)), fp32, as a trained adapter stores them."""
    generator = torch.Generator().manual_seed(seed)
    adapter = {}
    for layer in range(layers):
        for kind, (out_f, in_f) in MODULES.items():
            b = torch.randn(out_f, rank, generator=generator) * 0.01
            a = torch.randn(rank, in_f, generator=generator) / in_f**0.5
            adapter[f"model.layers.{layer}.{kind}"] = (b, a)
    return adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the module docstring)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-dense", action="store_true", help="time the factored path only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs "
          f"({platform.machine()}), load average {load}")

    adapter = random_adapter(args.layers, args.rank, args.seed)
    counts = {kind: args.layers for kind in MODULES}
    print(f"adapter: {len(adapter)} matrices (Llama-2-7B shapes), r={args.rank}, fp32 factors")

    start = time.perf_counter()
    spectra, ranks, summary = analyze_layers(adapter.items(), run="bench", method="lora", progress=False)
    factored_total = time.perf_counter() - start
    per_matrix = factored_total / len(adapter)
    verdict = "PASS" if factored_total < 10.0 else "FAIL"
    print(f"factored: {factored_total:.3f} s for all {len(adapter)} matrices (spectra + ranks), "
          f"{per_matrix * 1e3:.2f} ms per matrix  [target < 10 s: {verdict}]")
    print(f"          {len(spectra)} singular values; mean effective rank {summary['effective_rank']['mean']:.3f}")
    if args.skip_dense:
        return

    projected = 0.0
    for kind in DENSE_SAMPLES:
        name = f"model.layers.0.{kind}"
        b, a = adapter[name]
        dense = b @ a  # (out, in) fp32, as delta_weight() returns it
        start = time.perf_counter()
        sigma = singular_values(dense)  # full SVD in fp64 (the library's dense default)
        elapsed = time.perf_counter() - start
        top = singular_values((b, a))
        error = float(np.max(np.abs(sigma[: args.rank] - top)) / top[0])
        shape = "×".join(map(str, dense.shape))
        same_shape = [k for k, s in MODULES.items() if s == MODULES[kind]]
        projected += elapsed * sum(counts[k] for k in same_shape)
        print(f"dense:    full SVD of one {shape} ΔW: {elapsed:.2f} s = {elapsed / per_matrix:,.0f}× the factored "
              f"per-matrix time (top-{args.rank} σ agree to {error:.1e} relative)")
    print(f"projected full-SVD total for all {len(adapter)} matrices: {projected:,.0f} s "
          f"= {projected / factored_total:,.0f}× the factored total")


if __name__ == "__main__":
    main()
