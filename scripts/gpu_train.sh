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
. scripts/gpu_lib.sh
FONT=${EMOJI_FONT:-/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf}
NAMES=${EMOJI_NAMES:-/usr/share/unicode/emoji/emoji-test.txt}
EMOJI_VAE=${EMOJI_VAE:-runs/emoji_vae}

emoji_data=(--data.options.font_path="$FONT" --data.options.names_path="$NAMES")

device_info

smoke() {  # 2 steps of each task on this device
  smoke_shapes &&
  train configs/emoji_unet.toml --model.vae_path="$EMOJI_VAE" --train.output_dir="$RUNS/smoke/emoji" \
    "${emoji_data[@]}" --train.steps=2 --train.batch_size=4 --log.sample_count=2 --log.sample_steps=2 \
    --log.sample_prompts='["red apple"]'
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
pack shapes "$RUNS/shapes_unet/model" "$RUNS/shapes_controlnet/model"
pack emoji "$RUNS/emoji_unet/model"
tail -n 4 "$LOGS/shapes.log" "$LOGS/emoji.log"
pack_logs
