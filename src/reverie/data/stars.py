"""A shape the shipped shapes model has never seen — a five-pointed star — for teaching it with a LoRA.

    StarsDataset(size=50)  ->  "a red star", "a small blue star on the left", "a large yellow star at the top"

The geometry follows reverie.data.shapes (64x64 canvas, small 12-16 px and large 24-28 px, the five anchors with
3 px of jitter, 4x supersampling) and so do the colours (its palette), so that the words the model knows keep their
meaning and only "star" is new; the star's inner radius is 0.45 of its outer one. (A new colour cannot be taught
by a LoRA of the UNet: the frozen shapes VAE, trained on the four palette colours, decodes purple (140, 40, 200) as
blue, mean (51, 94, 209).) `score_star` reads an image independently of any model: the largest shape's colour by
the shapes analyzer (reverie.eval.shapes), and whether it is a star: the largest blob's outline, as its radius
against the angle around its centroid, has five-fold symmetry — the 5th Fourier harmonic of that profile is over
STAR_HARMONIC of its mean and above the 3rd (triangles) and 4th (squares). The data set's stars give 0.08-0.2,
circles 0, squares and triangles of the shapes data at most 0.048 (400 held-out images), the shipped model's
images of shapes captions at most 0.035.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from .folder import check_resolution, to_tensor
from .shapes import CANVAS, COLORS, JITTER, PALETTE, POSITION_PHRASES, POSITIONS, SIZES, SUPERSAMPLE, ShapesDataset

INNER = 0.45  # inner / outer radius
STAR_HARMONIC = 0.05  # the outline's 5th harmonic over its mean radius above which (and the 3rd's and 4th's) a star
PROFILE_BINS = 72  # angle bins of the radius profile


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


def outline_harmonics(mask: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """|FFT| of a blob's radius profile (the farthest pixel from the weighted centroid in each of PROFILE_BINS angle
    bins; an empty bin takes its larger neighbour's), divided by its mean: harmonic k measures k-fold symmetry."""
    ys, xs = np.nonzero(mask)
    w = weights[ys, xs]
    cy, cx = (ys * w).sum() / w.sum(), (xs * w).sum() / w.sum()
    bins = ((np.arctan2(ys - cy, xs - cx) + np.pi) / (2 * np.pi) * PROFILE_BINS).astype(int) % PROFILE_BINS
    profile = np.zeros(PROFILE_BINS)
    np.maximum.at(profile, bins, np.hypot(ys - cy, xs - cx))
    for i in range(PROFILE_BINS):
        if profile[i] == 0:
            profile[i] = max(profile[i - 1], profile[(i + 1) % PROFILE_BINS])
    spectrum = np.abs(np.fft.rfft(profile))
    return spectrum / max(spectrum[0], 1e-9)


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
    """{"color": the largest shape the shapes analyzer finds has `color`, "shape": the largest blob of coloured
    pixels (max - min channel over 80) is a star by its outline's harmonics, "fully_correct": both}."""
    from ..eval.shapes import find_objects

    objects = find_objects(image)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    saturation = rgb.max(-1) - rgb.min(-1)
    mask = _largest_blob(saturation > 80)
    if not objects or mask.sum() < 12:
        return {"color": False, "shape": False, "fully_correct": False}
    h = outline_harmonics(mask, saturation)
    ok_color, ok_shape = objects[0].color == color, bool(h[5] > STAR_HARMONIC and h[5] > max(h[3], h[4]))
    return {"color": ok_color, "shape": ok_shape, "fully_correct": ok_color and ok_shape}
