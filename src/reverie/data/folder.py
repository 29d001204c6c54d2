"""A user's image folder as a captioned data set, and the image helpers every data set shares.

Captions follow the Hugging Face "imagefolder" convention: a `metadata.jsonl` at the folder's root with one
line `{"file_name": "cats/1.png", "text": "a cat"}` per image (file_name relative to the root), or else a
`.txt` file beside an image with the same stem (`cats/1.png` -> `cats/1.txt`). metadata.jsonl wins when both
exist. Unreadable images are logged and skipped, never a crash in the middle of a run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def to_tensor(image: Image.Image | np.ndarray) -> Tensor:
    """An RGB PIL image or (H, W, 3) uint8 array -> FloatTensor (3, H, W) in [-1, 1]."""
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"image must be RGB (H, W, 3); got shape {pixels.shape}")
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as RGB: EXIF rotation applied, transparency composited on white (not black)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side is `resolution` (LANCZOS), then crop the centre square."""
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((nw, nh), Image.LANCZOS)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def check_resolution(resolution: int) -> int:
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 8:
        raise ValueError(f"resolution must be an int >= 8; got {resolution!r}")
    return resolution


class FolderDataset(Dataset):
    """Images under `root` (searched recursively, sorted by path) with their captions.

    Items are {"image": (3, resolution, resolution) in [-1, 1], "caption": str}. Every image is decoded once
    here, so a file that cannot be read is found now: it is logged with its name and counted in `skipped`
    (its path in `skipped_files`), and left out. An image with no caption gets "" and is counted in
    `missing_captions`. `seed` is accepted for a uniform interface; nothing here is random."""

    def __init__(self, root: str | Path, resolution: int = 64, seed: int = 0, caption_column: str = "text"):
        self.root = Path(root)
        self.resolution = check_resolution(resolution)
        if not self.root.is_dir():
            raise ValueError(f"root must be an existing folder; got {str(root)!r}")
        metadata = self._read_metadata(caption_column)
        self.paths: list[Path] = []
        self.captions: list[str] = []
        self.skipped_files: list[Path] = []
        self.missing_captions = 0
        for path in sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
            try:
                with Image.open(path) as image:
                    image.load()
            except Exception as error:  # noqa: BLE001 - decoders raise OSError, SyntaxError, struct.error, ...
                log.warning("skipping unreadable image %s: %s", path, error)
                self.skipped_files.append(path)
                continue
            caption = self._caption(path, metadata)
            if caption is None:
                self.missing_captions += 1
                caption = ""
            self.paths.append(path)
            self.captions.append(caption)
        if self.missing_captions:
            log.warning("%d of %d images in %s have no caption (metadata.jsonl or .txt); using \"\"",
                        self.missing_captions, len(self.paths), self.root)
        if not self.paths:
            raise ValueError(f"root {str(root)!r} holds no readable image ({', '.join(IMAGE_EXTENSIONS)})")

    @property
    def skipped(self) -> int:
        """How many image files could not be read and were left out."""
        return len(self.skipped_files)

    def _read_metadata(self, caption_column: str) -> dict[Path, str]:
        path = self.root / "metadata.jsonl"
        if not path.exists():
            return {}
        captions = {}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[(self.root / row["file_name"]).resolve()] = str(row[caption_column])
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                log.warning("%s line %d: not a {\"file_name\", %r} object (%s); ignored", path, number,
                            caption_column, error)
        return captions

    def _caption(self, path: Path, metadata: dict[Path, str]) -> str | None:
        if path.resolve() in metadata:
            return metadata[path.resolve()]
        txt = path.with_suffix(".txt")
        if txt.is_file():
            return txt.read_text(encoding="utf-8").strip()
        return None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        with Image.open(self.paths[index]) as image:
            image = resize_center_crop(to_rgb(image), self.resolution)
        return {"image": to_tensor(image), "caption": self.captions[index]}
