"""The first-run demo: an image being noised (forward process) and restored (reverse process).

The "model" is the exact denoiser of a small data set of drawn shapes (reverie.toy.EmpiricalDenoiser), so
the reverse process needs no trained network: it shows what sampling does, step by step, in about a second.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import schedules
from .progress import ProgressBar
from .samplers import resolve
from .toy import EmpiricalDenoiser

COLORS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (235, 200, 30)}


def shapes_dataset(size: int = 32) -> torch.Tensor:
    """Twelve images, one solid shape each (circle / square / triangle x four colours) on white, in [-1, 1]."""
    images = []
    for shape in ("circle", "square", "triangle"):
        for color in COLORS.values():
            img = Image.new("RGB", (size, size), "white")
            draw, m = ImageDraw.Draw(img), size // 5
            if shape == "circle":
                draw.ellipse([m, m, size - m, size - m], fill=color)
            elif shape == "square":
                draw.rectangle([m, m, size - m, size - m], fill=color)
            else:
                draw.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=color)
            images.append(np.asarray(img))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()  # (N, 3, H, W)
    return x / 127.5 - 1


def to_pil(x: torch.Tensor, sigma: float = 0.0) -> Image.Image:
    """A VE sample shown at unit scale (x / sqrt(1 + sigma^2), the VP view), clipped to [-1, 1]."""
    x = (x / math.sqrt(1 + sigma**2)).clamp(-1, 1)
    arr = ((x[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    return Image.fromarray(arr)


def _grid(rows: list[tuple[str, list[tuple[Image.Image, str]]]], scale: int = 3) -> Image.Image:
    cell, label_w, pad = rows[0][1][0][0].width * scale, 190, 18
    cols = max(len(r[1]) for r in rows)
    out = Image.new("RGB", (label_w + cols * (cell + 4), len(rows) * (cell + pad + 6) + 4), "white")
    draw = ImageDraw.Draw(out)
    for r, (title, cells) in enumerate(rows):
        y = r * (cell + pad + 6) + 4
        draw.text((6, y + cell // 2 - 6), title, fill="black")
        for c, (img, caption) in enumerate(cells):
            x = label_w + c * (cell + 4)
            out.paste(img.resize((cell, cell), Image.NEAREST), (x, y))
            draw.text((x + 2, y + cell + 2), caption, fill="black")
    return out


def run_demo(out: str = "demo.png", steps: int = 30, seed: int = 0, sampler: str = "DPM++ 2M Karras",
             frames: int = 8, progress: bool = True) -> Image.Image:
    """Write a PNG: the forward process on one image, then the reverse process from pure noise."""
    if frames < 2:
        raise ValueError(f"frames must be >= 2; got {frames}")
    data = shapes_dataset()
    g = torch.Generator().manual_seed(seed)

    # forward: x_sigma = x0 + sigma * eps at noise levels evenly spaced in log sigma
    x0, eps = data[seed % len(data)][None], torch.randn(1, *data.shape[1:], generator=g)
    levels = [0.0] + np.geomspace(0.05, 80, frames - 1).tolist()
    forward = [(to_pil(x0 + s * eps, s), f"s={s:.2g}") for s in levels]

    # reverse: sample from the data set's exact denoiser
    choice = resolve(sampler)
    sigma_min, sigma_max = 0.01, 80.0
    sigmas = (schedules.karras if choice.schedule == "karras" else schedules.exponential)(steps, sigma_min, sigma_max)
    trail = []
    with ProgressBar(steps, "reverse process", disable=not progress) as bar:
        bar.callback = lambda step: trail.append(step)
        x = choice(EmpiricalDenoiser(data), torch.randn(1, *data.shape[1:], generator=g) * sigma_max, sigmas,
                   generator=g, callback=bar)
    picks = np.linspace(0, len(trail) - 1, frames - 1).round().astype(int)
    noisy = [(to_pil(trail[i].x, trail[i].sigma), f"s={trail[i].sigma:.2g}") for i in picks] + [(to_pil(x), "s=0")]
    denoised = [(to_pil(trail[i].denoised), f"step {i}") for i in picks] + [(to_pil(x), "result")]

    grid = _grid([("forward: x_sigma", forward), (f"reverse: x_sigma ({choice.name})", noisy),
                  ("reverse: denoised x0", denoised)])
    grid.save(out)
    return grid
