"""Every emoji of the Noto Color Emoji font, rendered centred on white, captioned with its CLDR name.

Names come from Unicode's emoji-test.txt (the fully-qualified entries: "red apple", "thumbs up: medium skin
tone", "family: man, woman, girl", "flag: Japan"), sequences and skin tones included. Both files come from
Debian packages that scripts/install_system_deps.sh installs: fonts-noto-color-emoji and unicode-data (15.0 in
Debian 12, the same Unicode version as its font, so nearly every name has a glyph). An emoji the font cannot
draw as one glyph (no glyph, or a sequence it does not ligate and would draw as several) is skipped and
counted in `skipped`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features
from torch.utils.data import Dataset

from .folder import check_resolution, to_tensor

FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
NAMES_PATH = "/usr/share/unicode/emoji/emoji-test.txt"
FONT_SIZE = 109  # Noto Color Emoji is a CBDT bitmap font: its strikes load only at this size
MARGIN = 0.06  # white border on each side, as a fraction of the image
INSTALL = "run scripts/install_system_deps.sh (Debian packages fonts-noto-color-emoji and unicode-data)"


def read_emoji_names(path: str | Path = NAMES_PATH) -> list[tuple[str, str]]:
    """[(emoji, CLDR name)] for every fully-qualified entry of emoji-test.txt, in the file's order.

    A line reads `1F44D 1F3FD ; fully-qualified # 👍🏽 E1.0 thumbs up: medium skin tone`."""
    entries = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or "; fully-qualified" not in line:
            continue
        codes, comment = line.split(";")[0], line.split("#", 1)[1]
        emoji = "".join(chr(int(c, 16)) for c in codes.split())
        name = comment.split(None, 2)[2]  # after the emoji and its "E1.0" version
        entries.append((emoji, name.strip()))
    return entries


class EmojiDataset(Dataset):
    """Emoji at `resolution`, scaled to fill the image less a MARGIN border, on white; `captions[i]` is the
    name, `emoji[i]` the string. `names` keeps only those emoji (ValueError for a name emoji-test.txt lacks).

    Each image is drawn on first use and kept (about 12 KB each at 64x64). `seed` is accepted for a uniform
    interface; nothing here is random."""

    def __init__(self, resolution: int = 64, seed: int = 0, names: list[str] | None = None,
                 font_path: str | Path = FONT_PATH, names_path: str | Path = NAMES_PATH):
        self.resolution = check_resolution(resolution)
        for what, path in (("font", font_path), ("emoji names (emoji-test.txt)", names_path)):
            if not Path(path).is_file():
                raise FileNotFoundError(f"{what} not found at {path}: {INSTALL}")
        entries = read_emoji_names(names_path)
        if names is not None:
            known = {name: emoji for emoji, name in entries}
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ValueError(f"names must be CLDR names from {names_path} (like 'red apple'); unknown: {unknown}")
            entries = [(known[n], n) for n in names]
        layout = ImageFont.Layout.RAQM if features.check("raqm") else ImageFont.Layout.BASIC
        self.font = ImageFont.truetype(str(font_path), FONT_SIZE, layout_engine=layout)
        advance = self.font.getlength("\N{RED APPLE}")
        self.emoji: list[str] = []
        self.captions: list[str] = []
        self.skipped_names: list[str] = []
        for emoji, name in entries:
            left, top, right, bottom = self.font.getbbox(emoji)
            # no glyph: an empty box; an unsupported sequence: drawn as several glyphs side by side
            if bottom <= top or right <= left or self.font.getlength(emoji) > 1.5 * advance:
                self.skipped_names.append(name)
            else:
                self.emoji.append(emoji)
                self.captions.append(name)
        self._images: dict[int, np.ndarray] = {}

    @property
    def skipped(self) -> int:
        """How many names the font cannot draw as one glyph."""
        return len(self.skipped_names)

    def render(self, emoji: str) -> Image.Image:
        """One emoji as an RGB image at `resolution`: cropped to its pixels, centred, scaled (LANCZOS)."""
        _, _, right, bottom = self.font.getbbox(emoji)
        glyph = Image.new("RGBA", (right + 4, bottom + 4), (255, 255, 255, 0))
        ImageDraw.Draw(glyph).text((2, 2), emoji, font=self.font, embedded_color=True)
        box = glyph.getchannel("A").getbbox()
        if box is None:
            raise ValueError(f"the font draws nothing for {emoji!r}")
        glyph = glyph.crop(box)
        side = round(max(glyph.size) / (1 - 2 * MARGIN))
        canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
        canvas.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
        return canvas.convert("RGB").resize((self.resolution,) * 2, Image.LANCZOS)

    def __len__(self) -> int:
        return len(self.emoji)

    def __getitem__(self, index: int) -> dict:
        if index not in self._images:
            self._images[index] = np.asarray(self.render(self.emoji[index]))
        return {"image": to_tensor(self._images[index]), "caption": self.captions[index]}
