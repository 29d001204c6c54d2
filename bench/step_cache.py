"""Step caching on this CPU: what DeepCache and first-block caching save, and what they change.

1. UNet calls (name-seeded random weights, fp32, batch 2 = one CFG step): a full call against DeepCache's
   shallow call (conv_in, the first down block, the last up block), and the speed-up that implies at interval N,
   N t_full / (t_full + (N - 1) t_shallow). Presets: small (the shipped shapes UNet's layout) and sd15.
2. The shipped shapes model, whole pipeline (20 steps dpmpp_2m, 4 images, guidance 7.5): wall time with
   DeepCache at N = 2, 3, 4 against off, measured alternately (median of --reps), and the mean absolute pixel
   difference from the uncached images (0..255).
3. A diffusion transformer (--video MODEL: a trained spacetime / Wan model folder, e.g. the one
   configs/moving_shapes_video_cpu.toml trains; skipped when absent): wall time and skipped calls with first-block
   caching at thresholds 0.05, 0.1, 0.2 against off, and the mean absolute frame difference.

    python bench/step_cache.py [--reps 3] [--threads 2] [--video runs/moving_shapes_video_cpu/model]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

from reverie import Pipeline
from reverie.cli import model_path
from reverie.models.unet import UNET_PRESETS, UNet

PROMPTS = ["a red circle above a blue square", "a green triangle", "a small yellow square", "a blue circle"]
LATENT = {"small": 16, "sd15": 32}


def unet_calls(preset: str, reps: int) -> tuple[float, float]:
    """Median seconds of a full and of a shallow call of a UNet preset."""
    torch.manual_seed(0)
    net = UNet(UNET_PRESETS[preset]).eval()
    c = net.config
    x = torch.randn(2, c.in_channels, LATENT[preset], LATENT[preset])
    ctx = torch.randn(2, 77, c.per_block("cross_attention_dim")[0])
    cache = net.enable_deepcache(2)
    times = {True: [], False: []}
    with torch.inference_mode():
        net(x, 500, ctx)  # warm-up (full), fills the cache
        for _ in range(2 * reps):
            shallow = cache.calls % 2 == 1
            start = time.perf_counter()
            net(x, 500, ctx)
            times[shallow].append(time.perf_counter() - start)
    return statistics.median(times[False]), statistics.median(times[True])


def pipeline_rows(pipe, settings: list, enable, reps: int, call) -> dict:
    """{setting: (median seconds, result)} with each setting timed in turn per rep (None: off)."""
    samples, results = {s: [] for s in settings}, {}
    call()  # warm-up
    for _ in range(reps):
        for s in settings:
            pipe.disable_step_cache()
            if s is not None:
                enable(s)
            start = time.perf_counter()
            results[s] = call()
            samples[s].append(time.perf_counter() - start)
    pipe.disable_step_cache()
    return {s: (statistics.median(samples[s]), results[s]) for s in settings}


def frames(result) -> np.ndarray:
    if result.frames is not None:
        return np.stack([np.asarray(f, dtype=np.float64) for clip in result.frames for f in clip])
    return np.stack([np.asarray(i, dtype=np.float64) for i in result.images])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--video", default="runs/moving_shapes_video_cpu/model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"step caching, CPU ({os.cpu_count()} cores, {args.threads} torch threads), fp32, median of {args.reps}",
          flush=True)

    print("\n| UNet | latent | full call ms | shallow call ms | shallow / full | implied N=2 | N=3 | N=4 |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in ("small", "sd15"):
        full, shallow = unet_calls(preset, args.reps)
        implied = [n * full / (full + (n - 1) * shallow) for n in (2, 3, 4)]
        print(f"| {preset} | {LATENT[preset]}x{LATENT[preset]}, batch 2 | {full * 1e3:.1f} | {shallow * 1e3:.1f} | "
              f"{shallow / full:.2f} | " + " | ".join(f"{s:.2f}x" for s in implied) + " |", flush=True)

    pipe = Pipeline.from_pretrained(model_path("shapes"))
    rows = pipeline_rows(pipe, [None, 2, 3, 4], pipe.enable_deepcache, args.reps,
                         lambda: pipe(PROMPTS, steps=20, seed=[0, 1, 2, 3], progress=False))
    base_time, base = rows[None]
    print("\n| shapes, 20 steps, 4 images | seconds | speed-up | mean abs pixel diff |")
    print("|---|---|---|---|")
    for s, (seconds, result) in rows.items():
        diff = np.abs(frames(result) - frames(base)).mean()
        print(f"| {'off' if s is None else f'DeepCache N={s}'} | {seconds:.3f} | {base_time / seconds:.2f}x | "
              f"{diff:.2f} |", flush=True)

    if not os.path.isdir(args.video):
        print(f"\n(no transformer model at {args.video}: part 3 skipped)")
        return 0
    video = Pipeline.from_pretrained(args.video)
    caches = {}

    def enable(threshold):
        video.enable_block_cache(threshold)
        caches[threshold] = video.network.block_cache

    rows = pipeline_rows(video, [None, 0.05, 0.1, 0.2], enable, args.reps,
                         lambda: video(["a red circle moving left to right"] * 2, steps=20, seed=[0, 1], progress=False))
    base_time, base = rows[None]
    print(f"\n| {args.video}, 20 steps, 2 clips | seconds | speed-up | calls skipped | mean abs frame diff |")
    print("|---|---|---|---|---|")
    for s, (seconds, result) in rows.items():
        skipped = "-" if s is None else f"{caches[s].skipped}/{caches[s].calls}"
        diff = np.abs(frames(result) - frames(base)).mean()
        print(f"| {'off' if s is None else f'block cache {s}'} | {seconds:.3f} | {base_time / seconds:.2f}x | "
              f"{skipped} | {diff:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
