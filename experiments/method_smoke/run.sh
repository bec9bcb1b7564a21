#!/usr/bin/env bash
# Every method, end to end, through the one trainer on a real model + task (issue 3 check).
# Usage: experiments/method_smoke/run.sh [minilm|smollm2-135m] [steps] [extra overrides...]
# Same data, split, seed, schedule, steps and head learning rate for every method; only the
# method's own learning rate differs (each at a typical value from its paper / peft examples).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:-minilm}; STEPS=${2:-200}; shift $(( $# >= 2 ? 2 : $# ))
OUT=${OUT:-results/method_smoke/$MODEL}
declare -A LR=(
  [full]=5e-5 [bitfit]=2e-3 [lora]=1e-3 [rslora]=1e-3 [dora]=1e-3 [loraplus]=5e-4 [adalora]=1e-3
  [loha]=1e-3 [lokr]=1e-3 [qlora]=1e-3 [vera]=1e-2 [ia3]=1e-2 [adapter]=1e-3 [prefix]=5e-3 [prompt]=3e-2
)
METHODS=${METHODS:-"full bitfit lora rslora dora loraplus adalora loha lokr qlora vera ia3 adapter prefix prompt"}
for method in $METHODS; do
  [[ $MODEL != minilm && $method == bitfit ]] && { echo "skip bitfit: $MODEL has no biases"; continue; }
  .venv/bin/peftlab train model="$MODEL" method="$method" optim.lr="${LR[$method]}" optim.head_lr=3e-3 \
    trainer.max_steps="$STEPS" trainer.progress=false trainer.save_adapter=false \
    hydra.run.dir="$OUT/$method" "$@" || echo "FAILED: $method"
done
