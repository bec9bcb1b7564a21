"""Where does CPU RSS growth during training come from? One configuration, phase by phase.

Runs a copy of the trainer's step (same model set-up, optimizer, loss; no scheduler or logging)
for a few steps and prints JSON: RSS, its high-water mark and file-backed RSS (code pages) after
every forward / backward / optimizer step, relative to the start of training as ``peftlab
estimate --measure`` takes it (PeakMemory.start), the padded batch shapes and seconds per step;
with ``--profile`` the exact peak of tensor bytes (torch profiler) instead. Run it with glibc's
MALLOC_* variables to see what the allocator adds (results/memory/README.md).

    PYTHONPATH=. .venv/bin/python experiments/memory_check/probe.py model=minilm method=lora [--profile]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from peftlab.config import compose, validate
from peftlab.memory.measure import PeakMemory
from peftlab.training.optim import build_optimizer
from peftlab.tasks.base import to_device
from peftlab.training.trainer import Trainer

MiB = 2**20


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def tensor_peak(events) -> int:
    """Peak of live tensor bytes from the profiler's memory events (relative to the start)."""
    current = peak = 0
    for event in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="report the exact tensor peak (profiler)")
    args = parser.parse_args()
    cfg = validate(compose(args.overrides + [f"trainer.max_steps={args.steps}", "trainer.eval_before=false",
                                             "trainer.save_adapter=false", "trainer.progress=false", "logger=none"]))
    trainer = Trainer(cfg, Path(tempfile.mkdtemp(prefix="peftlab-probe-")))
    trainer.setup()
    trainer.apply_method()
    groups = trainer.method.param_groups(trainer.model, cfg.optim.lr, cfg.optim.weight_decay)
    optimizer = build_optimizer(cfg.optim, groups, list(trainer.head.values()))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    trainer.model.train()
    stream = trainer.batches()
    batches = [to_device(next(stream)[1], trainer.device) for _ in range(args.steps)]
    PeakMemory(trainer.device).start(resident=[*trainer.model.parameters(), *trainer.model.buffers()])
    rss0, file0 = status("VmRSS"), status("RssFile")  # file: code pages of libraries, paged in on first use
    phases, seconds = [], []

    def mark(step: int, phase: str) -> None:
        phases.append({"step": step, "phase": phase, "rss_MiB": round((status("VmRSS") - rss0) / MiB, 1),
                       "hwm_MiB": round((status("VmHWM") - rss0) / MiB, 1),
                       "file_MiB": round((status("RssFile") - file0) / MiB, 1)})

    def steps() -> None:
        for step, batch in enumerate(batches):
            start = time.perf_counter()
            with trainer.autocast():
                loss = trainer.task.loss(trainer.model, batch)
            mark(step, "forward")
            loss.backward()
            del loss
            mark(step, "backward")
            torch.nn.utils.clip_grad_norm_(params, float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            mark(step, "optimizer")
            seconds.append(time.perf_counter() - start)

    out = {"overrides": args.overrides, "shapes": [list(b["input_ids"].shape) for b in batches],
           "rss0_MiB": round(rss0 / MiB, 1)}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            steps()
        out["tensor_peak_MiB"] = round(tensor_peak(prof.profiler.kineto_results.events()) / MiB, 1)
    else:
        steps()
        out["phases"] = phases
        out["step_s"] = [round(t, 3) for t in seconds]
        out["rss_growth_peak_MiB"] = max(p["hwm_MiB"] for p in phases)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
