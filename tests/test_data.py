"""Training data sets: the item contract, determinism, shapes captions and held-out split, digits, folder, emoji."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from reverie.data import (
    DATASETS,
    DigitsDataset,
    EmojiDataset,
    FolderDataset,
    ShapesDataset,
    heldout_combinations,
    make_dataset,
    parse_caption,
)
from reverie.data.emoji import read_emoji_names
from reverie.data.shapes import (
    COLORS,
    INVERSE,
    POSITION_PHRASES,
    RELATIONS,
    SHAPES,
    ShapeObject,
    SIZES,
)


def _emoji(**options) -> EmojiDataset:
    try:
        return EmojiDataset(**options)
    except FileNotFoundError as error:  # a missing font is a broken set-up, not a reason to skip
        pytest.fail(str(error))


def _check_item(item, resolution=64):
    assert set(item) == {"image", "caption"}
    image = item["image"]
    assert image.dtype == torch.float32 and image.shape == (3, resolution, resolution)
    assert image.min() >= -1 and image.max() <= 1
    assert isinstance(item["caption"], str)


# --- the factory and the contract every data set keeps ---------------------------------------------------------

def test_make_dataset_builds_each_and_rejects_unknown_names_and_options(tmp_path):
    Image.new("RGB", (10, 10), "red").save(tmp_path / "a.png")
    options = {"shapes": {"size": 3}, "moving_shapes": {"size": 3, "frames": 4}, "emoji": {"names": ["red apple"]},
               "digits": {}, "folder": {"root": tmp_path}, "stars": {"size": 2, "shapes": 1}}
    for name, cls in DATASETS.items():
        dataset = make_dataset(name, seed=0, resolution=32, **options[name])
        assert isinstance(dataset, cls)
        if name != "moving_shapes":  # its items are videos: tests/test_moving_shapes.py
            _check_item(dataset[0], resolution=32)
    with pytest.raises(ValueError, match="shapes.*emoji.*digits.*folder"):
        make_dataset("cifar")
    with pytest.raises(ValueError, match="colour"):
        make_dataset("shapes", colour="red")
    with pytest.raises(ValueError, match="root"):
        make_dataset("folder")


def test_items_collate_into_batches():
    batch = next(iter(DataLoader(ShapesDataset(size=8), batch_size=4)))
    assert batch["image"].shape == (4, 3, 64, 64) and len(batch["caption"]) == 4


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_shapes_same_seed_same_items_in_any_order_and_other_seeds_differ(split):
    a, b = ShapesDataset(size=40, split=split, seed=3), ShapesDataset(size=40, split=split, seed=3)
    forward = [a[i] for i in range(40)]
    for i in reversed(range(40)):
        assert torch.equal(b[i]["image"], forward[i]["image"]) and b[i]["caption"] == forward[i]["caption"]
    _check_item(forward[0])
    assert a.labels == b.labels
    # item i depends on (seed, i) only: a longer data set starts with the same items
    assert ShapesDataset(size=60, split=split, seed=3).captions[:40] == a.captions
    other = ShapesDataset(size=40, split=split, seed=4)
    assert sum(not torch.equal(other[i]["image"], forward[i]["image"]) for i in range(40)) > 30


def test_shapes_rejects_bad_options():
    for options, field in [({"split": "test"}, "split"), ({"size": 0}, "size"), ({"detail": 2.0}, "detail"),
                           ({"two_object_fraction": -0.1}, "two_object_fraction"), ({"resolution": 4}, "resolution"),
                           ({"partial": 1.5}, "partial")]:
        with pytest.raises(ValueError, match=field):
            ShapesDataset(**options)


# --- shapes: captions, labels, geometry, held-out split -------------------------------------------------------

def _stated_agrees(stated, truth):
    return all(getattr(stated, k) in (None, getattr(truth, k)) for k in ("color", "shape", "size", "position"))


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_shapes_captions_state_only_what_the_label_says(split):
    dataset = ShapesDataset(size=300, split=split, seed=0)
    for caption, label in zip(dataset.captions, dataset.labels):
        stated = parse_caption(caption)
        assert stated.relation == label.relation and len(stated.objects) == len(label.objects)
        assert all(_stated_agrees(s, t) for s, t in zip(stated.objects, label.objects)), caption
        assert all(None not in (o.color, o.shape, o.size, o.position) for o in label.objects)
    # both kinds of image, and captions with and without size / position words
    counts = [len(label.objects) for label in dataset.labels]
    assert counts.count(1) > 50 and counts.count(2) > 50
    assert any(any(s in c.split() for s in SIZES) for c in dataset.captions)
    assert any(not any(s in c.split() for s in SIZES) for c in dataset.captions)
    singles = [c for c, n in zip(dataset.captions, counts) if n == 1]
    assert any(c.endswith(tuple(POSITION_PHRASES.values())) for c in singles)
    assert any(not c.endswith(tuple(POSITION_PHRASES.values())) for c in singles)


def test_shapes_partial_captions_name_colour_or_shape_alone_and_leave_the_rest_as_it_was():
    plain, partial = ShapesDataset(size=300, seed=0), ShapesDataset(size=300, seed=0, partial=0.5)
    assert plain.labels == partial.labels and plain.placements == partial.placements
    changed = [(a, b, label) for a, b, label in zip(plain.captions, partial.captions, plain.labels) if a != b]
    singles = sum(len(label.objects) == 1 for label in plain.labels)
    assert 0.3 * singles < len(changed) < 0.7 * singles
    kinds = set()
    for before, after, label in changed:
        assert len(label.objects) == 1
        stated, full = parse_caption(after).objects[0], parse_caption(before).objects[0]
        assert _stated_agrees(stated, label.objects[0]), after
        assert (stated.size, stated.position) == (full.size, full.position), (before, after)  # same detail words
        assert (stated.color is None) != (stated.shape is None), after  # exactly one of the two is named
        kinds.add("color" if stated.shape is None else "shape")
    assert kinds == {"color", "shape"}
    assert ShapesDataset(size=300, seed=0, partial=0.0).captions == plain.captions
    assert parse_caption("a red shape").objects[0] == ShapeObject("red", None)
    assert parse_caption("an small triangle on the left").objects[0] == ShapeObject(None, "triangle", "small", "left")
    with pytest.raises(ValueError, match="not a shapes caption"):
        parse_caption("a shape")


def test_shapes_pairs_are_apart_inside_the_canvas_and_in_the_stated_relation():
    dataset = ShapesDataset(size=300, two_object_fraction=1.0, seed=1)
    for placed, label in zip(dataset.placements, dataset.labels):
        by_color = {p.color: p for p in placed}
        a, b = (by_color[o.color] for o in label.objects)  # in the caption's order
        assert a.color != b.color
        gap = max(abs(a.x - b.x), abs(a.y - b.y)) - (a.side + b.side) / 2
        assert gap >= 4 - 1e-9  # boxes (which contain the shapes) are >= 4 px apart along the relation's axis
        for p in placed:
            assert all(1 - 1e-9 <= c - p.side / 2 and c + p.side / 2 <= 63 + 1e-9 for c in (p.x, p.y))
        dx, dy = b.x - a.x, b.y - a.y
        if abs(dy) > abs(dx):
            assert label.relation == ("above" if dy > 0 else "below")
        else:
            assert label.relation == ("to the left of" if dx > 0 else "to the right of")
        assert max(abs(dx), abs(dy)) >= 4 * min(abs(dx), abs(dy))  # clearly along one axis


def _scenes_of(label):
    """The (colour, shape, relation, colour, shape) phrasings of a two-object label, both ways round."""
    a, b = label.objects
    return {(a.color, a.shape, label.relation, b.color, b.shape),
            (b.color, b.shape, INVERSE[label.relation], a.color, a.shape)}


def test_heldout_combinations_never_appear_in_training():
    heldout = heldout_combinations()
    pairs, scenes = set(heldout["color_shapes"]), set(heldout["scenes"])
    assert len(pairs) == 3 and len(scenes) == 4
    # held-out scenes are built from training pairs: the novelty is their composition
    assert not any({(s[0], s[1]), (s[3], s[4])} & pairs for s in scenes)
    train = ShapesDataset(size=3000, split="train", seed=0)
    seen_pairs, seen_scenes = set(), set()
    for label in train.labels:
        seen_pairs |= {(o.color, o.shape) for o in label.objects}
        if label.relation:
            seen_scenes |= _scenes_of(label)
    assert not seen_pairs & pairs and not seen_scenes & scenes
    # ... while everything else the held-out split needs does appear
    assert seen_pairs == {(c, s) for c in COLORS for s in SHAPES} - pairs
    assert {s[2] for s in seen_scenes} == set(RELATIONS)
    assert all((s[0], s[1], INVERSE[s[2]], s[3], s[4]) in seen_scenes for s in scenes)  # same objects, other way
    heldout_split = ShapesDataset(size=400, split="heldout", seed=0)
    used_pairs, used_scenes = set(), set()
    for label in heldout_split.labels:
        shown = {(o.color, o.shape) for o in label.objects}
        assert shown & pairs or (label.relation and _scenes_of(label) & scenes)
        used_pairs |= shown & pairs
        used_scenes |= _scenes_of(label) & scenes if label.relation else set()
    assert used_pairs == pairs and used_scenes == scenes


def test_shapes_resolution_scales_the_drawing():
    small, large = ShapesDataset(size=5, seed=2), ShapesDataset(size=5, seed=2, resolution=128)
    assert large[0]["image"].shape == (3, 128, 128) and large.captions == small.captions
    down = torch.nn.functional.avg_pool2d(large[0]["image"][None], 2)[0]
    assert (down - small[0]["image"]).abs().mean() < 0.05


# --- digits ---------------------------------------------------------------------------------------------------

def test_digits_captions_match_sklearn_labels_and_digits_are_dark_on_white():
    from sklearn.datasets import load_digits

    dataset = DigitsDataset()
    target = load_digits().target
    assert len(dataset) == 1797 and dataset.labels == list(target)
    assert all(c == f"the digit {t}" for c, t in zip(dataset.captions, target))
    for i in (0, 100, 1796):
        item = dataset[i]
        _check_item(item)
        assert item["caption"] == f"the digit {target[i]}"
        image = item["image"]
        assert image[:, 0, 0].min() > 0.9 and image.min() < -0.5  # white corner, black ink
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # grey


# --- folder ---------------------------------------------------------------------------------------------------

def test_folder_captions_corrupt_files_and_missing_captions(tmp_path, caplog):
    Image.new("RGB", (80, 40), "red").save(tmp_path / "meta.png")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (30, 30), "blue").save(tmp_path / "sub" / "txt.jpg")
    (tmp_path / "sub" / "txt.txt").write_text("a blue square\n")
    Image.new("RGB", (30, 30), "green").save(tmp_path / "bare.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = Image.new("RGB", (64, 64), "white")
    good.save(tmp_path / "truncated.jpg")
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "truncated.jpg").read_bytes()[:200])
    lines = [{"file_name": "meta.png", "text": "a red banner"}, {"file_name": "gone.png", "text": "missing file"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    with caplog.at_level(logging.WARNING):
        dataset = FolderDataset(tmp_path, resolution=32)
    assert dataset.skipped == 2 and sorted(p.name for p in dataset.skipped_files) == ["broken.png", "truncated.jpg"]
    assert "broken.png" in caplog.text and "truncated.jpg" in caplog.text
    captions = {p.name: c for p, c in zip(dataset.paths, dataset.captions)}
    assert captions == {"meta.png": "a red banner", "txt.jpg": "a blue square", "bare.png": ""}
    assert dataset.missing_captions == 1
    for i in range(len(dataset)):
        _check_item(dataset[i], resolution=32)
    red = dataset[[p.name for p in dataset.paths].index("meta.png")]["image"]
    torch.testing.assert_close(red, torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 32, 32), atol=0.02, rtol=0)


def test_folder_resizes_the_shorter_side_and_crops_the_centre(tmp_path):
    pixels = np.zeros((40, 120, 3), np.uint8)
    pixels[:, :40] = (0, 0, 255)
    pixels[:, 40:80] = (255, 0, 0)
    pixels[:, 80:] = (0, 255, 0)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    dataset = FolderDataset(tmp_path, resolution=16)
    image = dataset[[p.name for p in dataset.paths].index("wide.png")]["image"]  # the red middle third survives
    red = torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 16, 12)
    torch.testing.assert_close(image[:, :, 2:-2], red, atol=0.02, rtol=0)  # (LANCZOS rings at the cut edges)
    clear = dataset[[p.name for p in dataset.paths].index("clear.png")]["image"]
    assert clear.min() == 1  # transparency is composited on white, not black


def test_folder_without_readable_images_is_an_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="root"):
        FolderDataset(tmp_path)
    with pytest.raises(ValueError, match="root"):
        FolderDataset(tmp_path / "nowhere")


# --- emoji ----------------------------------------------------------------------------------------------------

EMOJI_NAMES = ["red apple", "dog face", "thumbs up: medium skin tone", "family: man, woman, girl", "flag: Japan",
               "keycap: #"]


def test_emoji_names_render_as_distinct_non_blank_images():
    dataset = _emoji(names=EMOJI_NAMES)
    assert dataset.captions == EMOJI_NAMES and dataset.skipped == 0
    images = []
    for i in range(len(dataset)):
        item = dataset[i]
        _check_item(item)
        ink = (item["image"] < 0.9).any(0).float().mean()
        assert 0.2 < ink < 0.95, item["caption"]  # drawn, filling most of the frame
        assert item["image"][:, 0, :].min() > 0.9  # the top row is white margin
        images.append(item["image"])
    assert torch.equal(dataset[0]["image"], images[0])
    assert min((a - b).abs().mean() for i, a in enumerate(images) for b in images[i + 1:]) > 0.05
    red, green = images[0][0].mean(), images[0][1].mean()  # a red apple is red
    assert red > green + 0.3
    with pytest.raises(ValueError, match="names"):
        _emoji(names=["red apple", "no such emoji"])


def test_emoji_covers_the_whole_font():
    dataset = _emoji()
    assert len(dataset) + dataset.skipped == len(read_emoji_names())  # every fully-qualified emoji, drawn or counted
    assert len(dataset) > 3500  # Debian 12: 3,655 of 3,655
    assert {"red apple", "thumbs up: medium skin tone", "rainbow flag", "flag: Scotland"} <= set(dataset.captions)


def test_emoji_the_font_cannot_draw_are_skipped_and_counted(tmp_path):
    _emoji(names=["red apple"])  # fails with the install hint when the font is missing
    lines = ["1F34E ; fully-qualified # \U0001F34E E0.6 red apple",
             "F0000 ; fully-qualified # \U000F0000 E99 private glyph",  # no glyph in the font
             "1F436 200D 1F34E ; fully-qualified # \U0001F436\u200d\U0001F34E E99 dog apple",  # no such ligature
             "1F34E ; unqualified # \U0001F34E E0.6 not fully qualified"]
    (tmp_path / "emoji-test.txt").write_text("# group: Food\n" + "\n".join(lines) + "\n", encoding="utf-8")
    dataset = _emoji(names_path=tmp_path / "emoji-test.txt")
    assert dataset.captions == ["red apple"] and dataset.skipped_names == ["private glyph", "dog apple"]


def test_stars_and_their_analyzer():
    """The star the LoRA example teaches: its own images all read as stars of their colour, none of the shapes
    data set's images does (one or two circles, squares, triangles), and the prior images follow the stars."""
    from reverie.data.stars import StarsDataset, score_star

    stars = StarsDataset(size=40, shapes=3, seed=0)
    assert len(stars) == 43 and all(score_star(stars.image(i), stars.color(i))["fully_correct"] for i in range(40))
    assert all(f"{stars.color(i)} star" in stars.caption(i) for i in range(40))
    assert not any(score_star(stars.image(i), "red" if stars.color(i) != "red" else "blue")["color"]
                   for i in range(40))  # another colour is wrong
    assert stars.caption(40) == ShapesDataset(size=3, seed=1).captions[0]
    shapes = ShapesDataset(size=120, seed=5)
    assert not any(score_star(shapes.image(i), shapes.labels[i].objects[0].color)["shape"] for i in range(120))
    assert score_star(Image.new("RGB", (64, 64), "white"), "red") == {"color": False, "shape": False,
                                                                      "fully_correct": False}
