"""Prompt adherence of a shapes model: generate from captions, read the images back with the analyzer.

    reverie eval --model runs/shapes_unet/model --split heldout --n 200 --guidance 7.5 --steps 20
"""

from __future__ import annotations

from collections import defaultdict

from ..data.shapes import ShapesDataset, parse_caption
from .shapes import score

ATTRIBUTES = ("count", "color", "shape", "size", "position", "relation")


def shapes_captions(split: str = "heldout", n: int = 200, seed: int = 1) -> list[str]:
    """n captions of the data set's split (held-out combinations by default), one- and two-object."""
    return list(ShapesDataset(size=n, split=split, seed=seed).captions)


def evaluate_shapes(pipe, captions: list[str], *, steps: int = 20, guidance_scale: float = 7.5,
                    sampler: str = "dpmpp_2m", seed: int = 0, batch_size: int = 16) -> dict:
    """Fraction of images correct per attribute and fully correct, for one- and two-object captions.

    Attributes a caption does not state are not scored. Image i uses seed + i."""
    hits, totals = defaultdict(int), defaultdict(int)
    for start in range(0, len(captions), batch_size):
        batch = captions[start:start + batch_size]
        seeds = [seed + start + i for i in range(len(batch))]
        result = pipe(batch, steps=steps, guidance_scale=guidance_scale, sampler=sampler, width=64, height=64,
                      seed=seeds, progress=False)
        for caption, image in zip(batch, result.images):
            scores = score(image, caption)
            group = "two" if len(parse_caption(caption).objects) == 2 else "one"
            for key in (*ATTRIBUTES, "fully_correct"):
                if scores.get(key) is not None:
                    hits[group, key] += bool(scores[key])
                    totals[group, key] += 1
    return {f"{group}/{key}": hits[group, key] / totals[group, key] for group, key in sorted(totals)} | {
        "n_one": totals["one", "fully_correct"], "n_two": totals["two", "fully_correct"]}
