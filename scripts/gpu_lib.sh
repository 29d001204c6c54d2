# Shared pieces of the GPU lease scripts (sourced by scripts/gpu_train.sh and scripts/gpu_shapes.sh): their
# settings (each overridable from the environment), the output folders, and the steps both take.
# The scripts set END (epoch seconds: the end of the training budget) before on_the_clock is used.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
PY=${PYTHON:-python3}
OUT=${OUT:-out/gpu}
RUNS=${RUNS:-runs/gpu}
BUDGET_S=${BUDGET_S:-440}
SHAPES_SIZE=${SHAPES_SIZE:-50000}
LOGS=$RUNS/logs
mkdir -p "$OUT" "$LOGS"
T0=$(date +%s)

train() { "$PY" -m reverie.train.cli "$@" --log.progress=false; }
# minutes from now until $1 seconds before the end (at least 0.1)
until_end() { awk -v s=$(( END - $1 - $(date +%s) )) 'BEGIN { printf "%.3f", (s < 6 ? 6 : s) / 60 }'; }
# a run that ends on the clock $1 seconds before the end: constant LR after warmup, EMA weights exported
on_the_clock() { echo "--train.steps=1000000 --optim.min_lr_ratio=1 --train.checkpoint_every=0 --train.time_limit_minutes=$(until_end "$1")"; }

device_info() {
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
        torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
}

smoke_shapes() {  # 2 steps of the shapes tasks: set-up, mixed precision, checkpoint, export and samples here
  local s=$RUNS/smoke tiny=(--train.steps=2 --train.batch_size=4 --log.sample_count=2 --log.sample_steps=2)
  rm -rf "$s"
  train configs/shapes_vae.json --train.output_dir="$s/vae" --data.options.size=16 "${tiny[@]}" &&
  train configs/shapes_unet.toml --model.vae_path="$s/vae" --train.output_dir="$s/unet" \
    --data.options.size=16 "${tiny[@]}" --log.sample_prompts='["a red circle"]' &&
  train configs/shapes_controlnet.toml --model.base_model="$s/unet/model" --train.output_dir="$s/cn" \
    --data.options.size=16 "${tiny[@]}"
}

pack() {  # pack NAME DIR...: a tar of the dirs that exist, in 15 MB parts (the device returns files <= 16 MB)
  local name=$1; shift
  local dirs=(); for d in "$@"; do [ -d "$d" ] && dirs+=("$d"); done
  [ ${#dirs[@]} -gt 0 ] && tar cf - "${dirs[@]}" | split -b 15M - "$OUT/$name.tar.part-"
}

pack_logs() {  # logs, CSVs, sample grids and configs of every run
  for f in "$RUNS"/*/log.csv; do echo "== $f"; tail -2 "$f"; done
  tar cf "$OUT/logs.tar" $(ls -d "$LOGS" "$RUNS"/*/log.csv "$RUNS"/*/samples "$RUNS"/*/config.json 2>/dev/null)
  ls -la "$OUT"
}
