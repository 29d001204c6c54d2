"""Does a ControlNet's output follow its control? Generate shapes scenes from their captions with their own
control (a segmentation map or edges), then read the images back with the shapes analyzer:

    iou         per shape of the control, the IoU of its pixels with the generated pixels of the colour the
                caption gives it (shapes follow the control AND colours follow the prompt), averaged
    layout_iou  per image, the IoU of all the control's shapes with all generated shape pixels, any colour
    color       the analyzer's colour verdict against the caption (every object's colour right)
    shape       the analyzer's shape verdict against the caption

    reverie eval --controlnet runs/shapes_controlnet/model --split heldout --n 200
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from ..control import check_control_type, dataset_control, shape_masks
from ..data.shapes import ShapesDataset
from .plot import image_grid
from .shapes import MIN_COVERAGE, PALETTE, coverage_map, score, to_pixels


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1 when both are empty)."""
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def control_scores(image, placed, caption: str) -> dict:
    """The scores of one generated image against the scene (placed shapes) its control came from."""
    colors, coverage = coverage_map(to_pixels(image))
    shapes = coverage >= MIN_COVERAGE  # (H, W): pixels of some palette colour
    masks = shape_masks(placed, colors.shape[0])
    per_shape = [iou(mask, shapes & (colors == list(PALETTE).index(p.color))) for p, mask in zip(placed, masks)]
    verdict = score(image, caption)
    return {"iou": float(np.mean(per_shape)), "layout_iou": iou(np.any(masks, axis=0), shapes),
            "color": bool(verdict["color"]), "shape": bool(verdict["shape"])}


def evaluate_control(pipe, controlnet, *, control_type: str = "segmentation", split: str = "heldout", n: int = 200,
                     scenes_seed: int = 1, steps: int = 20, guidance_scale: float = 7.5, sampler: str = "dpmpp_2m",
                     seed: int = 0, conditioning_scale: float = 1.0, batch_size: int = 16,
                     grid: str | Path | None = None, grid_columns: int = 8) -> dict:
    """Mean scores (see the module docstring) over n scenes of the shapes data set's split, each generated from
    its caption and its control (scene i with seed + i), for one- and two-object scenes and all together.
    controlnet: a ControlNet or a folder; None scores the model without control (the baseline). grid: a PNG
    of the first grid_columns scenes, their controls above the generated images."""
    check_control_type(control_type)
    scenes = ShapesDataset(size=n, split=split, seed=scenes_seed, resolution=pipe.default_size)
    sums, counts = defaultdict(float), defaultdict(int)
    if isinstance(controlnet, (str, Path)):  # a folder: load it once
        from ..loading import load_controlnet

        controlnet = load_controlnet(controlnet)
    for start in range(0, n, batch_size):
        indices = list(range(start, min(n, start + batch_size)))
        captions = [scenes.captions[i] for i in indices]
        controls = [dataset_control(scenes, i, control_type) for i in indices]
        control = {} if controlnet is None else dict(
            controlnet=controlnet, controlnet_conditioning_scale=conditioning_scale, control_image=controls)
        result = pipe(captions, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                      seed=[seed + i for i in indices], progress=False, **control)
        if grid is not None and start == 0:
            k = min(grid_columns, len(indices))
            image_grid([c.convert("RGB") for c in controls[:k]] + result.images[:k], k).save(grid)
        for i, caption, image in zip(indices, captions, result.images):
            placed = scenes.placements[i]
            group = "two" if len(placed) == 2 else "one"
            for key, value in control_scores(image, placed, caption).items():
                for g in (group, "all"):
                    sums[g, key] += float(value)
                    counts[g, key] += 1
    return {f"{g}/{key}": sums[g, key] / counts[g, key] for g, key in sorted(sums)} | {
        "n_one": counts["one", "iou"], "n_two": counts["two", "iou"]}
