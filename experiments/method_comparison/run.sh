#!/usr/bin/env bash
# Study 1: every method on all-MiniLM-L6-v2 + Rotten Tomatoes, 3 seeds (conf/experiment/method_comparison.yaml).
# Re-running skips finished jobs. JOBS parallel jobs (one thread each; default: the machine's cores).
set -euo pipefail
cd "$(dirname "$0")/../.."
JOBS=${JOBS:-$(nproc)}
.venv/bin/peftlab train -m +experiment=method_comparison hydra/launcher=joblib hydra.launcher.n_jobs="$JOBS" "$@"
.venv/bin/python -m peftlab.analysis.studies multirun/method_comparison --out results/method_comparison \
  --title "minilm + sentiment: test accuracy vs trainable parameters (3 seeds)"
