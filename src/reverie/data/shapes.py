"""Procedural shapes: one or two solid coloured shapes on white, with captions that are always true.

Vocabulary: colours red, green, blue, yellow; shapes circle, square, triangle; sizes small, large; positions
left, right, top, bottom, center; relations above, below, to the left of, to the right of. Captions:

    "a red circle", "a small blue square on the left", "a large green triangle in the center",
    "a red circle above a green triangle", "a yellow square to the left of a small blue circle"

Size and position words are each included with probability `detail`, so the model learns captions with and
without them. With `partial` > 0 that fraction of one-object captions names the colour alone ("a red shape") or
the shape alone ("a small triangle on the left"), so that colour and shape words are also seen apart.
Geometry is defined on a 64x64 canvas and scaled to `resolution`: small shapes span 12-16 px, large 24-28 px;
a single shape sits within 3 px of its position's anchor; two shapes (always of different colours) sit on a
vertical or horizontal line through the centre, each in its own half with >= 4 px between them, so the relation
is unambiguous. Images are drawn at 4x and box-filtered (anti-aliased edges).

Held-out split, for compositional generalization (see `heldout_combinations`):
  * colour+shape pairs red triangle, green square, blue circle never appear in any training image; every
    colour and every shape still does.
  * four two-object scenes never appear in training, in either phrasing ("A above B" is the same scene as
    "B below A"), although each object, each pair of objects and each relation does:
    yellow circle above green triangle, blue triangle to the left of red circle,
    red square below yellow triangle, green circle to the right of blue square.
Two-object scenes that show a held-out pair are held out too. `ShapesDataset(split="heldout")` draws only
held-out scenes: single shapes of the held-out pairs, the held-out scenes, and pairs showing a held-out pair
(`heldout_kind(label)` tells which). Never flip these images horizontally: left/right are in the captions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from .folder import check_resolution, to_tensor

PALETTE = {  # saturated, well apart in hue (0, 128, 229, 50 degrees) so a blurry sample still classifies
    "red": (220, 20, 20),
    "green": (20, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 200, 0),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (12, 16), "large": (24, 28)}  # side of the shape's bounding square, px on a 64 canvas
POSITIONS = {"center": (32, 32), "left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48)}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "center": "in the center"}
RELATIONS = ("above", "below", "to the left of", "to the right of")
INVERSE = {"above": "below", "below": "above", "to the left of": "to the right of", "to the right of": "to the left of"}
JITTER = 3  # px on a 64 canvas, around each anchor
CANVAS = 64  # the geometry's reference size
SUPERSAMPLE = 4

HELDOUT_COLOR_SHAPES = (("red", "triangle"), ("green", "square"), ("blue", "circle"))
HELDOUT_SCENES = (  # (colour A, shape A, relation, colour B, shape B): "a yellow circle above a green triangle"
    ("yellow", "circle", "above", "green", "triangle"),
    ("blue", "triangle", "to the left of", "red", "circle"),
    ("red", "square", "below", "yellow", "triangle"),
    ("green", "circle", "to the right of", "blue", "square"),
)
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class ShapeObject:
    """One shape; None means "not said" (a parsed caption leaves out what it does not mention)."""

    color: str | None = None  # one of COLORS
    shape: str | None = None  # one of SHAPES
    size: str | None = None  # "small" | "large"
    position: str | None = None  # one of POSITIONS


@dataclass(frozen=True)
class ShapesLabel:
    """What an image shows, in its caption's order: objects[0] `relation` objects[1]."""

    objects: tuple[ShapeObject, ...]  # one or two
    relation: str | None = None  # one of RELATIONS for two objects, else None


def heldout_combinations() -> dict[str, tuple]:
    """The combinations kept out of the training split: {"color_shapes": ((colour, shape), ...),
    "scenes": ((colour A, shape A, relation, colour B, shape B), ...)}."""
    return {"color_shapes": HELDOUT_COLOR_SHAPES, "scenes": HELDOUT_SCENES}


def heldout_kind(label: ShapesLabel) -> str | None:
    """Why a scene is held out: "color_shape" (it shows a held-out colour+shape pair), "scene" (it is a
    held-out two-object scene, in either phrasing), or None (it may appear in training)."""
    if any((o.color, o.shape) in HELDOUT_COLOR_SHAPES for o in label.objects):
        return "color_shape"
    if label.relation is None:
        return None
    a, b = label.objects
    scene = (a.color, a.shape, label.relation, b.color, b.shape)
    flipped = (b.color, b.shape, INVERSE[label.relation], a.color, a.shape)
    return "scene" if scene in HELDOUT_SCENES or flipped in HELDOUT_SCENES else None


