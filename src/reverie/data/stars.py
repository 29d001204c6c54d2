"""A shape the shipped shapes model has never seen — a five-pointed star — for teaching it with a LoRA.

    StarsDataset(size=50)  ->  "a red star", "a small blue star on the left", "a large yellow star at the top"

The geometry follows reverie.data.shapes (64x64 canvas, small 12-16 px and large 24-28 px, the five anchors with
3 px of jitter, 4x supersampling) and so do the colours (its palette), so that the words the model knows keep their
meaning and only "star" is new; the star's inner radius is 0.45 of its outer one. (A new colour cannot be taught
by a LoRA of the UNet: the frozen shapes VAE, trained on the four palette colours, decodes purple (140, 40, 200) as
blue, mean (51, 94, 209).) `score_star` reads an image independently of any model: the largest shape's colour by
the shapes analyzer (reverie.eval.shapes), and whether it is a star (solidity, its area over its convex hull's,
below 0.8: a circle, square or triangle is above 0.9, this star about 0.6)?
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from .folder import check_resolution, to_tensor
from .shapes import CANVAS, COLORS, JITTER, PALETTE, POSITION_PHRASES, POSITIONS, SIZES, SUPERSAMPLE, ShapesDataset

INNER = 0.45  # inner / outer radius
STAR_SOLIDITY = 0.8  # below: a star; circles, squares and triangles are above 0.9


def star_points(x: float, y: float, radius: float) -> list[tuple[float, float]]:
    """The ten corners of a five-pointed star centred on (x, y), one point straight up."""
    out = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * INNER
        angle = -math.pi / 2 + k * math.pi / 5
        out.append((x + r * math.cos(angle), y + r * math.sin(angle)))
    return out


class StarsDataset(Dataset):
    """`size` images of one star of a palette colour (sizes and positions as the shapes data set), with captions
    naming its size and position each with probability `detail`, then `shapes` training images of the shapes data
    set. Item i depends only on (seed, i)."""

    def __init__(self, size: int = 50, seed: int = 0, resolution: int = 64, detail: float = 0.5, shapes: int = 0):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int; got {size!r}")
        if not isinstance(shapes, int) or shapes < 0:
            raise ValueError(f"shapes must be an int >= 0; got {shapes!r}")
        self.resolution = check_resolution(resolution)
        # DreamBooth's prior preservation / kohya's regularization images: training images of what the model
        # already draws, after the stars, so that teaching the star does not unteach the rest
        self.prior = ShapesDataset(size=shapes, seed=seed + 1, resolution=resolution) if shapes else None
        self.items = []
        for i in range(size):
            rng = np.random.default_rng([seed, 7, i])
            color = COLORS[rng.integers(len(COLORS))]
            size_word = list(SIZES)[rng.integers(len(SIZES))]
            position = list(POSITIONS)[rng.integers(len(POSITIONS))]
            side = float(rng.uniform(*SIZES[size_word]))
            x, y = (float(np.clip(a + rng.uniform(-JITTER, JITTER), 1 + side / 2, CANVAS - 1 - side / 2))
                    for a in POSITIONS[position])
            words = [size_word] if rng.random() < detail else []
            caption = f"a {' '.join(words + [color, 'star'])}"
            if rng.random() < detail:
                caption += f" {POSITION_PHRASES[position]}"
            self.items.append((caption, color, x, y, side))

    def __len__(self) -> int:
        return len(self.items) + (len(self.prior) if self.prior is not None else 0)

    def image(self, index: int) -> Image.Image:
        if index >= len(self.items):
            return self.prior.image(index - len(self.items))
        _, color, x, y, side = self.items[index]
        scale = self.resolution * SUPERSAMPLE / CANVAS
        big = Image.new("RGB", (self.resolution * SUPERSAMPLE,) * 2, (255, 255, 255))
        ImageDraw.Draw(big).polygon(star_points(x * scale, y * scale, side * scale / 2), fill=PALETTE[color])
        return big.resize((self.resolution, self.resolution), Image.BOX)

    def caption(self, index: int) -> str:
        return self.items[index][0] if index < len(self.items) else self.prior.captions[index - len(self.items)]

    def color(self, index: int) -> str:
        """The colour of star `index`."""
        return self.items[index][1]

    def __getitem__(self, index: int) -> dict:
        return {"image": to_tensor(self.image(index)), "caption": self.caption(index)}


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (N, 2) points (Andrew's monotone chain, then the shoelace formula)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def half(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and (out[-1][0] - out[-2][0]) * (p[1] - out[-2][1]) - \
                    (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0]) <= 0:
                out.pop()
            out.append(p)
        return out

    hull = half(pts)[:-1] + half(reversed(pts))[:-1]
    xs, ys = np.array([p[0] for p in hull], float), np.array([p[1] for p in hull], float)
    return 0.5 * abs(float(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean image."""
    seen = np.zeros_like(mask)
    best: list = []
    H, W = mask.shape
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, blob = [start], []
        while stack:
            y, x = stack.pop()
            blob.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    v, u = y + dy, x + dx
                    if 0 <= v < H and 0 <= u < W and mask[v, u] and not seen[v, u]:
                        seen[v, u] = True
                        stack.append((v, u))
        if len(blob) > len(best):
            best = blob
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def score_star(image: Image.Image, color: str) -> dict:
    """{"color": the largest shape the shapes analyzer finds has `color`, "shape": the largest blob of non-white
    pixels is a star (solidity below STAR_SOLIDITY), "fully_correct": both}."""
    from ..eval.shapes import find_objects

    objects = find_objects(image)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    mask = _largest_blob((255 * 3 - rgb.sum(-1)) > 150)  # clearly not background, the biggest 8-connected part
    if not objects or mask.sum() < 12:
        return {"color": False, "shape": False, "fully_correct": False}
    ys, xs = np.nonzero(mask)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    solidity = mask.sum() / max(_hull_area(corners), 1.0)
    ok_color, ok_shape = objects[0].color == color, bool(solidity < STAR_SOLIDITY)
    return {"color": ok_color, "shape": ok_shape, "fully_correct": ok_color and ok_shape}
