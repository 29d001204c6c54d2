"""Cheaper weights on this CPU (reverie.quantize): speed, weight memory and image difference of each mode.

1. The shipped shapes model, whole pipeline (20 steps dpmpp_2m, 4 images): seconds (modes timed in turn per rep,
   median of --reps), the network's weight bytes (its state dict as torch.save writes it), and the mean absolute
   pixel difference from the unquantized images (0..255).
2. One step of an SD 1.5-architecture UNet (name-seeded random weights, 32x32 latent, batch 2, fp32): seconds
   per call, weight bytes, and the max / mean absolute difference of the output from the unquantized one.

    python bench/quantize.py [--reps 3] [--threads 2] [--skip-sd15]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch

from reverie import Pipeline
from reverie.cli import model_path
from reverie.models.unet import UNET_PRESETS, UNet
from reverie.quantize import MODES, quantize_network, weight_bytes

warnings.filterwarnings("ignore")
PROMPTS = ["a red circle above a blue square", "a green triangle", "a small yellow square", "a blue circle"]


def timed(calls: dict, reps: int) -> dict:
    """{name: (median seconds, last output)}: each callable run once to warm up, then in turn per rep."""
    samples, outputs = {name: [] for name in calls}, {}
    for name, call in calls.items():
        outputs[name] = call()
    for _ in range(reps):
        for name, call in calls.items():
            start = time.perf_counter()
            outputs[name] = call()
            samples[name].append(time.perf_counter() - start)
    return {name: (statistics.median(samples[name]), outputs[name]) for name in calls}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-sd15", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"quantization, CPU ({os.cpu_count()} cores, {args.threads} torch threads), median of {args.reps}",
          flush=True)

    pipes = {"fp32": Pipeline.from_pretrained(model_path("shapes"))}
    for mode in MODES:
        pipes[mode] = Pipeline.from_pretrained(model_path("shapes"))
        pipes[mode].quantize(mode)

    def images(pipe):
        result = pipe(PROMPTS, steps=20, seed=[0, 1, 2, 3], progress=False)
        return np.stack([np.asarray(i, dtype=np.float64) for i in result.images])

    rows = timed({name: (lambda p=pipe: images(p)) for name, pipe in pipes.items()}, args.reps)
    base_s, base = rows["fp32"]
    base_bytes = weight_bytes(pipes["fp32"].network)
    print("\n| shapes, 20 steps, 4 images | seconds | vs fp32 | network weights | vs fp32 | mean abs pixel diff |")
    print("|---|---|---|---|---|---|")
    for name, (seconds, out) in rows.items():
        size = weight_bytes(pipes[name].network)
        print(f"| {name} | {seconds:.3f} | {base_s / seconds:.2f}x | {size / 2**20:.1f} MiB | {size / base_bytes:.2f} | "
              f"{np.abs(out - base).mean():.3f} |", flush=True)
    if args.skip_sd15:
        return 0

    with torch.device("meta"):
        template = UNet(UNET_PRESETS["sd15"])
    template = template.to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in template.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) / max(1, p[0].numel()) ** 0.5)
    x, ctx = torch.randn(2, 4, 32, 32, generator=generator), torch.randn(2, 77, 768, generator=generator)
    nets = {"fp32": template}
    for mode in MODES:
        nets[mode] = quantize_network(copy.deepcopy(template), mode, torch.float32)

    def step(net):
        with torch.inference_mode():
            return net(x, 500, ctx)

    rows = timed({name: (lambda n=net: step(n)) for name, net in nets.items()}, args.reps)
    base_s, base = rows["fp32"]
    base_bytes = weight_bytes(template)
    print("\n| SD 1.5 UNet step, 32x32, batch 2 | seconds | vs fp32 | weights | vs fp32 | max abs diff | mean abs diff |")
    print("|---|---|---|---|---|---|---|")
    for name, (seconds, out) in rows.items():
        size = weight_bytes(nets[name])
        diff = (out - base).abs()
        print(f"| {name} | {seconds:.3f} | {base_s / seconds:.2f}x | {size / 2**20:.0f} MiB | {size / base_bytes:.2f} | "
              f"{diff.max().item():.4f} | {diff.mean().item():.5f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