def caption_of(label: ShapesLabel, with_size: tuple[bool, ...], with_position: bool = False,
               name: str = "both") -> str:
    """The caption saying `label`, with each object's size word where with_size[i] (and, for one object, its
    position phrase when with_position). name: "both" ("a red circle"), or for one object "color" ("a red shape")
    or "shape" ("a circle")."""
    if name != "both" and label.relation is not None:
        raise ValueError("caption_of: a two-object caption names both colour and shape of each object")
    nouns = {"both": lambda o: [o.color, o.shape], "color": lambda o: [o.color, "shape"], "shape": lambda o: [o.shape]}
    words = [" ".join(["a"] + [o.size] * s + nouns[name](o)) for o, s in zip(label.objects, with_size)]
    if label.relation is not None:
        return f"{words[0]} {label.relation} {words[1]}"
    return f"{words[0]} {POSITION_PHRASES[label.objects[0].position]}" if with_position else words[0]


_OBJECT = rf"an? (?:({'|'.join(SIZES)}) )?({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
# one object may also be named by its colour alone ("a red shape") or its shape alone ("a triangle")
_SINGLE = re.compile(rf"an? (?:({'|'.join(SIZES)}) )?(?:({'|'.join(COLORS)}) )?({'|'.join(SHAPES)}|shape)"
                     rf"(?: ({'|'.join(POSITION_PHRASES.values())}))?")
_PAIR = re.compile(rf"{_OBJECT} ({'|'.join(RELATIONS)}) {_OBJECT}")
_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASES.items()}


def parse_caption(caption: str) -> ShapesLabel:
    """The label a shapes caption states; attributes it does not mention are None. Raises ValueError for a
    caption outside the grammar "a [size] colour shape [position]" / "a [size] colour shape RELATION a ..." (one
    object may be "a [size] colour shape" or "a [size] shape-name": "a red shape", "a small triangle")."""
    text = " ".join(caption.lower().strip().rstrip(".").split())
    m = _SINGLE.fullmatch(text)
    if m and not (m[2] is None and m[3] == "shape"):  # "a shape" says nothing
        size, color, shape, phrase = m.groups()
        shape = None if shape == "shape" else shape
        return ShapesLabel((ShapeObject(color, shape, size, _PHRASE_TO_POSITION.get(phrase)),))
    if m := _PAIR.fullmatch(text):
        s1, c1, h1, relation, s2, c2, h2 = m.groups()
        return ShapesLabel((ShapeObject(c1, h1, s1), ShapeObject(c2, h2, s2)), relation)
    raise ValueError(f"caption {caption!r} is not a shapes caption: expected 'a [size] color shape [position]' or "
                     f"'a [size] color shape RELATION a [size] color shape' with size in {tuple(SIZES)}, color in "
                     f"{COLORS}, shape in {SHAPES}, position in {tuple(POSITION_PHRASES.values())}, "
                     f"relation in {RELATIONS}")


@dataclass(frozen=True)
class Placed:
    """A shape's colour, kind, centre and side on the 64 canvas."""

    color: str
    shape: str
    x: float
    y: float
    side: float


def _sample_scene(rng: np.random.Generator, split: str, two_object_fraction: float, detail: float):
    """(label, placed shapes, with_size, with_position) for one item of `split`: which detail words its caption
    says are drawn here too (see caption_of).

    train: any scene that is not held out (rejection sampling). heldout: a single shape of a held-out pair
    with probability 1 - two_object_fraction, else, half and half, a held-out scene or a two-object scene
    that shows a held-out pair."""
    two = rng.random() < two_object_fraction
    if split == "train":
        want = None
    elif two and rng.random() < 0.5:
        scene = HELDOUT_SCENES[rng.integers(len(HELDOUT_SCENES))]
        if rng.random() < 0.5:  # the same scene, said the other way round
            a_color, a_shape, relation, b_color, b_shape = scene
            scene = (b_color, b_shape, INVERSE[relation], a_color, a_shape)
        return _sample_pair(rng, detail, scene)
    else:
        want = "color_shape"
    while True:
        drawn = _sample_pair(rng, detail) if two else _sample_single(rng, detail)
        if heldout_kind(drawn[0]) == want:
            return drawn


def _sample_single(rng, detail):
    color, shape = COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
    size, position = list(SIZES)[rng.integers(len(SIZES))], list(POSITIONS)[rng.integers(len(POSITIONS))]
    side = float(rng.uniform(*SIZES[size]))
    ax, ay = POSITIONS[position]
    x, y = (float(np.clip(a + rng.uniform(-JITTER, JITTER), 1 + side / 2, CANVAS - 1 - side / 2)) for a in (ax, ay))
    label = ShapesLabel((ShapeObject(color, shape, size, position),))
    return label, [Placed(color, shape, x, y, side)], (rng.random() < detail,), rng.random() < detail


