#!/usr/bin/env bash
# Issue 4 check, scaled down for a 2-core CPU: does full fine-tuning forget more than low-rank LoRA?
# smollm2-135m + sentiment (verbalized prompt), 12 steps of batch 4 × 64 tokens, one seed, the
# same data order and schedule for both; forgetting probes: LM loss on Hamlet (english), HumanEval
# prompts (code) and chatterbot dialogues (chat), before and after (result.json["forgetting"]).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-results/forgetting_smollm2}
COMMON=(model=smollm2-135m task=sentiment trainer.max_steps=12 trainer.batch_size=4 task.max_length=64
        task.max_eval_examples=100 trainer.progress=false trainer.save_adapter=false)
.venv/bin/peftlab train "${COMMON[@]}" method=full optim.lr=5e-5 hydra.run.dir="$OUT/full" "$@"
.venv/bin/peftlab train "${COMMON[@]}" method=lora method.r=4 method.alpha=8 optim.lr=1e-3 hydra.run.dir="$OUT/lora_r4" "$@"
