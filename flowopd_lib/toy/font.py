"""A 3x5 bitmap font for the toy world's text: digits and a few capital letters.

Glyphs are drawn at an integer scale (x2 at 32x32, so 6x10 px each) with one image pixel of
spacing, so four glyphs fit on a 32 px wide image. Letters that a 3x5 grid cannot tell apart
from a digit or another letter (B/8, O/0, S/5, Z/2, I/1, D/0, G/6, U/0, C/E) are left out.
Some digits still differ in a single font pixel (8 vs 0, 6, 9; 5 vs 6, 9), as in any 3x5 font:
a reader is exact on clean renders but a sloppy "8" reads as "0", which is what makes text hard.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

_BITMAPS = {
    "0": ["###", "#.#", "#.#", "#.#", "###"],
    "1": [".#.", "##.", ".#.", ".#.", "###"],
    "2": ["###", "..#", "###", "#..", "###"],
    "3": ["###", "..#", ".##", "..#", "###"],
    "4": ["#.#", "#.#", "###", "..#", "..#"],
    "5": ["###", "#..", "###", "..#", "###"],
    "6": ["###", "#..", "###", "#.#", "###"],
    "7": ["###", "..#", ".#.", ".#.", ".#."],
    "8": ["###", "#.#", "###", "#.#", "###"],
    "9": ["###", "#.#", "###", "..#", "###"],
    "A": [".#.", "#.#", "###", "#.#", "#.#"],
    "E": ["###", "#..", "##.", "#..", "###"],
    "F": ["###", "#..", "##.", "#..", "#.."],
    "H": ["#.#", "#.#", "###", "#.#", "#.#"],
    "K": ["#.#", "##.", "#..", "##.", "#.#"],
    "L": ["#..", "#..", "#..", "#..", "###"],
    "P": ["##.", "#.#", "##.", "#..", "#.."],
    "T": ["###", ".#.", ".#.", ".#.", ".#."],
    "X": ["#.#", "#.#", ".#.", "#.#", "#.#"],
    "Y": ["#.#", "#.#", ".#.", ".#.", ".#."],
}

GLYPHS = "".join(_BITMAPS)  # the text alphabet, in font order
FONT_W, FONT_H = 3, 5


def glyph_bitmaps() -> np.ndarray:
    """All glyphs as a bool array [len(GLYPHS), 5, 3] in font pixels."""
    return np.array([[[c == "#" for c in row] for row in _BITMAPS[g]] for g in GLYPHS])


def font_scale(size: int) -> int:
    """Image pixels per font pixel: 2 at 32x32, growing with the image."""
    return max(1, size // 16)


@lru_cache(maxsize=None)
def glyph_masks(scale: int) -> np.ndarray:
    """Glyphs blown up to image pixels: bool [len(GLYPHS), 5 * scale, 3 * scale] (shared, read-only)."""
    masks = glyph_bitmaps().repeat(scale, axis=1).repeat(scale, axis=2)
    masks.flags.writeable = False
    return masks


def glyph_spacing(scale: int) -> int:
    """Blank image pixels between two glyphs (1 at scale 2)."""
    return max(1, scale // 2)


def text_mask(text: str, scale: int) -> np.ndarray:
    """One line of text as a bool mask [5 * scale, width]; raises on glyphs outside GLYPHS."""
    bad = sorted(set(text) - set(GLYPHS))
    if bad:
        raise ValueError(f"text {text!r} has glyphs {bad} outside the alphabet {GLYPHS!r}")
    masks, gap = glyph_masks(scale), glyph_spacing(scale)
    h, w = masks.shape[1:]
    out = np.zeros((h, len(text) * (w + gap) - gap), dtype=bool)
    for i, ch in enumerate(text):
        out[:, i * (w + gap): i * (w + gap) + w] = masks[GLYPHS.index(ch)]
    return out
