#!/usr/bin/env bash
# Study 3: full fine-tuning vs LoRA r = 4, 16, 64 (all linear layers, alpha = 2r) on synthetic sums,
# smollm2-135m, 3 seeds (conf/experiment/learn_vs_forget.yaml). Learning: arithmetic test perplexity;
# forgetting: probe losses on English, code and chat.
set -euo pipefail
cd "$(dirname "$0")/../.."
JOBS=${JOBS:-$(nproc)}   # one job per core, one thread each (batch 16 x <=16 tokens fits twice in RAM)
train() { .venv/bin/peftlab train -m +experiment=learn_vs_forget hydra/launcher=joblib hydra.launcher.n_jobs="$JOBS" "$@"; }
train method=full "$@"                    # lr 2e-5 (study.lr.full)
train method=full optim.lr=1e-4 "$@"      # and 1e-4: 2e-5 barely moves the weights in 40 steps
for r in 4 16 64; do
  train method=lora "method.targets=[all-linear]" method.r=$r method.alpha=$((2 * r)) "$@"
done
.venv/bin/python -m peftlab.analysis.studies multirun/learn_vs_forget --out results/learn_vs_forget \
  --title "smollm2-135m + sums: test perplexity vs trainable parameters (3 seeds)"
