"""Paraphrased shapes captions: does a text encoder follow prompts worded unlike its training captions?

Every word of the shapes grammar that carries an attribute is replaced by a synonym the data set never uses
("a red circle" -> "a crimson disk", "a small blue square on the left" -> "a tiny azure box at the left side"),
and the image is scored against the *original* caption's label. A text encoder trained only on the data set's
captions has never seen the synonyms; a pretrained sentence encoder places them near the words they mean.

    reverie eval --paraphrase --split heldout --n 200
"""

from __future__ import annotations

import random
import re

from ..data.shapes import COLORS, POSITION_PHRASES, RELATIONS, SHAPES, SIZES, parse_caption

# each attribute word or phrase of the grammar -> its synonyms (none of them a word of the grammar)
SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet"), "green": ("emerald", "jade"), "blue": ("azure", "cobalt"),
    "yellow": ("golden", "lemon-coloured"),
    "circle": ("disk", "round dot"), "square": ("box", "four-sided block"), "triangle": ("three-sided shape", "wedge"),
    "small": ("tiny", "little"), "large": ("big", "huge"),
    "on the left": ("at the left side", "toward the left edge"), "on the right": ("at the right side",
                                                                                  "toward the right edge"),
    "at the top": ("near the upper edge", "up high"), "at the bottom": ("near the lower edge", "down low"),
    "in the center": ("in the middle", "in the very middle"),
    "above": ("over",), "below": ("under", "beneath"), "to the left of": ("left of",), "to the right of": ("right of",),
}
_PHRASES = sorted(SYNONYMS, key=len, reverse=True)  # longest first: "to the left of" before "left"
_PATTERN = re.compile(r"\b(" + "|".join(re.escape(p) for p in _PHRASES) + r")\b")
assert set(SYNONYMS) == {*COLORS, *SHAPES, *SIZES, *POSITION_PHRASES.values(), *RELATIONS}


def paraphrase(caption: str, seed: int = 0) -> str:
    """The caption with every attribute word or phrase replaced by one of its synonyms (chosen by seed and the
    caption), with "a" / "an" agreeing with the word after it."""
    parse_caption(caption)  # the grammar's captions only: a clear error otherwise
    rng = random.Random(f"{seed}:{caption}")
    text = _PATTERN.sub(lambda m: rng.choice(SYNONYMS[m.group(1)]), caption)
    return re.sub(r"\ban? (?=(\S))", lambda m: "an " if m.group(1) in "aeiou" else "a ", text)
