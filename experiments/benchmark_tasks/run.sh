#!/usr/bin/env bash
# The benchmark-task measurements of results/benchmark_tasks/README.md (CPU, 2 threads; ~1 hour here).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-results/benchmark_tasks}
run() {  # name, overrides...: one run, its result.json kept
  local name=$1; shift
  .venv/bin/peftlab train "$@" trainer.progress=false hydra.run.dir=runs/benchmark_tasks/$name
  mkdir -p "$OUT/$name" && cp runs/benchmark_tasks/$name/result.json "$OUT/$name/"
}
# BoolQ: base (fresh head / verbalizer) and LoRA-tuned, test = dev rows (all 3,270 on minilm; the first 300 on
# smollm2, whose evaluation at 192 tokens costs ~1 s per example here)
run boolq_minilm_lora model=minilm task=boolq method=lora model.pooling=mean optim.lr=1e-3 \
    trainer.max_steps=300 trainer.batch_size=16 trainer.eval_batch_size=64 task.max_length=256
run boolq_smollm2_lora model=smollm2-135m task=boolq method=lora optim.lr=2e-4 \
    trainer.max_steps=60 trainer.batch_size=8 trainer.eval_batch_size=16 task.max_length=192 task.max_eval_examples=300
# Multiple choice: smollm2-135m base on the first 200 examples of each shipped set (all of them: drop --limit,
# about 40 minutes here)
PYTHONPATH=. .venv/bin/python experiments/benchmark_tasks/base_multiple_choice.py --model smollm2-135m --limit 200
