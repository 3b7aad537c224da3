#!/usr/bin/env bash
# The whole flow on the built-in default: download SmolLM2-135M-Instruct, prepare Alpaca in its chat format,
# fine-tune a LoRA adapter with the shipped CPU recipe, and answer a prompt with and without the adapter.
#   bash scripts/quickstart.sh                 # full recipe (about 15 minutes on 2 CPU cores)
#   STEPS=20 bash scripts/quickstart.sh        # a short run, to see every stage work
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=checkpoints/smollm2-135m-instruct
DATA_FILE=${DATA_FILE:-../shared/data/alpaca_5000.json}  # a local Alpaca JSON; without it the cleaned Alpaca is downloaded
OUT=out/lora/quickstart-$(date +%Y%m%d-%H%M%S)  # a new run directory each time

[ -f "$CKPT/model_config.yaml" ] || download smollm2-135m-instruct --out "$CKPT"
source_args=()
[ -f "$DATA_FILE" ] && source_args=(--data_file "$DATA_FILE")
prepare-alpaca --checkpoint_dir "$CKPT" "${source_args[@]}" --destination data/alpaca-smollm2 \
    --template chatml --max_seq_length 256 --val_size 200 --overwrite
overrides=()
[ -n "${STEPS:-}" ] && overrides=(--train.max_steps "$STEPS" --train.save_interval "$STEPS" --eval.interval "$STEPS")
finetune-lora --config configs/smollm2-135m-alpaca.yaml --out_dir "$OUT" "${overrides[@]}"
PROMPT="Give three tips for staying healthy."
echo "--- base model"
generate --checkpoint_dir "$CKPT" --prompt "$PROMPT" --temperature 0 --max_new_tokens 120
echo "--- with the adapter"
generate --checkpoint_dir "$CKPT" --lora_path "$OUT/final" --prompt "$PROMPT" --temperature 0 --max_new_tokens 120
