"""One denoising step of reverie's UNet vs diffusers' UNet2DConditionModel with identical weights.

CPU, eager, fp32, batch 2 (one classifier-free-guidance step), torch.inference_mode, 2 threads by default.

- Latency: one subprocess holds both models and alternates their timed reps (after a warm-up each), so load
  from other processes on a shared machine hits both alike. Prints median and min per step, and the ratios
  to diffusers' median and min (on a loaded machine the min is the steadier estimate). reverie's small
  convolutions (<= 256 output pixels, B * H * W) run as unfold + one matmul (reverie.models.layers.conv2d),
  where torch's oneDNN convolution spends its time reordering the weight per call.
- FLOPs: torch.utils.flop_counter.FlopCounterMode on the meta device (CPU SDPA is given the SDPA formula),
  shown as achieved GFLOP/s and as a fraction of this machine's fp32 peak, measured as the best 2048^3 matmul.
- Peak memory: each model runs one forward in its own fresh subprocess. The kernel's resident high-water mark
  is reset just before it (/proc/self/clear_refs), so the forward's peak is VmHWM after it minus VmRSS before
  it: activations and workspace, weights excluded. (ru_maxrss would not do: a child inherits its parent's.)

Weights are filled per parameter from a generator seeded by the parameter's name, so every process holds the
same weights; the timing process checks that the outputs agree.

The presets are reverie.models.unet.UNET_PRESETS and "sdxl_small" (SDXL_SMALL below: SDXL's architecture,
text_time embedding included, at a CPU-friendly width).

    python bench/unet_step.py [--presets sd15 small sdxl_small] [--reps N] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import zlib

import torch

from reverie.models.unet import UNET_PRESETS, UNet, UNetConfig

# SDXL's layout (Podell et al. 2023) scaled down to run in seconds on 2 cores: no attention at the first level,
# widths (320, 640, 1280) -> (32, 64, 128), transformer depth [1, 2, 10] -> [1, 2, 5], 64-dim heads as SDXL's
# (fewer of them), linear projections, 2048-wide text features (CLIP-L + bigG) and the text_time added embedding
# with SDXL's own sizes (6 ids x 256 + pooled 1280 = 2816)
SDXL_SMALL = UNetConfig(sample_size=32, block_out_channels=(32, 64, 128), layers_per_block=2,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                        attention_head_dim=(1, 1, 2), transformer_layers_per_block=(1, 2, 5),
                        cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
PRESETS = {**UNET_PRESETS, "sdxl_small": SDXL_SMALL}
LATENT = {"sd15": 32, "sd21": 32}  # latent side per preset; others use the preset's sample_size
TIME_IDS = [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]  # SDXL: original size, crop top-left, target size


def build(impl: str, preset: str) -> torch.nn.Module:
    """The model on the CPU with name-seeded weights: fan-in-scaled normal matrices, norm weights near 1."""
    config = PRESETS[preset]
    with torch.device("meta"):
        if impl == "diffusers":
            import diffusers
            model = diffusers.UNet2DConditionModel.from_config(config.to_dict())
        else:
            model = UNet(config)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            if p.ndim > 1:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
            else:
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.02, generator=g)
    return model


def latent_side(preset: str) -> int:
    return LATENT.get(preset, PRESETS[preset].sample_size)


def inputs(preset: str, device: str = "cpu"):
    """(x, t, context, added): added is SDXL's text_embeds (B, pooled) and time_ids (B, 6), or {}."""
    config = PRESETS[preset]
    side = latent_side(preset)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.in_channels, side, side, generator=g).to(device)  # (B, C, H, W)
    context = torch.randn(2, 77, config.per_block("cross_attention_dim")[0], generator=g).to(device)  # (B, T, D)
    added = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - len(TIME_IDS) * config.addition_time_embed_dim
        added = dict(text_embeds=torch.randn(2, pooled, generator=g).to(device),  # (B, pooled)
                     time_ids=torch.tensor([TIME_IDS, TIME_IDS], device=device))  # (B, 6)
    return x, torch.tensor([801.0, 801.0], device=device), context, added


def step(model, x, t, context, added):
    if isinstance(model, UNet):
        return model(x, t, context, **added)
    return model(x, t, context, added_cond_kwargs=added or None).sample


