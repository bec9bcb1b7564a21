"""Tokens per second of the generation task's evaluation decoding on smollm2-135m: batched (left-padded,
KV-cached, one ``generate`` call for all prompts) against a loop over one prompt at a time (also
KV-cached), on the first N test prompts of a generation task.

    .venv/bin/python benchmarks/bench_generation.py [--task asdiv] [--prompts 16] [--max-new-tokens 32]
                                                    [--threads 0] [--device auto]

Both produce the same texts (checked here, and in tests/tasks/test_generation.py on a tiny model);
tokens = the tokens of the generated texts (cut at ``task.stop``), the same count for both. A row of the
batch that has finished (eos / stop string) keeps being padded until the whole batch ends: the ratio
includes that waste. The load average printed first says how busy the machine was.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from peftlab.config import compose, validate
from peftlab.models.loading import load_model
from peftlab.tasks import build_task
from peftlab.training.trainer import pick_device, set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="asdiv")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores, torch threads {threads}")
    cfg = validate(compose(["model=smollm2-135m", f"task={args.task}", f"task.max_new_tokens={args.max_new_tokens}",
                            f"task.max_eval_examples={args.prompts}"]))
    device = pick_device(args.device)
    model, tokenizer, arch = load_model(cfg.model, cfg.task.type)
    model.to(device).eval()
    task = build_task(cfg.task, tokenizer, arch)
    examples = task.encoded["test"][: args.prompts]

    def decode(batch_examples) -> tuple[list[str], float]:
        batch = task.collate(batch_examples)
        ids, mask = batch["prompt_ids"].to(device), batch["prompt_mask"].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            texts = task.generate(model, ids, mask)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return texts, time.perf_counter() - start

    decode(examples[:2])  # warm-up
    batched, batched_s = decode(examples)
    single, single_s = [], 0.0
    for example in examples:
        texts, seconds = decode([example])
        single += texts
        single_s += seconds
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in batched)
    same = sum(a == b for a, b in zip(batched, single))
    print(f"task {args.task}, {len(examples)} prompts, max_new_tokens {args.max_new_tokens}, {device.type}: "
          f"{tokens} generated tokens; {same}/{len(examples)} texts identical batched vs one at a time")
    print(f"batched (1 call of {len(examples)})   {batched_s:8.2f} s  {tokens / batched_s:8.1f} tokens/s")
    print(f"one prompt at a time ({len(examples)} calls) {single_s:8.2f} s  {tokens / single_s:8.1f} tokens/s")
    print(f"ratio batched / one at a time: {single_s / batched_s:.2f}x tokens/s")


if __name__ == "__main__":
    main()