def _sample_pair(rng, detail, scene=None):
    if scene is None:
        ca, cb = (COLORS[i] for i in rng.choice(len(COLORS), size=2, replace=False))
        sa, sb = (SHAPES[i] for i in rng.integers(len(SHAPES), size=2))
        relation = RELATIONS[rng.integers(len(RELATIONS))]
    else:
        ca, sa, relation, cb, sb = scene
    za, zb = (list(SIZES)[i] for i in rng.integers(len(SIZES), size=2))
    first, second = (za, ca, sa), (zb, cb, sb)  # first is above / left of second in the picture
    if relation in ("below", "to the right of"):
        first, second = second, first
    vertical = relation in ("above", "below")
    placed, positions = [], ("top", "bottom") if vertical else ("left", "right")
    for (size, color, shape), half in zip((first, second), (0, 1)):
        side = float(rng.uniform(*SIZES[size]))
        if half == 0:  # along the line: anchor 16 (48) +- JITTER, inside the canvas and 2 px inside its half
            lo, hi, anchor = 1 + side / 2, CANVAS / 2 - 2 - side / 2, CANVAS / 4
        else:
            lo, hi, anchor = CANVAS / 2 + 2 + side / 2, CANVAS - 1 - side / 2, 3 * CANVAS / 4
        along = float(np.clip(anchor + rng.uniform(-JITTER, JITTER), lo, hi))
        across = CANVAS / 2 + float(rng.uniform(-JITTER, JITTER))
        x, y = (across, along) if vertical else (along, across)
        placed.append(Placed(color, shape, x, y, side))
    position = {first[1]: positions[0], second[1]: positions[1]}
    label = ShapesLabel((ShapeObject(ca, sa, za, position[ca]), ShapeObject(cb, sb, zb, position[cb])), relation)
    return label, placed, (rng.random() < detail, rng.random() < detail), False


def render(placed: list[Placed], resolution: int = 64) -> Image.Image:
    """Draw shapes on white at `resolution` (drawn at SUPERSAMPLE x and box-filtered)."""
    scale = resolution * SUPERSAMPLE / CANVAS
    big = Image.new("RGB", (resolution * SUPERSAMPLE,) * 2, (255, 255, 255))
    draw = ImageDraw.Draw(big)
    for p in placed:
        x, y, h = p.x * scale, p.y * scale, p.side * scale / 2
        box = (x - h, y - h, x + h, y + h)
        if p.shape == "circle":
            draw.ellipse(box, fill=PALETTE[p.color])
        elif p.shape == "square":
            draw.rectangle(box, fill=PALETTE[p.color])
        else:  # apex up, base = height = side: fills half its bounding square
            draw.polygon([(x, y - h), (x + h, y + h), (x - h, y + h)], fill=PALETTE[p.color])
    return big.resize((resolution, resolution), Image.BOX)


class ShapesDataset(Dataset):
    """`size` procedural images of one or two shapes, with captions (`captions[i]`) and ground truth
    (`labels[i]`, a ShapesLabel with every attribute filled in, objects in the caption's order).

    Item i depends only on (seed, split, i): same seed -> identical items in any access order."""

    def __init__(self, size: int = 10000, split: str = "train", seed: int = 0, resolution: int = 64,
                 two_object_fraction: float = 0.5, detail: float = 0.5, partial: float = 0.0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int; got {size!r}")
        for name, value in (("two_object_fraction", two_object_fraction), ("detail", detail), ("partial", partial)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1]; got {value!r}")
        self.split, self.seed, self.resolution = split, seed, check_resolution(resolution)
        self.labels: list[ShapesLabel] = []
        self.captions: list[str] = []
        self.placements: list[list[Placed]] = []  # the exact geometry of each item, for render()
        for i in range(size):
            rng = np.random.default_rng([seed, SPLITS.index(split), i])
            label, placed, with_size, with_position = _sample_scene(rng, split, two_object_fraction, detail)
            name = "both"
            if partial and len(label.objects) == 1:  # its own stream: partial=0 leaves every item as it was
                extra = np.random.default_rng([seed, SPLITS.index(split), i, 1])
                if extra.random() < partial:
                    name = ("color", "shape")[extra.integers(2)]
            caption = caption_of(label, with_size, with_position, name)
            self.labels.append(label)
            self.captions.append(caption)
            self.placements.append(placed)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Image.Image:
        """Item `index` as a PIL image."""
        return render(self.placements[index], self.resolution)

    def __getitem__(self, index: int) -> dict:
        return {"image": to_tensor(self.image(index)), "caption": self.captions[index]}
