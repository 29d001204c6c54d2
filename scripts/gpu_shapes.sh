#!/usr/bin/env bash
# The shapes runs of one short GPU lease: two text-to-image recipes side by side on the GPU (the training step
# is host-bound, so the second run costs the first little), each scored by `reverie eval` on held-out captions
# at the quality bar's setting (dpmpp_2m, 20 steps, guidance 7.5), then a segmentation ControlNet trained
# against the better one. Every run ends on the clock, each stage's end fixed relative to the end of the budget.
#
#   OUT=out/gpu BUDGET_S=440 bash scripts/gpu_shapes.sh      # give the command BUDGET_S + 150 s or so
#
# Before the budget starts: the training step's time at batch 256 and at $BATCH (bench/train_step.py, GPU
# only, ~30 s) and a 2-step smoke run of the shapes tasks (~60 s). A_ARGS / B_ARGS: each recipe's overrides of
# configs/shapes_unet.toml; BATCH: the UNet's batch; EVAL_N: captions scored per recipe. SHAPES_SIZE,
# BUDGET_S, BATCH and EVAL_N shrink it for a CPU check:
#
#   BUDGET_S=60 SHAPES_SIZE=64 BATCH=8 EVAL_N=4 bash scripts/gpu_shapes.sh
set -u
. scripts/gpu_lib.sh
BATCH=${BATCH:-1024}
EVAL_N=${EVAL_N:-200}
# A: the shipped model trained on (its UNet, text encoder and tokenizer), 30% one-attribute captions.
A_ARGS=${A_ARGS:---model.unet_init=shapes --model.text_encoder_path=src/reverie/bundled/shapes --optim.lr=2e-4 --optim.warmup_steps=100 --data.options.partial=0.3}
# B: from scratch with a text encoder of no layers (token + position embeddings: no word sees another).
B_ARGS=${B_ARGS:---model.text_layers=0 --optim.lr=6e-4 --optim.warmup_steps=500}

device_info
DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
if [ "$DEVICE" = cuda ]; then
  for b in 256 "$BATCH"; do "$PY" bench/train_step.py --device cuda --amp bf16 --batch "$b" --steps 10 | head -4; done
fi
if ! smoke_shapes > "$LOGS/smoke.log" 2>&1; then
  tail -40 "$LOGS/smoke.log"; echo "SMOKE FAILED"; exit 1
fi
START=$(date +%s) && END=$(( START + BUDGET_S ))  # the training budget starts after the benchmark and smoke run
echo "benchmark and smoke run took $(( START - T0 )) s"

unet() {  # unet NAME ARGS...: one recipe, ending 110 s before the end, then its held-out score
  local name=$1; shift
  train configs/shapes_unet.toml --model.vae_path=shapes --train.output_dir="$RUNS/$name" \
    --data.options.size="$SHAPES_SIZE" --train.batch_size="$BATCH" --log.every=100 --log.sample_every=0 \
    --train.export_dtype=float16 "$@" $(on_the_clock 110) &&
  "$PY" -m reverie.cli eval --model "$RUNS/$name/model" --n "$EVAL_N" --device "$DEVICE" > "$LOGS/eval_$name.txt"
}
# shellcheck disable=SC2086
unet shapes_a $A_ARGS > "$LOGS/shapes_a.log" 2>&1 & a_pid=$!
# shellcheck disable=SC2086
unet shapes_b $B_ARGS > "$LOGS/shapes_b.log" 2>&1 & b_pid=$!
wait $a_pid; a_rc=$?
wait $b_pid; b_rc=$?
echo "recipe A rc $a_rc, recipe B rc $b_rc, $(( $(date +%s) - START )) s into the budget"

score() {  # one- plus two-object fully-correct fractions from an eval report (-1 if missing)
  awk '$1 == "one/fully_correct" || $1 == "two/fully_correct" { s += $2; n++ } END { print (n == 2 ? s : -1) }' \
    "$LOGS/eval_$1.txt" 2>/dev/null || echo -1
}
sa=$(score shapes_a) sb=$(score shapes_b)
best=shapes_a; awk -v a="$sa" -v b="$sb" 'BEGIN { exit !(b > a) }' && best=shapes_b
echo "held-out score (one + two fully correct): A $sa, B $sb -> $best"
for r in shapes_a shapes_b; do echo "== $r"; cat "$LOGS/eval_$r.txt" 2>/dev/null; done

if [ -d "$RUNS/$best/model" ]; then
  train configs/shapes_controlnet.toml --model.base_model="$RUNS/$best/model" \
    --train.output_dir="$RUNS/shapes_controlnet" --train.batch_size=$(( BATCH / 2 )) --optim.lr=2e-4 \
    --log.every=100 --log.sample_every=0 --train.export_dtype=float16 $(on_the_clock 20) \
    > "$LOGS/controlnet.log" 2>&1; echo "controlnet rc $?"
fi

# what comes back: the better recipe's model and the ControlNet (fp16, in 15 MB parts), logs, evals, samples
pack shapes "$RUNS/$best/model" "$RUNS/shapes_controlnet/model"
tail -n 3 "$LOGS"/shapes_a.log "$LOGS"/shapes_b.log "$LOGS"/controlnet.log 2>/dev/null
pack_logs
