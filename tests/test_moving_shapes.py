"""The moving_shapes video data set, its clip analyzer, evaluate_video and `reverie eval --data moving_shapes`."""

import dataclasses
import itertools
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from reverie.data import make_dataset
from reverie.data.moving_shapes import (
    COLORS,
    DIRECTIONAL,
    MOTIONS,
    SHAPES,
    MovingShapesDataset,
    caption_of,
    heldout_combinations,
    is_heldout,
    parse_video_caption,
)
from reverie.data.shapes import render
from reverie.eval.video import GRID_CAPTIONS, evaluate_video, frame_grid, score_clip, video_captions


def _by_motion(ds: MovingShapesDataset, per_motion: int, pairs: int) -> list[int]:
    """Indices of `per_motion` one-object clips of every motion the split has, and of `pairs` two-object ones."""
    chosen, counts = [], {}
    for i, label in enumerate(ds.labels):
        key = label.objects[0].motion if len(label.objects) == 1 else "pair"
        if counts.get(key, 0) < (pairs if key == "pair" else per_motion):
            counts[key] = counts.get(key, 0) + 1
            chosen.append(i)
    return chosen


def _frames_of(ds: MovingShapesDataset, i: int, **changes) -> list[Image.Image]:
    """Clip i redrawn with every shape's trajectory changed (dataclasses.replace)."""
    paths = [dataclasses.replace(p, **changes) for p in ds.trajectories[i]]
    return [render([p.at(t) for p in paths], ds.resolution) for t in np.linspace(0, 1, ds.frames)]


# --- the data set ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "heldout"])
def test_same_seed_same_items_in_any_order_and_frames_only_sample_the_scene(split):
    a, b = MovingShapesDataset(size=12, split=split, seed=3), MovingShapesDataset(size=12, split=split, seed=3)
    forward = [a[i] for i in range(12)]
    for i in reversed(range(12)):
        item = b[i]
        assert torch.equal(item["video"], forward[i]["video"]) and item["caption"] == forward[i]["caption"]
    assert a.labels == b.labels and MovingShapesDataset(size=20, split=split, seed=3).captions[:12] == a.captions
    assert MovingShapesDataset(size=12, split=split, seed=4).captions != a.captions
    # frames and resolution sample and draw the same scene: same captions, same first and last frame
    long = MovingShapesDataset(size=12, split=split, seed=3, frames=32)
    assert long.captions == a.captions and long.labels == a.labels
    assert torch.equal(long[5]["video"][:, [0, -1]], forward[5]["video"][:, [0, -1]])


def test_items_are_videos_in_range_and_options_are_checked():
    ds = make_dataset("moving_shapes", size=4, seed=0, resolution=32, frames=9, two_object_fraction=0.5)
    item = ds[0]
    assert set(item) == {"video", "caption"} and isinstance(item["caption"], str)
    video = item["video"]
    assert video.dtype == torch.float32 and video.shape == (3, 9, 32, 32)
    assert video.min() >= -1 and video.max() <= 1 and video.min() < 0 and video.max() == 1  # shapes on white
    assert len(ds.clip(0)) == 9 and ds.clip(0)[0].size == (32, 32) and ds.label(0) == ds.labels[0]
    for bad, field in (({"split": "test"}, "split"), ({"frames": 2}, "frames"), ({"size": 0}, "size"),
                       ({"two_object_fraction": 1.5}, "two_object_fraction"), ({"resolution": 4}, "resolution")):
        with pytest.raises(ValueError, match=field):
            MovingShapesDataset(**bad)
    with pytest.raises(ValueError, match="detail"):
        make_dataset("moving_shapes", detail=0.5)


def test_heldout_split_is_disjoint_from_training_which_still_sees_every_part():
    triples = set(heldout_combinations()["color_shape_motions"])
    train = MovingShapesDataset(size=3000, split="train", seed=0)
    seen = [(o.color, o.shape, o.motion) for c in train.captions for o in parse_video_caption(c).objects]
    assert not set(seen) & triples
    # every colour, shape and motion, and every pair of them, appears in training
    for i, j in itertools.combinations(range(3), 2):
        assert {(t[i], t[j]) for t in seen} == set(itertools.product(*[(COLORS, SHAPES, MOTIONS)[k] for k in (i, j)]))
    heldout = MovingShapesDataset(size=300, split="heldout", seed=0)
    assert all(is_heldout(parse_video_caption(c)) for c in heldout.captions)
    assert {t for c in heldout.captions for o in parse_video_caption(c).objects
            if (t := (o.color, o.shape, o.motion)) in triples} == triples
    counts = [len(label.objects) for label in heldout.labels]
    assert 0.2 < counts.count(2) / len(counts) < 0.4  # two_object_fraction 0.3
    # two shapes never share a colour, a turning one's new colour included
    for label in train.labels + heldout.labels:
        if len(label.objects) == 2:
            a, b = ({o.color, o.new_color} - {None} for o in label.objects)
            assert not a & b


