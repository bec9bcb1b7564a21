#!/usr/bin/env bash
# Study 4: spectra of what LoRA learns (LoRA paper section 7 in miniature) on minilm + sentiment.
# Trains LoRA r=8 and r=64 x 3 seeds (conf/experiment/spectra.yaml), then analyzes them together with
# the full fine-tuning runs of experiments/method_comparison (run that study first).
set -euo pipefail
cd "$(dirname "$0")/../.."
JOBS=${JOBS:-$(nproc)}
SWEEP=multirun/spectra; FULL=multirun/method_comparison; OUT=results/spectra
.venv/bin/peftlab train -m +experiment=spectra hydra/launcher=joblib hydra.launcher.n_jobs="$JOBS" "$@"
analyze() { .venv/bin/peftlab analyze "$@"; }
# subspace similarity phi(A_r8, A_r64) (LoRA Fig. 3) and across seeds (Fig. 4), amplification (Table 7)
analyze "$SWEEP/method.r=8,seed=0" --compare "$SWEEP/method.r=64,seed=0" --out "$OUT/r8_vs_r64" --max-heatmaps 4
analyze "$SWEEP/method.r=8,seed=0" --compare "$SWEEP/method.r=8,seed=1" --out "$OUT/r8_seed0_vs_seed1" --max-heatmaps 4
analyze "$SWEEP/method.r=64,seed=0" --compare "$SWEEP/method.r=64,seed=1" --out "$OUT/r64_seed0_vs_seed1" --max-heatmaps 4
# effective rank of full fine-tuning's delta W next to LoRA's (the same q, v matrices are compared)
for seed in 0 1 2; do
  analyze "$FULL/method=full,seed=$seed" --out "$OUT/full_s$seed" --no-amplification --max-heatmaps 0
  analyze "$SWEEP/method.r=8,seed=$seed" --out "$OUT/lora_r8_s$seed" --max-heatmaps 0
  analyze "$SWEEP/method.r=64,seed=$seed" --out "$OUT/lora_r64_s$seed" --max-heatmaps 0
done
.venv/bin/python experiments/spectra/summarize.py "$OUT"
.venv/bin/python -m peftlab.analysis.studies "$SWEEP" --out "$OUT" --title "minilm + sentiment: LoRA r=8 vs r=64"
