"""Procedural moving shapes: short clips of one or two solid coloured shapes on white, with captions that are
always true, for text-to-video.

The shapes, colours, sizes and drawing are reverie.data.shapes' (its palette and `render`). Each shape has one
motion over the clip (time t = frame / (frames - 1) in [0, 1]):

    "moving left to right", "moving right to left"  x moves 30-40 px (on the 64 canvas) at constant speed
    "falling", "rising"                              y moves 30-40 px down / up at constant speed
    "bouncing"                                       up and down once: y = base - A sin(pi t), A = 24-32 px
    "growing", "shrinking"                           the side goes from 12-14 px to 26-28 px (or back), in place
    "turning <colour>"                               in place; the colour changes at the midpoint (t >= 1/2)
    "standing still"                                 in place; said explicitly or by no motion word at all

so the direction is unambiguous between any two frames. Captions:

    "a red circle moving left to right", "a blue square falling", "a small green triangle rising",
    "a yellow circle turning blue", "a large red square", "a red circle standing still",
    "a red circle moving left to right and a blue square falling"

A size word ("small" 12-16 px, "large" 24-28 px) is said with probability DETAIL for shapes whose size does not
change; an explicit "standing still" likewise. Two shapes have different colours (a turning shape's new colour is
neither of the other's) and their boxes stay >= GAP px apart at every moment (checked on a fine time grid, so an
item's scene does not depend on `frames`): their trajectories are drawn again until they fit, and the objects too
after PLACEMENT_TRIES. Pairs that rarely fit are rarer than the others: one shape moving across and one moving up
or down make about 4% of pairs (15% if all fitted), nearly all of them two small shapes. Frames are drawn at 4x
and box-filtered, as shapes.py does.

Held-out split, for compositional generalization (see `heldout_combinations`): the colour+shape+motion triples
blue triangle falling, red square rising, green circle moving right to left, yellow triangle growing and red
circle bouncing never appear in any training clip, although each colour, shape and motion does, and so does
each pair of them (blue triangles, blue shapes falling, triangles falling, ...). `MovingShapesDataset(
split="heldout")` draws only clips that show a held-out triple: a single shape, or (two_object_fraction) a pair
in which at least one shape is one. Never flip these clips horizontally or in time: directions are in the
captions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .folder import check_resolution, to_tensor
from .shapes import CANVAS, COLORS, SHAPES, SIZES, SPLITS, Placed, render

MOTIONS = ("moving left to right", "moving right to left", "falling", "rising", "bouncing", "growing",
           "shrinking", "turning", "standing still")
DIRECTIONAL = MOTIONS[:4] + ("growing", "shrinking")  # clips that play backwards show another motion
TRAVEL = (30.0, 40.0)  # px on the 64 canvas, moving / falling / rising
BOUNCE = (24.0, 32.0)  # px, the height of a bounce
GROW = ((12.0, 14.0), (26.0, 28.0))  # px, the side at the small and the large end of growing / shrinking
GAP = 4.0  # px between two shapes' boxes, at every moment
MARGIN = 2.0  # px between a shape's box and the canvas edge (the analyzer's closing grows shapes touching it)
DETAIL = 0.5  # probability of a size word (fixed-size shapes) and of an explicit "standing still"
TIME_GRID = 65  # moments at which two shapes are checked apart
PLACEMENT_TRIES = 20  # trajectories tried for two objects before other objects are drawn
HELDOUT_TRIPLES = (("blue", "triangle", "falling"), ("red", "square", "rising"),
                   ("green", "circle", "moving right to left"), ("yellow", "triangle", "growing"),
                   ("red", "circle", "bouncing"))


@dataclass(frozen=True)
class MovingObject:
    """One moving shape; size None means "not said" (or, growing / shrinking, no single size)."""

    color: str  # one of COLORS: its colour at the start
    shape: str  # one of SHAPES
    motion: str  # one of MOTIONS
    size: str | None = None  # "small" | "large"
    new_color: str | None = None  # "turning": the colour it turns to; otherwise None


@dataclass(frozen=True)
class MovingShapesLabel:
    """What a clip shows, in its caption's order."""

    objects: tuple[MovingObject, ...]  # one or two


@dataclass(frozen=True)
class Trajectory:
    """A shape's path on the 64 canvas: centre (x, y) and side linear in t from start to end values, minus
    bounce * sin(pi t) on y (up is -y); the colour becomes new_color from t = 1/2."""

    color: str
    shape: str
    x: tuple[float, float]
    y: tuple[float, float]
    side: tuple[float, float]
    bounce: float = 0.0
    new_color: str | None = None

    def geometry(self, t):
        """(x, y, side) at time(s) t in [0, 1] (a float or an array)."""
        x, y, side = (a + (b - a) * t for a, b in (self.x, self.y, self.side))
        return x, y - self.bounce * np.sin(np.pi * t), side

    def at(self, t: float) -> Placed:
        """The shape at time t in [0, 1]."""
        color = self.new_color if self.new_color is not None and t >= 0.5 else self.color
        return Placed(color, self.shape, *(float(v) for v in self.geometry(t)))