def test_parse_video_caption_round_trip():
    ds = MovingShapesDataset(size=400, split="train", seed=2)
    for caption, label in zip(ds.captions, ds.labels):
        parsed = parse_video_caption(caption)
        said = tuple(o.size is not None for o in parsed.objects)
        still = tuple("standing still" in part for part in caption.split(" and "))
        assert caption_of(parsed, said, still) == caption
        # the caption says everything but, sometimes, the size
        assert parsed.objects == tuple(o if s else dataclasses.replace(o, size=None)
                                       for o, s in zip(label.objects, said))
    label = parse_video_caption("A small Red circle moving left to right and a blue square turning yellow.")
    assert [(o.size, o.color, o.shape, o.motion, o.new_color) for o in label.objects] == [
        ("small", "red", "circle", "moving left to right", None), (None, "blue", "square", "turning", "yellow")]
    assert parse_video_caption("a red circle").objects[0].motion == "standing still"
    for bad in ("a purple circle falling", "a red circle flying", "a red circle falling and", "a red shape falling",
                "a red circle turning"):
        with pytest.raises(ValueError, match="moving-shapes caption"):
            parse_video_caption(bad)


# --- the analyzer ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("frames", [16, 32])
def test_analyzer_reads_every_clip_of_the_data_set_as_fully_correct(frames):
    per_motion, pairs, heldout = (2, 6, 12) if frames == 16 else (1, 2, 5)
    for split, n in (("train", None), ("heldout", heldout)):
        ds = MovingShapesDataset(size=300, split=split, seed=5, frames=frames)
        indices = _by_motion(ds, per_motion, pairs) if n is None else list(range(n))
        for i in indices:
            scores = score_clip(ds.clip(i), ds.captions[i])
            wrong = [k for k, v in scores.items() if v is False]
            assert scores["fully_correct"], (split, i, ds.captions[i], wrong)
        assert score_clip(ds[indices[0]]["video"], ds.labels[indices[0]])["fully_correct"]  # a tensor, a label


def test_analyzer_rejects_reversed_still_recoloured_reshaped_and_flickering_clips():
    ds = MovingShapesDataset(size=200, split="train", seed=6, frames=9, two_object_fraction=0.2)
    chosen = _by_motion(ds, 2, 3)
    moving = [i for i in chosen if any(o.motion not in ("standing still", "turning") for o in ds.labels[i].objects)]
    for i in chosen:
        label, clip = ds.labels[i], ds.clip(i)
        directional = any(o.motion in DIRECTIONAL for o in label.objects)
        assert score_clip(clip[::-1], label)["motion"] is (not directional), ds.captions[i]
        if i in moving:
            assert score_clip([clip[0]] * len(clip), label)["motion"] is False, ds.captions[i]
        others = [c for c in COLORS if all(c not in (o.color, o.new_color) for o in label.objects)]
        assert score_clip(_frames_of(ds, i, color=others[0]), label)["color"] is False, ds.captions[i]
    # a shape that changes halfway; a background that flickers
    i = chosen[0]
    other = next(s for s in SHAPES if s != ds.labels[i].objects[0].shape)
    reshaped = ds.clip(i)[:4] + _frames_of(ds, i, shape=other)[4:]
    assert score_clip(reshaped, ds.labels[i])["constancy"] is False
    flicker = [Image.fromarray(np.where(np.asarray(f) == 255, 255 - 20 * (k % 2), np.asarray(f)).astype(np.uint8))
               for k, f in enumerate(ds.clip(i))]
    scores = score_clip(flicker, ds.labels[i])
    assert scores["flicker"] is False and scores["background_std"] > 0.02 and scores["motion"] is True


