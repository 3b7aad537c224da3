#!/usr/bin/env bash
# The main job end to end, measured: download SmolLM2-135M-Instruct, prepare the built-in `extract` task, score
# the base model on its held-out split, fine-tune a LoRA adapter with the shipped CPU recipe, score again (the
# before/after table), merge the adapter, and answer one held-out example with the merged model.
#   bash scripts/quickstart.sh                 # the full recipe (the README gives its time on 2 CPU cores)
#   STEPS=4 bash scripts/quickstart.sh         # a short run, to see every stage work
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=checkpoints/smollm2-135m-instruct
DATA=data/task-extract
RUN=quickstart-$(date +%Y%m%d-%H%M%S)  # a new run directory each time
OUT=out/lora/$RUN
LIMIT=${LIMIT:-200}  # held-out examples to score

echo "== 1. download the model"
[ -f "$CKPT/model_config.yaml" ] || download smollm2-135m-instruct --out "$CKPT"
echo "== 2. prepare the built-in task (3,000 training and 200 held-out examples)"
prepare-task extract --checkpoint_dir "$CKPT" --destination "$DATA" --overwrite
mkdir -p "$OUT"
echo "== 3. the base model on the held-out split"
evaluate --checkpoint_dir "$CKPT" --data "$DATA" --limit "$LIMIT" --batch_size 25 --max_new_tokens 24 \
    --out "$OUT/eval-base.json"
echo "== 4. fine-tune (configs/smollm2-135m-task.yaml)"
overrides=()
[ -n "${STEPS:-}" ] && overrides=(--train.max_steps "$STEPS" --train.save_interval "$STEPS" --eval.interval "$STEPS")
finetune-lora --config configs/smollm2-135m-task.yaml --out_dir "$OUT" "${overrides[@]}"
echo "== 5. before / after on the same held-out examples (predictions in $OUT/eval.json, loss curve in $OUT/loss.png)"
evaluate --checkpoint_dir "$CKPT" --lora_path "$OUT/final" --data "$DATA" --limit "$LIMIT" --batch_size 25 \
    --max_new_tokens 24 --baseline "$OUT/eval-base.json" --out "$OUT/eval.json"
echo "== 6. merge the adapter and answer one held-out example with the merged model"
merge-lora --checkpoint_dir "$CKPT" --lora_path "$OUT/final" --out "checkpoints/$RUN-merged"
# The first held-out record (make_task draws each split from its own stream: the same one prepare-task wrote).
example() { python -c "from lit_lora.data.tasks import make_task; print(make_task('extract', 1, 1)['val'][0]['$1'])"; }
echo "question: $(example instruction)"
echo "          $(example input)"
echo "expected: $(example output)"
echo "answer:"
generate --checkpoint_dir "checkpoints/$RUN-merged" --prompt "$(example instruction)" --input "$(example input)" \
    --template chatml --temperature 0 --max_new_tokens 24
