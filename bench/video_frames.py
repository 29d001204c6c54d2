"""What a Wan video costs as its frame count grows: seconds per transformer step, seconds to decode the latents,
and the decode's peak memory, untiled and with WanVAE.enable_tiling, for clips of 5, 9, 17 and 33 frames.

The models are random: a small Wan transformer (Wan 2.1's layout, 4 blocks of width 256) and Wan 2.1's VAE
architecture (dim_mult 1, 2, 4, 4; 2 residual blocks a level) at a reduced base width. A transformer step is one
call at batch 1 (classifier-free guidance makes two), the fastest of --reps after a warm-up (the steadier estimate
on a shared machine). Each decode runs in a fresh process (multiprocessing "spawn") after a warm-up decode of the
first two latent frames, which pages in torch's code and starts its threads, with glibc's malloc told to map every
block over 128 KiB on its own (MALLOC_MMAP_THRESHOLD_, so a freed tensor leaves the resident set rather than the
heap) in one arena (MALLOC_ARENA_MAX=1); the freed heap is handed back (glibc malloc_trim) and the high-water mark
reset (/proc/self/clear_refs), so "peak MB" is the decode's peak resident set size (resource.getrusage ru_maxrss,
Linux) minus the resident set just before it. RSS, not tracemalloc, because torch's CPU tensors are not allocated
through Python's allocator; it also counts the allocator's own slack, so read it to about a megabyte. The decoder
streams one latent frame at a time through a fixed-size feature cache, so this should grow with frame count only
through the output video (float32, shown as "video MB"; decode holds it about three times: the frames, their
concatenation, the clamped copy; tiled decode also holds the tiles with their overlaps until blending). Tiling
bounds what one frame's activations cost (a tile's instead of the whole frame's); on a small frame its overlap only
adds work.

    python bench/video_frames.py [--size 64] [--frames 5 9 17 33] [--base-dim 4] [--tile 32 --stride 24]
                                 [--reps 5] [--threads 2]

The defaults take about 1.5 minutes on 2 CPU threads (3.3 on a machine shared with 3 other jobs). At these widths
PyTorch runs the VAE's 3-D convolutions on its slow (im2col) CPU path, which it picks for small channel counts, so
seconds are not those of the real width.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import os
import resource
import time

import torch

from reverie.models.wan import WanTransformer, WanTransformerConfig
from reverie.models.wan_vae import WanVAE, WanVAEConfig

TRANSFORMER = dict(num_attention_heads=4, attention_head_dim=64, ffn_dim=1024, num_layers=4, text_dim=256)
TEXT_TOKENS = 64


def rss_bytes() -> int:
    """The resident set size now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> int:
    """Hand freed heap back to the OS, reset the peak RSS to the current one (Linux >= 4.0) and return it."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_bytes()


def latents(frames: int, size: int, vae: WanVAEConfig) -> torch.Tensor:
    """Seeded latents (1, z_dim, 1 + (frames - 1) / 4, size / 8, size / 8) for a clip of `frames` frames."""
    t, h = 1 + (frames - 1) // vae.temporal_compression, size // vae.spatial_compression
    return torch.randn(1, vae.z_dim, t, h, h, generator=torch.Generator().manual_seed(frames))


def decode_once(frames: int, size: int, base_dim: int, tiling: tuple[int, int] | None, threads: int, queue) -> None:
    """In a fresh process: decode seeded latents; put (seconds, peak memory bytes above the start, video shape,
    whether every value is finite and in [-1, 1])."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    vae = WanVAE(WanVAEConfig(base_dim=base_dim)).eval()
    if tiling is not None:
        tile, stride = tiling
        vae.enable_tiling(tile, tile, stride, stride)
    z = latents(frames, size, vae.config)
    with torch.no_grad():
        vae.decode(z[:, :, :2])  # warm-up: the first latent frame and one that goes through the caches
        start = reset_peak_rss()
        t0 = time.perf_counter()
        video = vae.decode(z)  # (1, 3, frames, size, size)
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
    queue.put((seconds, peak, tuple(video.shape), bool(video.isfinite().all() and video.abs().max() <= 1)))


def decode_in_fresh_process(*args) -> tuple:
    os.environ.update(MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="131072")  # read by glibc when the child starts
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=decode_once, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def step_seconds(model: WanTransformer, frames: int, size: int, vae: WanVAEConfig, reps: int) -> float:
    """Fastest of `reps` transformer calls on the latents of a `frames`-frame clip, after a warm-up."""
    x = latents(frames, size, vae)
    context = torch.randn(1, TEXT_TOKENS, model.config.text_dim, generator=torch.Generator().manual_seed(1))
    times = []
    with torch.no_grad():
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            model(x, 500.0, context)
            times.append(time.perf_counter() - t0)
    return min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="frame height and width, pixels")
    parser.add_argument("--frames", type=int, nargs="+", default=[5, 9, 17, 33], help="clip lengths, 1 + 4k")
    parser.add_argument("--base-dim", type=int, default=4, help="the VAE's base width (Wan 2.1: 96)")
    parser.add_argument("--tile", type=int, default=32, help="tile side for the tiled decode, pixels")
    parser.add_argument("--stride", type=int, default=24, help="tile stride for the tiled decode, pixels")
    parser.add_argument("--reps", type=int, default=5, help="timed transformer calls per clip length")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vae = WanVAEConfig(base_dim=args.base_dim)
    torch.manual_seed(0)
    transformer = WanTransformer(WanTransformerConfig(**TRANSFORMER)).eval()

    print(f"{args.size}x{args.size}, VAE base_dim {args.base_dim}, tiles {args.tile} every {args.stride}, "
          f"{args.threads} threads; memory: peak RSS above the start of decode, fresh process each")
    header = ("frames", "tokens", "step s", "decode s", "tiled s", "video MB", "peak MB", "tiled peak MB")
    print(" ".join(f"{h:>13}" for h in header))
    rows = {}
    for frames in args.frames:
        z = latents(frames, args.size, vae)
        tokens = z[0, 0].numel() // 4  # patch (1, 2, 2)
        step = step_seconds(transformer, frames, args.size, vae, args.reps)
        untiled = decode_in_fresh_process(frames, args.size, args.base_dim, None, args.threads)
        tiled = decode_in_fresh_process(frames, args.size, args.base_dim, (args.tile, args.stride), args.threads)
        for seconds, peak, shape, in_range in (untiled, tiled):
            if shape != (1, 3, frames, args.size, args.size) or not in_range:
                raise RuntimeError(f"{frames} frames decoded to {shape}, in [-1, 1] and finite: {in_range}")
        video_mb = 3 * frames * args.size**2 * 4 / 2**20
        rows[frames] = (tokens, step, untiled[0], tiled[0], video_mb, untiled[1] / 2**20, tiled[1] / 2**20)
        print(f"{frames:>13} {tokens:>13} " + " ".join(f"{v:>13.3f}" for v in rows[frames][1:]), flush=True)

    first, last = min(rows), max(rows)
    print(f"\ngrowth {last} / {first} frames: " + ", ".join(
        f"{name} {rows[last][i] / rows[first][i]:.2f}x" for i, name in enumerate(header[1:]) if rows[first][i] > 0))
    print(f"peak growth {first} -> {last} frames, MB: untiled +{rows[last][5] - rows[first][5]:.1f}, tiled "
          f"+{rows[last][6] - rows[first][6]:.1f}, video +{rows[last][4] - rows[first][4]:.1f}")
    print(f"a {last}-frame clip decodes, untiled and tiled, to (1, 3, {last}, {args.size}, {args.size}) in [-1, 1]")


if __name__ == "__main__":
    main()
