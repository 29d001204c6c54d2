"""Reads a shapes image back into objects and scores it against a caption's label.

Every pixel gets a palette colour by nearest hue and a coverage, its saturation relative to that colour's
(hue survives the blur, noise and brightness drift of a generated sample; white, grey and the anti-aliased
fringe have low saturation). Pixels covered over half-way form each colour's mask, cleaned by a 3x3 closing
then opening (fills pinholes, drops speckle and one-pixel bumps; convex shapes pass unchanged); its
8-connected components smaller than MIN_AREA are dropped. Lengths are on a 64 canvas, scaled to the image.

    shape     from the moments of the soft coverage around the component, which blur barely moves (a
              horizontal blur leaves row sums as they are): |skewness| of y over TRIANGLE_SKEW is a triangle
              (coverage grows linearly down an apex-up triangle: skewness -2 sqrt(2) / 5 = -0.57; a circle or
              square is symmetric: 0); else the kurtosis along the diagonals minus along the axes tells a square
              (a square's diagonal profile is triangular, 2.4, its axis profile uniform, 1.8: +0.6) from a
              circle (2.0 in every direction: 0), split at SQUARE_KURTOSIS
    size      small if the component's bounding box is under SIZE_SPLIT px on its longer side
    position  center if the box centre is within CENTER_RADIUS px of the image centre on both axes, else
              the side of the dominant axis
    relation  from the two box centres: the axis with the larger offset decides

`score` matches the label's objects to the detected ones (the assignment agreeing on most attributes,
colour first) and says, per attribute, whether every object that states it got it right.
"""

from __future__ import annotations

import colorsys
import itertools
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..data.shapes import CANVAS, PALETTE, ShapeObject, ShapesLabel, parse_caption

SATURATION_FLOOR = 0.15  # coverage 0 at or below this saturation (the background's noise), 1 at the palette's
MIN_COVERAGE = 0.5  # a pixel belongs to a shape's mask when at least half covered
MIN_VALUE = 0.3  # ... and not dark
MIN_AREA = 20.0  # px on a 64 canvas; the smallest shape (a 12 px triangle) has about 72
TRIANGLE_SKEW = 0.28  # |skewness| of y: triangle 0.57 (0.35 blurred and noisy), circle and square 0 (< 0.1)
SQUARE_KURTOSIS = 0.3  # diagonal minus axis kurtosis: square 0.6 (> 0.4 blurred and noisy), circle 0 (< 0.15)
SIZE_SPLIT = 20.0  # px on a 64 canvas: small 12-16, large 24-28
CENTER_RADIUS = 8.0  # px on a 64 canvas: anchors are 16 px from the centre, jittered by up to 3
MAX_OBJECTS = 8  # score matches against the largest few detections only
_HSV = [colorsys.rgb_to_hsv(*(c / 255 for c in rgb)) for rgb in PALETTE.values()]


@dataclass(frozen=True)
class DetectedObject:
    """A shape found in an image: its attributes, box centre (x, y) in pixels, area in pixels, and box
    (left, top, right, bottom), right/bottom exclusive."""

    color: str
    shape: str
    size: str
    position: str
    center: tuple[float, float]
    area: int
    box: tuple[int, int, int, int]

    def as_object(self) -> ShapeObject:
        """The detection as a label object (what a caption would say about it)."""
        return ShapeObject(self.color, self.shape, self.size, self.position)


def to_pixels(image) -> np.ndarray:
    """A PIL image, (H, W, 3) uint8 array or (3, H, W) tensor in [-1, 1] -> (H, W, 3) float array in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be (3, H, W) in [-1, 1]; got shape {tuple(image.shape)}")
        return ((image.detach().cpu().double().permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy()
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"image must be a PIL image, a (3, H, W) tensor or an (H, W, 3) uint8 array; got "
                         f"{type(image).__name__} {getattr(pixels, 'shape', '')} {getattr(pixels, 'dtype', '')}")
    return pixels.astype(np.float64) / 255


def coverage_map(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) index into PALETTE's colours by nearest hue, and (H, W) coverage in [0, 1] by that colour."""
    top, bottom = pixels.max(-1), pixels.min(-1)
    saturation = (top - bottom) / np.maximum(top, 1e-9)
    r, g, b = pixels.transpose(2, 0, 1)
    span = np.maximum(top - bottom, 1e-9)
    hue = np.where(top == r, (g - b) / span, np.where(top == g, 2 + (b - r) / span, 4 + (r - g) / span)) / 6 % 1
    distance = np.stack([np.abs((hue - h + 0.5) % 1 - 0.5) for h, _, _ in _HSV], -1)  # circular, (H, W, 4)
    colors = distance.argmin(-1)
    full = np.array([s for _, s, _ in _HSV])[colors]  # the palette colour's own saturation
    coverage = np.clip((saturation - SATURATION_FLOOR) / (full - SATURATION_FLOOR), 0, 1) * (top >= MIN_VALUE)
    return colors, coverage


def _neighbourhoods(mask: np.ndarray, fill: bool) -> np.ndarray:
    """(9, H, W): the 3x3 neighbourhood of every pixel, `fill` beyond the border."""
    h, w = mask.shape
    padded = np.pad(mask, 1, constant_values=fill)
    return np.stack([padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])


