"""scikit-learn's handwritten digits (1,797 8x8 images, shipped inside the sklearn wheel: no download),
upscaled to black digits on white with captions "the digit 7"."""

from __future__ import annotations

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .folder import check_resolution, to_tensor


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) with values 0..16, targets (1797,)) from scikit-learn, imported only when needed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("the 'digits' data set needs scikit-learn: pip install scikit-learn") from error
    digits = load_digits()
    return digits.images, digits.target


class DigitsDataset(Dataset):
    """The 1,797 sklearn digits at `resolution` (bicubic upscale), caption "the digit {label}"; `labels[i]` is
    the digit. `seed` is accepted for a uniform interface; nothing here is random."""

    def __init__(self, resolution: int = 64, seed: int = 0):
        self.resolution = check_resolution(resolution)
        images, targets = load_digits_arrays()
        self.images = (255 - images * (255 / 16)).round().astype(np.uint8)  # (N, 8, 8): ink 16 -> black on white
        self.labels = [int(t) for t in targets]
        self.captions = [f"the digit {t}" for t in self.labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        image = Image.fromarray(self.images[index]).resize((self.resolution,) * 2, Image.BICUBIC)
        return {"image": to_tensor(image.convert("RGB")), "caption": self.captions[index]}
