"""Line charts and image grids as PNG, drawn with Pillow (no plotting dependency): what the evaluation sweeps and
the training runs' sample grids write.

    panel = Panel("guidance scale", "fully correct", {"one object": (xs, ys), "two objects": (xs, ys2)}, log_x=True)
    save_panels([panel], "cfg.png", title="shapes: classifier-free guidance")
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
WIDTH, HEIGHT, MARGIN = 420, 300, 48


@dataclass
class Panel:
    xlabel: str
    ylabel: str
    series: dict[str, tuple[list[float], list[float]]]  # name -> (xs, ys)
    log_x: bool = False
    ylim: tuple[float, float] | None = None  # default: the data's range, padded
    xticks: list[float] = field(default_factory=list)  # default: the union of the series' xs


def _fmt(v: float) -> str:
    return f"{v:g}" if abs(v) >= 0.01 or v == 0 else f"{v:.1e}"


def _draw_panel(draw: ImageDraw.ImageDraw, panel: Panel, left: int, top: int, font) -> None:
    xs_all = sorted({x for xs, _ in panel.series.values() for x in xs})
    ys_all = [y for _, ys in panel.series.values() for y in ys if math.isfinite(y)]
    fx = (lambda x: math.log(x)) if panel.log_x else (lambda x: x)
    x0, x1 = fx(min(xs_all)), fx(max(xs_all))
    y0, y1 = panel.ylim or (min(ys_all), max(ys_all))
    if panel.ylim is None:
        pad = (y1 - y0) * 0.08 or 0.5
        y0, y1 = y0 - pad, y1 + pad
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    box = (left + MARGIN, top + 20, left + WIDTH - 12, top + HEIGHT - MARGIN)

    def at(x: float, y: float) -> tuple[float, float]:
        return (box[0] + (fx(x) - x0) / (x1 - x0) * (box[2] - box[0]),
                box[3] - (y - y0) / (y1 - y0) * (box[3] - box[1]))

    draw.rectangle(box, outline="black")
    for x in panel.xticks or xs_all:
        px, _ = at(x, y0)
        draw.line([(px, box[3]), (px, box[3] + 4)], fill="black")
        draw.text((px, box[3] + 6), _fmt(x), fill="black", font=font, anchor="ma")
    decimals = max(2, 1 - math.floor(math.log10((y1 - y0) / 4)))  # enough to tell the ticks apart
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        _, py = at(xs_all[0], y)
        draw.line([(box[0] - 4, py), (box[0], py)], fill="black")
        draw.line([(box[0] + 1, py), (box[2] - 1, py)], fill="#e6e6e6")
        draw.text((box[0] - 6, py), f"{y:.{decimals}f}", fill="black", font=font, anchor="rm")
    draw.text(((box[0] + box[2]) / 2, box[3] + 22), panel.xlabel, fill="black", font=font, anchor="ma")
    draw.text((box[0], top + 6), panel.ylabel, fill="black", font=font)
    for i, (name, (xs, ys)) in enumerate(panel.series.items()):
        color = COLORS[i % len(COLORS)]
        points = [at(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for px, py in points:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=color)
        draw.text((box[2] - 6, box[1] + 6 + 14 * i), name, fill=color, font=font, anchor="ra")


def save_panels(panels: list[Panel], path, title: str = "") -> Path:
    """Draw the panels side by side under a title and write a PNG."""
    font = ImageFont.load_default()
    image = Image.new("RGB", (WIDTH * len(panels), HEIGHT + 24), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title, fill="black", font=font)
    for i, panel in enumerate(panels):
        _draw_panel(draw, panel, WIDTH * i, 24, font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Equal-sized images in rows of `columns`, left to right, top to bottom."""
    w, h = images[0].size
    rows = -(-len(images) // columns)
    out = Image.new("RGB", (columns * w, rows * h))
    for i, im in enumerate(images):
        out.paste(im, ((i % columns) * w, (i // columns) * h))
    return out


def sample_grid(pipe, prompts, *, per_prompt: int, steps: int = 20, guidance_scale: float = 7.5,
                sampler: str = "dpmpp_2m", seed: int = 0, prompt_rows: bool = True) -> Image.Image:
    """Samples of each prompt at seeds seed, seed + 1, ...: one row per prompt (prompt_rows) or one column."""
    per = [pipe([p] * per_prompt, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                seed=[seed + i for i in range(per_prompt)], progress=False).images for p in prompts]
    if prompt_rows:
        return image_grid([im for row in per for im in row], per_prompt)
    return image_grid([per[j][i] for i in range(per_prompt) for j in range(len(prompts))], len(prompts))
