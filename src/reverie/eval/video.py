"""Reads a moving-shapes clip back into tracked shapes, scores it against a caption, and evaluates a text-to-video
pipeline on held-out captions (reverie.data.moving_shapes).

Every frame is read by the shapes analyzer (reverie.eval.shapes.find_objects: colour, shape, size and box of each
connected component). Detections are linked frame to frame into tracks: greedily by least cost, where the cost is
the distance between box centres plus COLOR_COST when the colours differ (a shape keeps its colour where it can;
a turning one still links) and a link longer than MAX_STEP is never made. Lengths are on a 64 canvas, scaled.

A track's motion is read from its first and last frames (time = frame order):
    growing / shrinking   the side (square root of the area) ends at least GROW_RATIO times larger / smaller
    standing still        the centre never strays STILL_DRIFT px from where it started, the side within SIZE_RATIO
    moving / falling ...  the net displacement is at least MIN_TRAVEL px, at least twice the other axis'
    bouncing              the highest point is at least MIN_BOUNCE px above both ends, which are within MIN_TRAVEL
anything else is no motion of the vocabulary. Colour and shape are each track's most common ones ("turning":
its colour over the first and over the last third of the frames).

    score_clip(frames, "a red circle moving left to right")["fully_correct"]
    evaluate_video(pipe, video_captions("heldout", 200), steps=20, guidance_scale=5, sampler="euler", seed=0,
                   frames=17)
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from ..data.moving_shapes import MovingObject, MovingShapesDataset, MovingShapesLabel, parse_video_caption
from ..data.shapes import CANVAS
from .plot import image_grid
from .shapes import MAX_OBJECTS, DetectedObject, find_objects, to_pixels

MAX_STEP = 32.0  # px: the farthest a centre moves between frames and stays one track (data set: <= 7 at 16 frames)
COLOR_COST = 8.0  # px: what linking to another colour costs over linking to the same one
MIN_TRAVEL = 15.0  # px net displacement for moving / falling / rising (data set: 30-40)
MIN_BOUNCE = 12.0  # px up from both ends for bouncing (data set: 24-32)
STILL_DRIFT = 4.0  # px: the speed threshold of "standing still" (data set: 0; a moving shape goes 30+)
GROW_RATIO = 1.4  # side at the end over side at the start for growing (data set: about 2)
SIZE_RATIO = 1.25  # a shape neither growing nor shrinking keeps its side within this ratio (data set: < 1.1)
FLICKER_STD = 0.02  # mean per-pixel standard deviation over time of the background, on 0..1 (data set: 0)
BACKGROUND_MARGIN = 2.0  # px around every detection's box that is not background (its blurred edge)
KEYS = ("count", "motion", "color", "shape", "size", "constancy", "flicker")

Track = tuple  # per frame: the shape's DetectedObject, or None in frames where it was not linked


def _frames(frames) -> list:
    """A clip as a list of frames: a list of images (PIL, (H, W, 3) uint8, (3, H, W) tensors) or one (3, F, H, W)
    tensor in [-1, 1] (MovingShapesDataset's "video")."""
    if isinstance(frames, torch.Tensor):
        if frames.ndim != 4 or frames.shape[0] != 3:
            raise ValueError(f"frames tensor must be (3, frames, H, W) in [-1, 1]; got shape {tuple(frames.shape)}")
        frames = frames.unbind(1)
    frames = list(frames)
    if len(frames) < 2:
        raise ValueError(f"frames: a clip needs at least 2 frames; got {len(frames)}")
    return frames


def _distance(a: DetectedObject, b: DetectedObject) -> float:
    return float(np.hypot(a.center[0] - b.center[0], a.center[1] - b.center[1]))


def link(detections: list[list[DetectedObject]], unit: float) -> list[Track]:
    """Tracks through per-frame detections (see the module docstring), longest first."""
    tracks: list[list] = []
    for f, found in enumerate(detections):
        last = [next(d for d in reversed(t) if d is not None) for t in tracks]
        costs = sorted((_distance(p, d) + COLOR_COST * unit * (p.color != d.color), j, k)
                       for j, p in enumerate(last) for k, d in enumerate(found) if _distance(p, d) <= MAX_STEP * unit)
        taken_tracks, taken = set(), set()
        for _, j, k in costs:
            if j not in taken_tracks and k not in taken:
                tracks[j].append(found[k])
                taken_tracks.add(j)
                taken.add(k)
        for j in set(range(len(last))) - taken_tracks:
            tracks[j].append(None)
        tracks += [[None] * f + [d] for k, d in enumerate(found) if k not in taken]
    return sorted((tuple(t) for t in tracks), key=lambda t: -sum(d is not None for d in t))


def analyze_clip(frames) -> dict:
    """{"detections": per frame, find_objects' shapes; "tracks": the shapes linked across frames (tuples with
    one detection or None per frame), longest first; "unit": pixels per 64-canvas pixel}."""
    frames = _frames(frames)
    detections = [find_objects(frame) for frame in frames]
    unit = to_pixels(frames[0]).shape[0] / CANVAS
    return {"detections": detections, "tracks": link(detections, unit), "unit": unit}


def track_motion(track: Track, unit: float) -> str | None:
    """The spatial motion of a track (see the module docstring): one of the data set's motions except "turning"
    (a turning shape stands still), or None."""
    seen = [d for d in track if d is not None]
    if len(seen) < 2:
        return None
    x, y = (np.array([d.center[i] for d in seen]) / unit for i in (0, 1))
    side = np.sqrt([d.area for d in seen]) / unit  # steadier than the box: a thin apex comes and goes
    dx, dy, ratio = x[-1] - x[0], y[-1] - y[0], side[-1] / side[0]
    if ratio >= GROW_RATIO or ratio <= 1 / GROW_RATIO:
        stays = max(abs(dx), abs(dy)) < MIN_TRAVEL
        return ("growing" if ratio > 1 else "shrinking") if stays else None
    if side.max() / side.min() > SIZE_RATIO:
        return None
    if np.hypot(x - x[0], y - y[0]).max() < STILL_DRIFT:
        return "standing still"
    if abs(dx) >= MIN_TRAVEL and abs(dy) <= abs(dx) / 2:
        return "moving left to right" if dx > 0 else "moving right to left"
    if abs(dy) >= MIN_TRAVEL and abs(dx) <= abs(dy) / 2:
        return "falling" if dy > 0 else "rising"
    if max(abs(dx), abs(dy)) < MIN_TRAVEL and min(y[0], y[-1]) - y.min() >= MIN_BOUNCE:
        return "bouncing"
    return None


def _mode(values) -> str:
    return Counter(values).most_common(1)[0][0]


def _colors(track: Track) -> tuple[str, str, str]:
    """(most common colour, most common in the first third, most common in the last third) of a track."""
    colors = [d.color for d in track if d is not None]
    third = max(len(colors) // 3, 1)
    return _mode(colors), _mode(colors[:third]), _mode(colors[-third:])


def _object_scores(o: MovingObject, track: Track | None, unit: float) -> dict:
    """Per-attribute correctness of one label object against its track (all wrong when it has none)."""
    if track is None:
        return {"motion": False, "color": False, "shape": False, "size": False if o.size else None,
                "constancy": False}
    seen = [d for d in track if d is not None]
    common, first, last = _colors(track)
    colors = [d.color for d in seen]
    changes = sum(a != b for a, b in zip(colors, colors[1:]))
    turning = o.motion == "turning"
    motion = track_motion(track, unit)
    return {"motion": motion == ("standing still" if turning else o.motion),
            "color": (first == o.color and last == o.new_color) if turning else common == o.color,
            "shape": _mode(d.shape for d in seen) == o.shape,
            "size": _mode(d.size for d in seen) == o.size if o.size else None,
            "constancy": len({d.shape for d in seen}) == 1 and changes <= (1 if turning else 0)}


def _agreement(o: MovingObject, track: Track | None, unit: float) -> int:
    if track is None:
        return 0
    _, first, _ = _colors(track)
    motion = track_motion(track, unit)
    return (8 * (first == o.color) + 4 * (_mode(d.shape for d in track if d is not None) == o.shape)
            + 2 * (motion == ("standing still" if o.motion == "turning" else o.motion)))


def background_std(frames, detections: list[list[DetectedObject]], unit: float) -> float | None:
    """Mean over background pixels (outside every detection's box, widened by BACKGROUND_MARGIN, in every
    frame) of each pixel's standard deviation over time, on 0..1; None when no pixel is background."""
    pixels = np.stack([to_pixels(frame) for frame in frames])  # (F, H, W, 3)
    background = np.ones(pixels.shape[1:3], dtype=bool)
    margin = int(np.ceil(BACKGROUND_MARGIN * unit))
    for d in itertools.chain.from_iterable(detections):
        left, top, right, bottom = d.box
        background[max(top - margin, 0):bottom + margin, max(left - margin, 0):right + margin] = False
    return float(pixels.std(0)[background].mean()) if background.any() else None


def score_clip(frames, label: MovingShapesLabel | str) -> dict:
    """Per-attribute correctness of a clip against a label (or a caption, parsed with parse_video_caption).

    Returns {"count": every frame shows exactly as many shapes as the label; "motion", "color", "shape",
    "constancy" (shape, and colour except for one change to a turning shape's new colour, the same in every
    frame), "size" (None when no object states one): right for every label object on the track assigned to it;
    "flicker": the background's std over time is below FLICKER_STD (None when nothing is background);
    "fully_correct": all of those that are not None; "tracks", "background_std"}. Label objects are assigned to
    the tracks seen in at least half the frames, agreeing on most of colour, shape and motion (colour first)."""
    if isinstance(label, str):
        label = parse_video_caption(label)
    frames = _frames(frames)
    clip = analyze_clip(frames)
    unit, tracks = clip["unit"], clip["tracks"]
    lasting = [t for t in tracks if 2 * sum(d is not None for d in t) >= len(frames)][:MAX_OBJECTS]
    candidates = lasting + [None] * len(label.objects)
    best = max(itertools.permutations(candidates, len(label.objects)),
               key=lambda chosen: sum(_agreement(o, t, unit) for o, t in zip(label.objects, chosen)))
    per_object = [_object_scores(o, t, unit) for o, t in zip(label.objects, best)]
    result = {"count": all(len(found) == len(label.objects) for found in clip["detections"])}
    for key in ("motion", "color", "shape", "size", "constancy"):
        stated = [s[key] for s in per_object if s[key] is not None]
        result[key] = all(stated) if stated else None
    spread = background_std(frames, clip["detections"], unit)
    result["flicker"] = None if spread is None else spread < FLICKER_STD
    result["fully_correct"] = all(result[key] for key in KEYS if result[key] is not None)
    return result | {"tracks": tracks, "background_std": spread}


def video_captions(split: str = "heldout", n: int = 200, seed: int = 1) -> list[str]:
    """n captions of the moving-shapes split (held-out combinations by default), one- and two-object."""
    return list(MovingShapesDataset(size=n, split=split, seed=seed).captions)


def generate_clips(pipe, captions: list[str], *, steps: int = 20, guidance_scale: float = 7.5,
                   sampler: str | None = None, seed: int = 0, frames: int = 16, resolution: int = 64,
                   batch_size: int = 8) -> list[list]:
    """One clip (a list of PIL frames) per caption, caption i at seed + i, at resolution x resolution."""
    clips = []
    for start in range(0, len(captions), batch_size):
        batch = captions[start:start + batch_size]
        result = pipe(prompt=batch, num_frames=frames, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                      width=resolution, height=resolution, seed=[seed + start + i for i in range(len(batch))],
                      progress=False)
        clips += result.frames
    return clips


def evaluate_video(pipe, captions: list[str], *, steps: int = 20, guidance_scale: float = 7.5,
                   sampler: str | None = None, seed: int = 0, frames: int = 16, resolution: int = 64,
                   batch_size: int = 8) -> dict:
    """Fraction of clips right per attribute (KEYS) and fully correct: over all captions ("motion", ...) and
    for one- and two-object captions ("one/motion", "two/motion", ...), with "n", "n_one", "n_two". Attributes a
    caption does not state are not scored. Clip i uses seed + i."""
    clips = generate_clips(pipe, captions, steps=steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed,
                           frames=frames, resolution=resolution, batch_size=batch_size)
    hits, totals = defaultdict(int), defaultdict(int)
    for caption, clip in zip(captions, clips):
        scores = score_clip(clip, caption)
        group = "two" if len(parse_video_caption(caption).objects) == 2 else "one"
        for key in (*KEYS, "fully_correct"):
            if scores[key] is not None:
                for where in (group, "all"):
                    hits[where, key] += bool(scores[key])
                    totals[where, key] += 1
    rates = {(key if where == "all" else f"{where}/{key}"): hits[where, key] / totals[where, key]
             for where, key in sorted(totals)}
    counts = {"n": len(captions), "n_one": totals["one", "fully_correct"], "n_two": totals["two", "fully_correct"]}
    return rates | counts


GRID_CAPTIONS = ("a red circle moving left to right", "a blue square falling", "a green triangle rising",
                 "a yellow circle bouncing", "a red square growing", "a blue circle shrinking",
                 "a green square turning yellow", "a red circle moving left to right and a blue square falling")


def frame_grid(videos: list[list], path, frames_shown: int = 8) -> Path:
    """A PNG with one row per clip: `frames_shown` of its frames, evenly spaced from the first to the last."""
    if not videos:
        raise ValueError("videos: give at least one clip")
    rows = []
    for frames in videos:
        picks = np.linspace(0, len(frames) - 1, frames_shown).round().astype(int)
        rows += [frames[k] for k in picks]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, frames_shown).save(path)
    return path
