"""Training data sets. Every one is a torch Dataset of {"image": FloatTensor (3, H, W) in [-1, 1],
"caption": str}, 64x64 unless `resolution` says otherwise, deterministic for a given `seed`; moving_shapes
items are {"video": FloatTensor (3, frames, H, W), "caption": str}.

    shapes         procedural coloured shapes with spatial relations, and a held-out split (reverie.data.shapes)
    moving_shapes  clips of moving, growing, turning shapes, and a held-out split (reverie.data.moving_shapes)
    stars          stars of the palette colours, a shape the shapes model lacks, for LoRA training (reverie.data.stars)
    emoji          every Noto Color Emoji glyph with its CLDR name (needs scripts/install_system_deps.sh)
    digits         scikit-learn's 8x8 handwritten digits, "the digit 7" (needs scikit-learn)
    folder         a user's image folder with metadata.jsonl or .txt captions
"""

from __future__ import annotations

import inspect

from torch.utils.data import Dataset

from .digits import DigitsDataset
from .emoji import EmojiDataset
from .folder import FolderDataset, to_tensor
from .moving_shapes import MovingShapesDataset, parse_video_caption
from .stars import StarsDataset
from .shapes import (
    ShapeObject,
    ShapesDataset,
    ShapesLabel,
    heldout_combinations,
    heldout_kind,
    parse_caption,
)

DATASETS = {"shapes": ShapesDataset, "moving_shapes": MovingShapesDataset, "stars": StarsDataset, "emoji": EmojiDataset,
            "digits": DigitsDataset, "folder": FolderDataset}


def make_dataset(name: str, **options) -> Dataset:
    """The data set called `name` (one of DATASETS), built with `options` (its constructor's keywords:
    every one takes `resolution` and `seed`; "folder" needs `root`)."""
    if name not in DATASETS:
        raise ValueError(f"dataset name must be one of {tuple(DATASETS)}; got {name!r}")
    parameters = inspect.signature(DATASETS[name]).parameters
    unknown = [k for k in options if k not in parameters]
    if unknown:
        raise ValueError(f"options {unknown} are not options of the {name!r} dataset; valid: {list(parameters)}")
    missing = [k for k, p in parameters.items() if p.default is inspect.Parameter.empty and k not in options]
    if missing:
        raise ValueError(f"the {name!r} dataset needs the options {missing}")
    return DATASETS[name](**options)


__all__ = ["DATASETS", "DigitsDataset", "EmojiDataset", "FolderDataset", "MovingShapesDataset", "ShapeObject",
           "ShapesDataset", "ShapesLabel", "heldout_combinations", "heldout_kind", "make_dataset", "parse_caption",
           "parse_video_caption", "to_tensor"]
