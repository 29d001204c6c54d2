"""The shapes analyzer reads the data set's own images back exactly, survives blur and noise, and catches errors."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import ImageFilter

from reverie.data import ShapesDataset
from reverie.data.shapes import (
    COLORS,
    SHAPES,
    ShapeObject,
    ShapesLabel,
    caption_of,
    parse_caption,
    render,
)
from reverie.eval import find_objects, score

ATTRIBUTES = ("count", "color", "shape", "size", "position", "relation")


@pytest.fixture(scope="module")
def images():
    """300 training and 100 held-out items, about half with two objects."""
    return [(d.image(i), d.labels[i], d.captions[i], d.placements[i])
            for d in (ShapesDataset(size=300, seed=11), ShapesDataset(size=100, split="heldout", seed=11))
            for i in range(len(d))]


def _failures(results):
    return [(caption, {k: r[k] for k in ATTRIBUTES}) for caption, r in results if not r["fully_correct"]]


def test_scores_the_datasets_own_images_fully_correct(images):
    assert sum(len(label.objects) == 2 for _, label, _, _ in images) > 150
    assert _failures([(c, score(image, label)) for image, label, c, _ in images]) == []
    # every attribute was checked against the full ground truth
    result = score(*images[0][:2])
    assert all(result[k] is not None for k in ATTRIBUTES[:-1]) and result["fully_correct"] is True


def test_scores_from_the_caption_alone(images):
    assert _failures([(c, score(image, c)) for image, _, c, _ in images]) == []
    result = score(images[0][0], "a " + images[0][1].objects[0].color + " " + images[0][1].objects[0].shape)
    assert result["size"] is None and result["position"] is None  # unstated attributes are not judged


def test_survives_blur_and_noise(images):
    generator = torch.Generator().manual_seed(0)
    results = []
    for image, label, caption, _ in images[::2]:
        x = torch.from_numpy(np.asarray(image.filter(ImageFilter.GaussianBlur(1.0))).copy()).permute(2, 0, 1)
        x = (x.float() / 127.5 - 1 + 0.1 * torch.randn(x.shape, generator=generator)).clamp(-1, 1)  # (3, 64, 64)
        results.append((caption, score(x, label)))
    assert _failures(results) == []


def test_reads_any_resolution_and_input_type():
    dataset = ShapesDataset(size=20, seed=5, resolution=128)
    for i in range(len(dataset)):
        assert score(dataset[i]["image"], dataset.labels[i])["fully_correct"]
    one = ShapesDataset(size=1, seed=5)
    as_pil, as_array, as_tensor = (find_objects(x) for x in (one.image(0), np.asarray(one.image(0)), one[0]["image"]))
    assert as_pil == as_array == as_tensor and len(as_pil) >= 1
    with pytest.raises(ValueError, match="image"):
        find_objects(torch.zeros(1, 3, 64, 64))


def test_catches_recoloured_swapped_and_missing_objects(images):
    pairs = [(label, placed) for _, label, _, placed in images if len(label.objects) == 2][:40]
    for label, placed in pairs:
        used = {p.color for p in placed}
        other = next(c for c in COLORS if c not in used)
        recoloured = [dataclasses.replace(placed[0], color=other), placed[1]]
        swapped = [dataclasses.replace(placed[0], x=placed[1].x, y=placed[1].y),
                   dataclasses.replace(placed[1], x=placed[0].x, y=placed[0].y)]
        result = score(render(recoloured), label)
        assert not result["fully_correct"] and result["color"] is False
        result = score(render(swapped), label)
        assert not result["fully_correct"] and result["relation"] is False and result["position"] is False
        result = score(render(placed[:1]), label)
        assert not result["fully_correct"] and result["count"] is False
        assert not score(render([]), label)["fully_correct"]


def test_catches_wrong_shape_size_position_and_extra_objects(images):
    singles = [(label, placed) for _, label, _, placed in images if len(label.objects) == 1][:40]
    for label, (p,) in singles:
        wrong = {"shape": dataclasses.replace(p, shape=next(s for s in SHAPES if s != p.shape)),
                 "size": dataclasses.replace(p, side=14 if p.side > 20 else 26, x=32, y=32),
                 "position": dataclasses.replace(p, x=32 if p.x != 32 else 16, y=32 if p.y != 32 else 16)}
        if label.objects[0].position == "center":
            wrong["position"] = dataclasses.replace(p, x=p.x - 16)
        for attribute, changed in wrong.items():
            result = score(render([changed]), label)
            assert result[attribute] is False and not result["fully_correct"], (attribute, label)
        extra = dataclasses.replace(p, color=next(c for c in COLORS if c != p.color), side=12, y=56 if p.y < 32 else 8)
        result = score(render([p, extra]), label)
        assert result["count"] is False and not result["fully_correct"]
        assert all(result[k] for k in ("color", "shape", "size", "position"))  # the right object is still found


def test_parse_caption():
    assert parse_caption("a red circle") == ShapesLabel((ShapeObject("red", "circle"),))
    assert parse_caption("A small blue square on the left.") == ShapesLabel(
        (ShapeObject("blue", "square", "small", "left"),))
    assert parse_caption("a yellow square to the left of a large blue circle") == ShapesLabel(
        (ShapeObject("yellow", "square"), ShapeObject("blue", "circle", "large")), "to the left of")
    for caption in ("a red circle and a blue square", "a purple circle", "a red circle above", ""):
        with pytest.raises(ValueError, match="caption"):
            parse_caption(caption)
    for label in ShapesDataset(size=100, seed=2).labels:  # the caption with every word states the whole label
        stated = parse_caption(caption_of(label, (True,) * len(label.objects), with_position=True))
        if label.relation is None:
            assert stated == label
        else:
            assert stated.relation == label.relation
            said = [(o.color, o.shape, o.size) for o in stated.objects]
            assert said == [(o.color, o.shape, o.size) for o in label.objects]
