#!/usr/bin/env bash
# Every method on a shipped model + sentiment for a few hundred steps, each at a learning rate that
# suits it on that model (found in the short runs, results/method_smoke/README.md), evaluated on the
# whole validation (500) and test (1000) splits, then tested against the base model example by example
# (peftlab paired: McNemar p and the paired 95% interval of Δ accuracy).
# Usage: experiments/method_smoke/tuned.sh [smollm2-135m|minilm] [steps] [extra overrides...]
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:-smollm2-135m}; STEPS=${2:-200}; shift $(( $# >= 2 ? 2 : $# ))
OUT=${OUT:-results/method_smoke/$MODEL-${STEPS}steps}
declare -A LR EXTRA
if [[ $MODEL == minilm ]]; then  # batch 16, as study 1; the new classifier head trains at 3e-3 in every run
  LR=([full]=5e-5 [bitfit]=2e-3 [lora]=1e-3 [rslora]=1e-3 [dora]=1e-3 [loraplus]=5e-4 [adalora]=5e-2 [loha]=1e-2
      [lokr]=1e-2 [qlora]=1e-3 [vera]=5e-2 [ia3]=1e-2 [adapter]=1e-3 [prefix]=1e-3 [prompt]=3e-2)
  BATCH=16; HEAD=(optim.head_lr=3e-3); METHODS=${METHODS:-"lora full bitfit rslora dora loraplus adalora loha lokr qlora vera ia3 adapter prefix prompt"}
else                             # batch 8; the causal LM keeps its own head (label words)
  LR=([full]=5e-5 [lora]=1e-3 [rslora]=1e-3 [dora]=1e-3 [loraplus]=5e-4 [adalora]=1e-2 [loha]=1e-2 [lokr]=3e-3
      [qlora]=1e-3 [vera]=5e-2 [ia3]=1e-2 [adapter]=1e-3 [prefix]=1e-3 [prompt]=3e-2)
  EXTRA=([vera]="method.r=128")
  BATCH=8; HEAD=(); METHODS=${METHODS:-"lora rslora dora loraplus adalora loha lokr qlora vera ia3 adapter prefix prompt full"}
fi
FIRST=${METHODS%% *}
for method in $METHODS; do
  # the base model is evaluated once, before the first method trains (same weights, same examples for all)
  [[ $method == "$FIRST" ]] && before=true || before=false
  .venv/bin/peftlab train model="$MODEL" task=sentiment method="$method" optim.lr="${LR[$method]}" "${HEAD[@]}" \
    trainer.max_steps="$STEPS" trainer.batch_size="$BATCH" task.probes=[] trainer.eval_before="$before" \
    trainer.progress=false trainer.save_adapter=false ${EXTRA[$method]:-} hydra.run.dir="$OUT/$method" "$@" \
    || echo "FAILED: $method"
done
.venv/bin/peftlab paired "$OUT"/*/ --base "$OUT/$FIRST" --out "$OUT/paired.md"
.venv/bin/peftlab table "$OUT" --by method.name --out "$OUT/table.md"
