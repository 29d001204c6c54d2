#!/usr/bin/env bash
# The runs of one short GPU lease for reverie's own models: two text-to-image MMDiT recipes (configs/shapes_mmdit.toml,
# the architecture that won on the CPU) and the text-to-video spacetime model (configs/moving_shapes_video.toml)
# side by side on the GPU (each step is small and host-bound, so three runs cost each other little). Each text-to-
# image recipe is scored by `reverie eval` on held-out captions at the quality bar's setting (dpmpp_2m, 20 steps,
# guidance 7.5), on training captions, and on the README's first prompt at seeds 0-9; the video model by the
# moving-shapes clip analyzer on held-out captions. Every run ends on the clock (its data pass and latent cache
# included), each one's end fixed relative to the end of the budget.
#
#   OUT=out/gpu BUDGET_S=400 bash scripts/gpu_shapes.sh      # give the command BUDGET_S + 150 s or so
#
# Before the budget starts: the UNet's and the MMDiT's training step images/s at batch 256 and at $BATCH (bench/train_step.py,
# GPU only) and a 2-step smoke run of the tasks (~60 s). A_ARGS / B_ARGS: each recipe's overrides of
# configs/shapes_mmdit.toml; BATCH its batch; EVAL_N captions scored per recipe; VIDEO=0 leaves the video run out,
# VIDEO_SIZE / VIDEO_BATCH / VIDEO_EVAL_N size it. They all shrink it for a CPU check:
#
#   BUDGET_S=150 SHAPES_SIZE=64 BATCH=8 EVAL_N=4 VIDEO_SIZE=16 VIDEO_BATCH=4 VIDEO_EVAL_N=2 bash scripts/gpu_shapes.sh
set -u
. scripts/gpu_lib.sh
BATCH=${BATCH:-1024}
EVAL_N=${EVAL_N:-200}
VIDEO=${VIDEO:-1}
VIDEO_SIZE=${VIDEO_SIZE:-8000}
VIDEO_BATCH=${VIDEO_BATCH:-64}
VIDEO_EVAL_N=${VIDEO_EVAL_N:-100}
FIRST_PROMPT="a red circle above a blue square"
# A: every caption full; B: 30% of one-object captions name one attribute ("a red shape", "a circle")
A_ARGS=${A_ARGS:---optim.lr=5e-4 --optim.warmup_steps=300}
B_ARGS=${B_ARGS:---optim.lr=5e-4 --optim.warmup_steps=300 --data.options.partial=0.3}

device_info
DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
if [ "$DEVICE" = cuda ]; then
  for b in 256 "$BATCH"; do
    "$PY" bench/train_step.py --device cuda --amp bf16 --batch "$b" --images 4096 --steps 10
  done
fi
smoke() {
  local s=$RUNS/smoke tiny=(--train.steps=2 --log.sample_count=2 --log.sample_steps=2)
  rm -rf "$s"
  train configs/shapes_mmdit.toml --model.vae_path=shapes --model.mmdit_preset=tiny --train.output_dir="$s/mmdit" \
    --data.options.size=16 --train.batch_size=4 "${tiny[@]}" --log.sample_prompts='["a red circle"]' &&
  "$PY" -m reverie.cli eval --model "$s/mmdit/model" --n 2 --steps 2 --device "$DEVICE" &&
  if [ "$VIDEO" = 1 ]; then
    train configs/moving_shapes_video.toml --model.video_preset=tiny --model.text_hidden_size=32 \
      --train.output_dir="$s/video" --data.options.size=4 --train.batch_size=2 "${tiny[@]}" \
      --log.sample_prompts='["a red circle falling"]' &&
    "$PY" -m reverie.cli eval --model "$s/video/model" --data moving_shapes --n 1 --steps 2 --device "$DEVICE"
  fi
}
if ! smoke > "$LOGS/smoke.log" 2>&1; then
  tail -40 "$LOGS/smoke.log"; echo "SMOKE FAILED"; exit 1
fi
START=$(date +%s) && END=$(( START + BUDGET_S ))  # the training budget starts after the benchmark and smoke run
echo "benchmark and smoke run took $(( START - T0 )) s"

ship() {  # ship NAME MODEL: the model into $OUT at once, fp16 in 15 MB parts, without its VAE (the shipped one)
  tar cf - --exclude="$2/vae" "$2" | split -b 15M - "$OUT/$1.tar.part-"
}
mmdit() {  # mmdit NAME ARGS...: one recipe, ending 90 s before the end, then its scores
  local name=$1; shift
  train configs/shapes_mmdit.toml --model.vae_path=shapes --train.output_dir="$RUNS/$name" \
    --data.options.size="$SHAPES_SIZE" --train.batch_size="$BATCH" --log.every=100 --log.sample_every=0 \
    --train.export_dtype=float16 "$@" $(on_the_clock 90) || return
  ship "$name" "$RUNS/$name/model"
  local ev=("$PY" -m reverie.cli eval --model "$RUNS/$name/model" --device "$DEVICE")
  "${ev[@]}" --n "$EVAL_N" > "$LOGS/eval_$name.txt" &&
  "${ev[@]}" --n "$EVAL_N" --split train > "$LOGS/eval_${name}_train.txt" &&
  "${ev[@]}" --prompt "$FIRST_PROMPT" --plot "$LOGS/first_$name.png" > "$LOGS/first_$name.txt"
}
video() {  # the video model, ending 60 s before the end, then its held-out score and a grid of clips
  train configs/moving_shapes_video.toml --train.output_dir="$RUNS/video" --data.options.size="$VIDEO_SIZE" \
    --train.batch_size="$VIDEO_BATCH" --optim.warmup_steps=300 --log.every=100 --log.sample_every=0 \
    --train.export_dtype=float16 $(on_the_clock 60) &&
  ship video "$RUNS/video/model" &&
  "$PY" -m reverie.cli eval --model "$RUNS/video/model" --data moving_shapes --n "$VIDEO_EVAL_N" --guidance 5 \
    --device "$DEVICE" --plot "$LOGS/video_grid.png" > "$LOGS/eval_video.txt"
}
# shellcheck disable=SC2086
mmdit shapes_a $A_ARGS > "$LOGS/shapes_a.log" 2>&1 & a_pid=$!
# shellcheck disable=SC2086
mmdit shapes_b $B_ARGS > "$LOGS/shapes_b.log" 2>&1 & b_pid=$!
v_pid=
[ "$VIDEO" = 1 ] && { video > "$LOGS/video.log" 2>&1 & v_pid=$!; }
wait $a_pid; a_rc=$?
wait $b_pid; b_rc=$?
v_rc=-; [ -n "$v_pid" ] && { wait "$v_pid"; v_rc=$?; }
echo "recipe A rc $a_rc, recipe B rc $b_rc, video rc $v_rc, $(( $(date +%s) - START )) s into the budget"

score() {  # one- plus two-object fully-correct fractions from an eval report (-1 if missing)
  awk '$1 == "one/fully_correct" || $1 == "two/fully_correct" { s += $2; n++ } END { print (n == 2 ? s : -1) }' \
    "$LOGS/eval_$1.txt" 2>/dev/null || echo -1
}
echo "held-out score (one + two fully correct): A $(score shapes_a), B $(score shapes_b)"
for f in "$LOGS"/eval_*.txt "$LOGS"/first_*.txt; do echo "== $f"; cat "$f"; done

# what comes back: both recipes' models and the video model, each packed as its training ended (ship), and the
# logs, evals and sample grids
tail -n 3 "$LOGS"/shapes_a.log "$LOGS"/shapes_b.log "$LOGS"/video.log 2>/dev/null
pack_logs