def heldout_combinations() -> dict[str, tuple]:
    """The combinations kept out of the training split: {"color_shape_motions": ((colour, shape, motion), ...)}."""
    return {"color_shape_motions": HELDOUT_TRIPLES}


def is_heldout(label: MovingShapesLabel) -> bool:
    """Whether a clip shows a held-out colour+shape+motion triple (then it is never in training)."""
    return any((o.color, o.shape, o.motion) in HELDOUT_TRIPLES for o in label.objects)


def motion_phrase(o: MovingObject) -> str:
    """The caption's words for an object's motion ("turning blue"; "standing still")."""
    return f"turning {o.new_color}" if o.motion == "turning" else o.motion


def caption_of(label: MovingShapesLabel, with_size: tuple[bool, ...], say_still: tuple[bool, ...]) -> str:
    """The caption saying `label`: object i with its size word where with_size[i] (and its size is known), and,
    standing still, with the words "standing still" where say_still[i]."""
    words = []
    for o, sized, still in zip(label.objects, with_size, say_still):
        noun = " ".join(["a"] + ([o.size] if sized and o.size is not None else []) + [o.color, o.shape])
        words.append(noun if o.motion == "standing still" and not still else f"{noun} {motion_phrase(o)}")
    return " and ".join(words)


_MOTION_WORDS = "|".join(m for m in MOTIONS if m != "turning") + f"|turning (?:{'|'.join(COLORS)})"
_OBJECT = rf"an? (?:({'|'.join(SIZES)}) )?({'|'.join(COLORS)}) ({'|'.join(SHAPES)})(?: ({_MOTION_WORDS}))?"
_CAPTION = re.compile(rf"{_OBJECT}(?: and {_OBJECT})?")


def parse_video_caption(caption: str) -> MovingShapesLabel:
    """The label a moving-shapes caption states (no motion word: "standing still"; size None when not said).
    Raises ValueError for a caption outside "a [size] colour shape [motion]" (" and " a second one)."""
    text = " ".join(caption.lower().strip().rstrip(".").split())
    m = _CAPTION.fullmatch(text)
    if m is None:
        raise ValueError(f"caption {caption!r} is not a moving-shapes caption: expected 'a [size] color shape "
                         f"[motion]', optionally ' and a [size] color shape [motion]', with size in {tuple(SIZES)}, "
                         f"color in {COLORS}, shape in {SHAPES}, motion in {MOTIONS[:-2]}, 'turning <color>' or "
                         f"'standing still'")
    objects = []
    for size, color, shape, phrase in (m.groups()[:4], m.groups()[4:]):
        if color is None:  # no second object
            continue
        phrase = phrase or "standing still"
        motion, new_color = ("turning", phrase.split()[1]) if phrase.startswith("turning") else (phrase, None)
        objects.append(MovingObject(color, shape, motion, size, new_color))
    return MovingShapesLabel(tuple(objects))


def _sample_object(rng: np.random.Generator, triple: tuple | None = None) -> MovingObject:
    """A random object, or one of the given (colour, shape, motion) with a random size and new colour."""
    if triple is None:
        triple = (COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))],
                  MOTIONS[rng.integers(len(MOTIONS))])
    color, shape, motion = triple
    size = None if motion in ("growing", "shrinking") else list(SIZES)[rng.integers(len(SIZES))]
    new_color = [c for c in COLORS if c != color][rng.integers(len(COLORS) - 1)] if motion == "turning" else None
    return MovingObject(color, shape, motion, size, new_color)


def _sample_path(rng: np.random.Generator, o: MovingObject) -> Trajectory:
    """A random trajectory on the 64 canvas that shows `o` (see the module docstring)."""
    if o.size is None:  # growing or shrinking
        sides = tuple(float(rng.uniform(*bounds)) for bounds in GROW)
        sides = sides if o.motion == "growing" else sides[::-1]
    else:
        sides = (float(rng.uniform(*SIZES[o.size])),) * 2
    half = max(sides) / 2
    lo, hi = MARGIN + half, CANVAS - MARGIN - half  # the centre's range

    def still() -> tuple[float, float]:
        value = float(rng.uniform(lo, hi))
        return value, value

    def travel() -> tuple[float, float]:
        distance = float(rng.uniform(TRAVEL[0], min(TRAVEL[1], hi - lo)))
        start = float(rng.uniform(lo, hi - distance))
        return start, start + distance

    x, y, bounce = still(), still(), 0.0
    if o.motion in ("moving left to right", "moving right to left"):
        x = travel() if o.motion == "moving left to right" else travel()[::-1]
    elif o.motion in ("falling", "rising"):
        y = travel() if o.motion == "falling" else travel()[::-1]
    elif o.motion == "bouncing":
        bounce = float(rng.uniform(BOUNCE[0], min(BOUNCE[1], hi - lo)))
        base = float(rng.uniform(lo + bounce, hi))
        y = (base, base)
    return Trajectory(o.color, o.shape, x, y, sides, bounce, o.new_color)


