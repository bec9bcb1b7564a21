#!/usr/bin/env bash
# Study 2: which weights to adapt at a fixed budget (LoRA Table 5) and which rank (Table 6), smollm2-135m
# + synthetic sums, 3 seeds (conf/experiment/targets_and_rank.yaml).
set -euo pipefail
cd "$(dirname "$0")/../.."
JOBS=${JOBS:-$(nproc)}
train() { .venv/bin/peftlab train -m +experiment=targets_and_rank hydra/launcher=joblib hydra.launcher.n_jobs="$JOBS" "$@"; }
# the base model, once (the sweeps set eval_before=false): one step on {q, v}, evaluated before it
.venv/bin/peftlab train +experiment=targets_and_rank trainer.eval_before=true trainer.max_steps=1 \
  "method.targets=[q,v]" trainer.threads="$JOBS" hydra.run.dir=multirun/targets_and_rank_base "$@"
train "$@"                                                                    # targets at budget 921,600
train "method.targets=[q,v]" budget=null method.r=1,2,4,8,64 hydra.sweep.dir=multirun/targets_and_rank_r "$@"
.venv/bin/python -m peftlab.analysis.studies multirun/targets_and_rank --out results/targets_and_rank/targets \
  --title "smollm2-135m + sums: adapted weights at a fixed budget (921,600)"
.venv/bin/python -m peftlab.analysis.studies multirun/targets_and_rank_r --out results/targets_and_rank/rank \
  --title "smollm2-135m + sums: LoRA rank on q, v"