# --- evaluate_video and the CLI ----------------------------------------------------------------------------------

class ReplayVideoPipe:
    """Stands in for a text-to-video pipeline: each caption's clip from the data set (reversed, if asked), a
    white clip for captions it does not know."""

    family = SimpleNamespace(name="wan", options=("num_frames", "max_sequence_length"))

    def __init__(self, ds: MovingShapesDataset, reverse: bool = False):
        self.clips = {}
        for i in reversed(range(len(ds))):
            self.clips[ds.captions[i]] = ds.clip(i)[::-1] if reverse else ds.clip(i)
        self.blank = [Image.new("RGB", (ds.resolution,) * 2, "white")] * ds.frames
        self.calls = []

    def __call__(self, prompt, **kwargs):
        self.calls.append(kwargs)
        return SimpleNamespace(frames=[self.clips.get(p, self.blank) for p in prompt])


def test_evaluate_video_is_perfect_on_the_data_sets_clips_and_reversed_ones_move_wrong():
    captions = video_captions("heldout", n=10, seed=1)
    ds = MovingShapesDataset(size=10, split="heldout", seed=1, frames=9)
    pipe = ReplayVideoPipe(ds)
    scores = evaluate_video(pipe, captions, steps=3, guidance_scale=5.0, sampler="euler", seed=4, frames=9,
                            batch_size=4)
    assert scores["fully_correct"] == scores["one/fully_correct"] == scores["two/fully_correct"] == 1.0
    assert scores["n"] == 10 and scores["n_one"] + scores["n_two"] == 10 and scores["n_one"] > 0 < scores["n_two"]
    assert pipe.calls[0]["num_frames"] == 9 and pipe.calls[0]["seed"] == [4, 5, 6, 7]
    assert pipe.calls[2]["seed"] == [12, 13] and pipe.calls[0]["sampler"] == "euler"
    directional = [c for c in captions if any(o.motion in DIRECTIONAL for o in parse_video_caption(c).objects)]
    reversed_scores = evaluate_video(ReplayVideoPipe(ds, reverse=True), directional, steps=3, guidance_scale=5.0,
                                     sampler="euler", seed=0, frames=9)
    assert len(directional) >= 5 and reversed_scores["motion"] == 0.0 and reversed_scores["shape"] == 1.0


def test_frame_grid_has_a_row_per_clip_of_evenly_spaced_frames(tmp_path):
    ds = MovingShapesDataset(size=3, seed=0, frames=9)
    clips = [ds.clip(i) for i in range(3)]
    path = frame_grid(clips, tmp_path / "grid.png", frames_shown=5)
    grid = Image.open(path)
    assert grid.size == (5 * 64, 3 * 64)
    for row, col, k in ((0, 0, 0), (1, 2, 4), (2, 4, 8)):
        tile = grid.crop((col * 64, row * 64, col * 64 + 64, row * 64 + 64))
        assert np.array_equal(np.asarray(tile), np.asarray(clips[row][k]))


def test_cli_eval_detects_a_video_model_and_scores_it_on_moving_shapes(tmp_path, capsys, monkeypatch):
    from reverie import cli, pipeline

    ds = MovingShapesDataset(size=6, split="heldout", seed=1, frames=9)
    pipe = ReplayVideoPipe(ds)
    monkeypatch.setattr(pipeline.Pipeline, "from_pretrained", classmethod(lambda cls, *a, **k: pipe))
    grid = tmp_path / "grid.png"
    assert cli.main(["eval", "--n", "6", "--frames", "9", "--steps", "2", "--plot", str(grid)]) == 0
    out = capsys.readouterr().out
    assert "moving-shapes adherence, heldout captions, 9 frames" in out and "fully_correct" in out
    assert set(re.findall(r"\d\.\d{3}", out)) == {"1.000"}  # every rate
    assert pipe.calls[0]["num_frames"] == 9 and pipe.calls[0]["steps"] == 2
    assert Image.open(grid).size == (8 * 64, len(GRID_CAPTIONS) * 64)
    image_model = SimpleNamespace(family=SimpleNamespace(name="sd", options=()))
    monkeypatch.setattr(pipeline.Pipeline, "from_pretrained", classmethod(lambda cls, *a, **k: image_model))
    assert cli.main(["eval", "--data", "moving_shapes"]) == 2
    assert "scores video models" in capsys.readouterr().err