def _dilate(mask: np.ndarray) -> np.ndarray:
    return _neighbourhoods(mask, False).any(0)


def _erode(mask: np.ndarray) -> np.ndarray:
    return _neighbourhoods(mask, True).all(0)


def _close_open(mask: np.ndarray) -> np.ndarray:
    """Morphological closing then opening with a 3x3 square (Serra 1982): convex shapes pass unchanged."""
    return _dilate(_erode(_erode(_dilate(mask))))


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, each as an (N, 2) array of (row, col)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    found = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, members = deque([start]), []
        while queue:
            y, x = queue.popleft()
            members.append((y, x))
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        found.append(np.array(members))
    return found


def find_objects(image) -> list[DetectedObject]:
    """The shapes in an image (any square size), largest first."""
    pixels = to_pixels(image)
    h, w, _ = pixels.shape
    if h != w:
        raise ValueError(f"image must be square; got {w}x{h}")
    unit = h / CANVAS  # pixels per 64-canvas pixel
    colors, coverage = coverage_map(pixels)
    found = []
    for index, color in enumerate(PALETTE):
        for members in _components(_close_open((colors == index) & (coverage >= MIN_COVERAGE))):
            if len(members) < MIN_AREA * unit**2:
                continue
            ys, xs = members[:, 0], members[:, 1]
            top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            box_w, box_h = right - left, bottom - top
            # the soft coverage of this colour within 2 px of the component: its blurred edge included
            window = np.s_[max(top - 2, 0):bottom + 2, max(left - 2, 0):right + 2]
            near = np.zeros(colors.shape, dtype=bool)
            near[ys, xs] = True
            near = _dilate(_dilate(near[window]))
            shape = _shape(coverage[window] * (colors[window] == index) * near)
            size = "small" if max(box_w, box_h) / unit < SIZE_SPLIT else "large"
            center = (float(left + right) / 2, float(top + bottom) / 2)
            found.append(DetectedObject(color, shape, size, _position(center, unit), center, len(members),
                                        (int(left), int(top), int(right), int(bottom))))
    return sorted(found, key=lambda o: -o.area)


def _moments(weights: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """Skewness and kurtosis of `values` under `weights`."""
    mean = (weights * values).sum()
    centred = values - mean
    variance = max((weights * centred**2).sum(), 1e-12)
    return (weights * centred**3).sum() / variance**1.5, (weights * centred**4).sum() / variance**2


def _shape(coverage: np.ndarray) -> str:
    """Circle, square or triangle from the soft coverage (h, w) of one shape (see the module docstring)."""
    weights = coverage / max(coverage.sum(), 1e-12)
    ys, xs = np.mgrid[:coverage.shape[0], :coverage.shape[1]].astype(np.float64)
    skew_y, kurt_y = _moments(weights, ys)
    if abs(skew_y) > TRIANGLE_SKEW:
        return "triangle"
    axes = kurt_y + _moments(weights, xs)[1]
    diagonals = _moments(weights, xs + ys)[1] + _moments(weights, xs - ys)[1]
    return "square" if (diagonals - axes) / 2 > SQUARE_KURTOSIS else "circle"


def _position(center: tuple[float, float], unit: float) -> str:
    dx, dy = (c / unit - CANVAS / 2 for c in center)
    if max(abs(dx), abs(dy)) < CENTER_RADIUS:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def relation(a: DetectedObject, b: DetectedObject) -> str:
    """Where a is relative to b: "above", "below", "to the left of" or "to the right of"."""
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
    if abs(dy) >= abs(dx):
        return "above" if dy > 0 else "below"
    return "to the left of" if dx > 0 else "to the right of"


_WEIGHTS = {"color": 8, "shape": 4, "size": 2, "position": 1}  # colour decides a match first


def _agreement(wanted: ShapeObject, found: DetectedObject | None) -> int:
    if found is None:
        return 0
    stated = [key for key in _WEIGHTS if getattr(wanted, key) is not None]
    return sum(_WEIGHTS[key] for key in stated if getattr(wanted, key) == getattr(found, key))


def score(image, label: ShapesLabel | str) -> dict:
    """Per-attribute correctness of an image against a label (or a caption, parsed with parse_caption).

    Returns {"count", "color", "shape", "size", "position", "relation": bool, or None when the label does not
    state that attribute; "fully_correct": all stated ones right; "objects": the detections}. An attribute is
    right when every label object that states it matches its assigned detection (a missing one is wrong)."""
    if isinstance(label, str):
        label = parse_caption(label)
    detected = find_objects(image)
    candidates = detected[:MAX_OBJECTS] + [None] * len(label.objects)
    best = max(itertools.permutations(candidates, len(label.objects)),
               key=lambda chosen: sum(_agreement(o, d) for o, d in zip(label.objects, chosen)))
    result = {"count": len(detected) == len(label.objects)}
    for key in _WEIGHTS:
        stated = [(o, d) for o, d in zip(label.objects, best) if getattr(o, key) is not None]
        result[key] = all(d is not None and getattr(d, key) == getattr(o, key) for o, d in stated) if stated else None
    result["relation"] = None
    if label.relation is not None:
        a, b = best[0], best[1]
        result["relation"] = a is not None and b is not None and relation(a, b) == label.relation
    result["fully_correct"] = all(v for v in result.values() if v is not None)
    result["objects"] = detected
    return result


