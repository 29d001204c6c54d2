#!/usr/bin/env bash
# The training runs of one short GPU lease (one H100, about 9 minutes), as they were run to make the shipped
# models. Two chains share the GPU:
#
#   shapes: VAE (fine-tune of the bundled one) -> text-to-image UNet + text encoder (from scratch, 50,000 images)
#           -> segmentation ControlNet against that UNet
#   emoji:  VAE (fine-tune of configs/emoji_vae.json's output) -> text-to-image UNet + text encoder (from scratch)
#
# Each run ends on the clock (train.time_limit_minutes, constant LR after warmup, EMA weights exported), so the
# chains fit the lease whatever the GPU's speed; each stage's end is fixed relative to the end of the budget.
# A 2-step smoke run of every task on the device comes first (about 80 s on the H100, outside BUDGET_S), so a
# device-only failure costs seconds; give the command BUDGET_S + 150 s or so.
#
#   OUT=out/gpu BUDGET_S=440 bash scripts/gpu_train.sh        # writes runs/gpu/*, then packs the models into $OUT
#
# Inputs: the emoji font and names (EMOJI_FONT, EMOJI_NAMES; Debian's by default) and the emoji VAE to start
# from (EMOJI_VAE, default runs/emoji_vae). SHAPES_SIZE (50000) and BUDGET_S (seconds) shrink it for a CPU check.
set -u
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
PY=${PYTHON:-python3}
OUT=${OUT:-out/gpu}
RUNS=${RUNS:-runs/gpu}
BUDGET_S=${BUDGET_S:-440}
SHAPES_SIZE=${SHAPES_SIZE:-50000}
FONT=${EMOJI_FONT:-/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf}
NAMES=${EMOJI_NAMES:-/usr/share/unicode/emoji/emoji-test.txt}
EMOJI_VAE=${EMOJI_VAE:-runs/emoji_vae}
LOGS=$RUNS/logs
mkdir -p "$OUT" "$LOGS"
T0=$(date +%s)

train() { "$PY" -m reverie.train.cli "$@" --log.progress=false; }
# minutes from now until $1 seconds before the end (at least 0.1)
until_end() { awk -v s=$(( END - $1 - $(date +%s) )) 'BEGIN { printf "%.3f", (s < 6 ? 6 : s) / 60 }'; }
on_the_clock() { echo "--train.steps=1000000 --optim.min_lr_ratio=1 --train.checkpoint_every=0 --train.time_limit_minutes=$(until_end "$1")"; }
emoji_data=(--data.options.font_path="$FONT" --data.options.names_path="$NAMES")

"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')"

smoke() {  # 2 steps of each task: set-up, mixed precision, checkpoint, export and the sample grid on this device
  local s=$RUNS/smoke tiny=(--train.steps=2 --train.batch_size=4 --log.sample_count=2 --log.sample_steps=2)
  rm -rf "$s"
  train configs/shapes_vae.json --train.output_dir="$s/vae" --data.options.size=16 "${tiny[@]}" &&
  train configs/shapes_unet.toml --model.vae_path="$s/vae" --train.output_dir="$s/unet" \
    --data.options.size=16 "${tiny[@]}" --log.sample_prompts='["a red circle"]' &&
  train configs/shapes_controlnet.toml --model.base_model="$s/unet/model" --train.output_dir="$s/cn" \
    --data.options.size=16 "${tiny[@]}" &&
  train configs/emoji_unet.toml --model.vae_path="$EMOJI_VAE" --train.output_dir="$s/emoji" "${emoji_data[@]}" \
    "${tiny[@]}" --log.sample_prompts='["red apple"]'
}
if ! smoke > "$LOGS/smoke.log" 2>&1; then
  tail -40 "$LOGS/smoke.log"; echo "SMOKE FAILED"; exit 1
fi
START=$(date +%s) && END=$(( START + BUDGET_S ))  # the training budget starts after the smoke run
echo "smoke passed in $(( START - T0 )) s"

shapes() {
  train configs/shapes_vae.json --model.vae_path=src/reverie/bundled/shapes/vae --train.output_dir="$RUNS/shapes_vae" \
    --train.batch_size=64 --optim.lr=1e-4 --optim.warmup_steps=100 --log.every=100 $(on_the_clock 360) &&
  train configs/shapes_unet.toml --model.vae_path="$RUNS/shapes_vae" --train.output_dir="$RUNS/shapes_unet" \
    --data.options.size="$SHAPES_SIZE" --train.batch_size=256 --optim.warmup_steps=500 --log.every=100 \
    --log.sample_every=0 --train.export_dtype=float16 $(on_the_clock 120) &&
  train configs/shapes_controlnet.toml --model.base_model="$RUNS/shapes_unet/model" \
    --train.output_dir="$RUNS/shapes_controlnet" --train.batch_size=128 --optim.lr=2e-4 --log.every=100 \
    --log.sample_every=0 --train.export_dtype=float16 $(on_the_clock 30)
}
emoji() {
  train configs/emoji_vae.json --model.vae_path="$EMOJI_VAE" --train.output_dir="$RUNS/emoji_vae" "${emoji_data[@]}" \
    --train.batch_size=64 --optim.lr=1e-4 --log.every=100 --log.sample_every=0 $(on_the_clock 360) &&
  train configs/emoji_unet.toml --model.vae_path="$RUNS/emoji_vae" --train.output_dir="$RUNS/emoji_unet" \
    "${emoji_data[@]}" --train.batch_size=128 --log.every=100 --log.sample_every=0 \
    --train.export_dtype=float16 $(on_the_clock 30)
}
shapes > "$LOGS/shapes.log" 2>&1 & shapes_pid=$!
emoji > "$LOGS/emoji.log" 2>&1 & emoji_pid=$!
wait $shapes_pid; shapes_rc=$?
wait $emoji_pid; emoji_rc=$?
echo "shapes chain rc $shapes_rc, emoji chain rc $emoji_rc, $(( $(date +%s) - START )) s after the smoke run"

# what comes back: the fp16 model folders (split under the 16 MB per-file limit), logs, sample grids
pack() {  # pack NAME DIR...: a tar of the dirs that exist, in 15 MB parts
  local name=$1; shift
  local dirs=(); for d in "$@"; do [ -d "$d" ] && dirs+=("$d"); done
  [ ${#dirs[@]} -gt 0 ] && tar cf - "${dirs[@]}" | split -b 15M - "$OUT/$name.tar.part-"
}
pack shapes "$RUNS/shapes_unet/model" "$RUNS/shapes_controlnet/model"
pack emoji "$RUNS/emoji_unet/model"
for f in "$RUNS"/*/log.csv; do echo "== $f"; tail -2 "$f"; done
tail -n 4 "$LOGS/shapes.log" "$LOGS/emoji.log"
tar cf "$OUT/logs.tar" $(ls -d "$LOGS" "$RUNS"/*/log.csv "$RUNS"/*/samples "$RUNS"/*/config.json 2>/dev/null)
ls -la "$OUT"
