#!/usr/bin/env bash
# Every method on smollm2-135m + sentiment for a few hundred steps, each at a learning rate that suits
# it on this model (found in the 40-step runs, results/method_smoke/README.md), evaluated on the whole
# validation (500) and test (1000) splits, then tested against the base model example by example.
# Usage: experiments/method_smoke/smollm2.sh [steps] [extra overrides...]     (default 200 steps)
set -euo pipefail
cd "$(dirname "$0")/../.."
STEPS=${1:-200}; shift $(( $# >= 1 ? 1 : 0 ))
OUT=${OUT:-results/method_smoke/smollm2-135m-${STEPS}steps}
declare -A LR=(
  [full]=5e-5 [lora]=1e-3 [rslora]=1e-3 [dora]=1e-3 [loraplus]=5e-4 [adalora]=1e-2 [loha]=1e-2 [lokr]=3e-3
  [qlora]=1e-3 [vera]=5e-2 [ia3]=1e-2 [adapter]=1e-3 [prefix]=1e-3 [prompt]=3e-2
)
declare -A EXTRA=([vera]="method.r=128")
METHODS=${METHODS:-"lora rslora dora loraplus adalora loha lokr qlora vera ia3 adapter prefix prompt full"}
for method in $METHODS; do
  # the base model is evaluated once, before the first method trains (same weights, same examples for all)
  [[ $method == "${METHODS%% *}" ]] && before=true || before=false
  .venv/bin/peftlab train model=smollm2-135m task=sentiment method="$method" optim.lr="${LR[$method]}" \
    trainer.max_steps="$STEPS" trainer.batch_size=8 task.probes=[] trainer.eval_before="$before" \
    trainer.progress=false trainer.save_adapter=false ${EXTRA[$method]:-} hydra.run.dir="$OUT/$method" "$@" \
    || echo "FAILED: $method"
done
.venv/bin/peftlab paired "$OUT"/*/ --base "$OUT/${METHODS%% *}" --out "$OUT/paired.md"
.venv/bin/peftlab table "$OUT" --by method.name --out "$OUT/table.md"
