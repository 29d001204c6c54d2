"""Line charts (through matplotlib, the `plot` extra) and image grids as PNG: what the evaluation sweeps and the
training runs' sample grids write.

    panel = Panel("guidance scale", "fully correct", {"one object": (xs, ys), "two objects": (xs, ys2)}, log_x=True)
    save_panels([panel], "cfg.png", title="shapes: classifier-free guidance")
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


@dataclass
class Panel:
    xlabel: str
    ylabel: str
    series: dict[str, tuple[list[float], list[float]]]  # name -> (xs, ys)
    log_x: bool = False
    ylim: tuple[float, float] | None = None  # default: the data's range, padded
    xticks: list[float] = field(default_factory=list)  # default: the union of the series' xs


def save_panels(panels: list[Panel], path, title: str = "") -> Path:
    """Draw the panels side by side under a title and write a PNG (matplotlib's Agg backend, no display)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError("plots need matplotlib: pip install 'reverie[plot]'") from None
    figure = Figure(figsize=(4.2 * len(panels), 3.24), dpi=100, layout="constrained")  # 420 x 324 px a panel
    for ax, panel in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        for name, (xs, ys) in panel.series.items():
            points = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", markersize=4, label=name)
        if panel.log_x:
            ax.set_xscale("log")
        ticks = panel.xticks or sorted({x for xs, _ in panel.series.values() for x in xs})
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
        ax.minorticks_off()
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, color="#e6e6e6")
        ax.legend(fontsize="small")
    if title:
        figure.suptitle(title, fontsize="medium")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    figure.savefig(tmp, format="png")
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