def _apart(a: Trajectory, b: Trajectory) -> bool:
    """Whether two shapes' boxes stay at least GAP px apart at every moment of the time grid."""
    t = np.linspace(0, 1, TIME_GRID)
    (xa, ya, sa), (xb, yb, sb) = a.geometry(t), b.geometry(t)
    reach = (sa + sb) / 2 + GAP
    return not ((np.abs(xa - xb) < reach) & (np.abs(ya - yb) < reach)).any()


def _colors(o: MovingObject) -> set[str]:
    return {o.color} | ({o.new_color} if o.new_color else set())


def _sample_clip(rng: np.random.Generator, split: str, two_object_fraction: float):
    """(label, trajectories) of one clip of `split`. train: any clip showing no held-out triple (rejection
    sampling). heldout: a held-out triple, alone or with a second random object (in random caption order).
    Two objects get up to PLACEMENT_TRIES trajectories each to stay apart before both are drawn again."""
    two = rng.random() < two_object_fraction
    while True:
        triple = HELDOUT_TRIPLES[rng.integers(len(HELDOUT_TRIPLES))] if split == "heldout" else None
        objects = [_sample_object(rng, triple)] + ([_sample_object(rng)] if two else [])
        if two and rng.random() < 0.5:
            objects.reverse()
        label = MovingShapesLabel(tuple(objects))
        if split == "train" and is_heldout(label) or two and _colors(objects[0]) & _colors(objects[1]):
            continue
        for _ in range(PLACEMENT_TRIES if two else 1):
            paths = [_sample_path(rng, o) for o in objects]
            if not two or _apart(*paths):
                return label, paths


class MovingShapesDataset(Dataset):
    """`size` procedural clips of one or two moving shapes: item i is {"video": FloatTensor (3, frames, H, W) in
    [-1, 1], "caption": str}; `clip(i)` its frames as PIL images, `label(i)` its MovingShapesLabel (every
    attribute filled in; size None for growing / shrinking), `captions[i]` its caption.

    Item i depends only on (seed, split, i), not on `frames` or `resolution` (which only sample and draw it):
    same seed -> identical items in any access order."""

    def __init__(self, size: int = 10000, split: str = "train", seed: int = 0, resolution: int = 64,
                 frames: int = 16, two_object_fraction: float = 0.3):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int; got {size!r}")
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 3:
            raise ValueError(f"frames must be an int >= 3 (a bounce needs a middle); got {frames!r}")
        if not 0 <= two_object_fraction <= 1:
            raise ValueError(f"two_object_fraction must be in [0, 1]; got {two_object_fraction!r}")
        self.split, self.seed, self.resolution, self.frames = split, seed, check_resolution(resolution), frames
        self.labels: list[MovingShapesLabel] = []
        self.captions: list[str] = []
        self.trajectories: list[list[Trajectory]] = []  # the exact geometry of each item, for render()
        for i in range(size):
            rng = np.random.default_rng([seed, SPLITS.index(split), i])
            label, paths = _sample_clip(rng, split, two_object_fraction)
            n = len(label.objects)
            with_size, say_still = (tuple(bool(b) for b in rng.random(n) < DETAIL) for _ in range(2))
            self.labels.append(label)
            self.captions.append(caption_of(label, with_size, say_still))
            self.trajectories.append(paths)

    def __len__(self) -> int:
        return len(self.labels)

    def label(self, index: int) -> MovingShapesLabel:
        return self.labels[index]

    def clip(self, index: int) -> list[Image.Image]:
        """Item `index` as `frames` PIL images, frame k at t = k / (frames - 1)."""
        times = np.linspace(0, 1, self.frames)
        return [render([p.at(t) for p in self.trajectories[index]], self.resolution) for t in times]

    def __getitem__(self, index: int) -> dict:
        video = torch.stack([to_tensor(frame) for frame in self.clip(index)], 1)  # (3, frames, H, W)
        return {"video": video, "caption": self.captions[index]}