def vm_kib(key: str) -> int:
    """VmRSS (resident now) or VmHWM (resident high-water mark) of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key + ":")).split()[1])


def memory_worker(impl: str, preset: str) -> dict:
    model = build(impl, preset)
    x, t, context, added = inputs(preset)
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current resident size (Linux >= 4.0)
        f.write("5")
    before = vm_kib("VmRSS")
    with torch.inference_mode():
        step(model, x, t, context, added)
    return dict(peak_mib=(vm_kib("VmHWM") - before) / 1024, weights_mib=sum(
        p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20)


def timing_worker(preset: str, reps: int) -> dict:
    models = {"reverie": build("reverie", preset), "diffusers": build("diffusers", preset)}
    variants = {"reverie": lambda: contextlib.nullcontext(models["reverie"]),
                "diffusers": lambda: contextlib.nullcontext(models["diffusers"])}
    x, t, context, added = inputs(preset)
    times, outs = {name: [] for name in variants}, {}
    with torch.inference_mode():
        for name, variant in variants.items():  # warm-up
            with variant() as model:
                outs[name] = step(model, x, t, context, added)
        for _ in range(reps):
            for name, variant in variants.items():
                with variant() as model:
                    t0 = time.perf_counter()
                    step(model, x, t, context, added)
                    times[name].append(time.perf_counter() - t0)
    diffs = {name: (out - outs["diffusers"]).abs().max().item() for name, out in outs.items()}
    return dict(times=times, diffs=diffs)


def count_flops(impl: str, preset: str) -> int:
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}
    with torch.device("meta"):
        if impl == "diffusers":
            import diffusers
            model = diffusers.UNet2DConditionModel.from_config(PRESETS[preset].to_dict())
        else:
            model = UNet(PRESETS[preset])
        with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
            step(model, *inputs(preset, "meta"))
    return counter.get_total_flops()


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Best fp32 FLOP/s of an n x n x n torch.matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def subprocess_json(*args: str, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(threads), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["sd15", "small", "sdxl_small"], choices=sorted(PRESETS))
    parser.add_argument("--reps", type=int, help="timed reps per model (default: 3 for sd15/sd21, else 10)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", nargs=2, metavar=("IMPL", "PRESET"), help=argparse.SUPPRESS)
    parser.add_argument("--timing", metavar="PRESET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory:
        return print(json.dumps(memory_worker(*args.memory)))
    if args.timing:
        return print(json.dumps(timing_worker(args.timing, args.reps)))

    peak = matmul_peak()
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.1f} at start")
    print(f"fp32 matmul peak (2048^3, best of 5): {peak / 1e9:.1f} GFLOP/s")
    print(f"{'preset':10} {'impl':15} {'latent':>7} {'median s':>9} {'min s':>7} {'GFLOP':>7} {'GFLOP/s':>8} "
          f"{'of peak':>8} {'fwd peak MiB':>13} {'max|diff|':>10}")
    for preset in args.presets:
        flops = {impl: count_flops(impl, preset) for impl in ("reverie", "diffusers")}
        assert flops["reverie"] == flops["diffusers"], flops
        memory = {impl: subprocess_json("--memory", impl, preset, threads=args.threads)
                  for impl in ("reverie", "diffusers")}
        reps = args.reps or (3 if preset in ("sd15", "sd21") else 10)
        timing = subprocess_json("--timing", preset, "--reps", str(reps), threads=args.threads)
        side = latent_side(preset)
        medians, mins = {}, {}
        for impl, times in timing["times"].items():
            times = sorted(times)
            medians[impl] = median = times[len(times) // 2]
            mins[impl] = times[0]
            rate = flops["reverie"] / median
            mem = f"{memory[impl]['peak_mib']:.0f}" if impl in memory else "-"
            print(f"{preset:10} {impl:15} {f'{side}x{side}':>7} {median:>9.3f} {times[0]:>7.3f} "
                  f"{flops['reverie'] / 1e9:>7.1f} {rate / 1e9:>8.1f} {rate / peak:>8.1%} {mem:>13} "
                  f"{timing['diffs'][impl]:>10.1e}")
        print(f"{preset:10} {reps} timed reps each after a warm-up; latency / diffusers' (medians, mins): " + ", ".join(
            f"{impl} {medians[impl] / medians['diffusers']:.3f}, {mins[impl] / mins['diffusers']:.3f}"
            for impl in ("reverie",)))
        print(f"{preset:10} weights {memory['reverie']['weights_mib']:.0f} MiB (not in fwd peak)")
    print("fwd peak: resident high-water mark during one forward minus resident size before it (own process); "
          "max|diff|: largest absolute output difference from diffusers")


if __name__ == "__main__":
    main()
