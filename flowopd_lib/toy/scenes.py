"""Scenes of the toy world and their numpy renderer.

A scene is a plain background, a few flat-coloured shapes and optionally one line of dark text
on a white sign. Everything is drawn with hard pixel edges (no anti-aliasing), so a clean
render holds only palette colours and a detector can be exact on it; generated images are
judged by how far they drift from that. Sizes are given for a 32x32 image and scale with it.

Colours are chosen far apart in hue (blending a colour with a neutral background keeps its
hue, which is what lets the detector tolerate blurry generated pixels); backgrounds, the sign
and the ink are neutral (low chroma) so they never pass for an object.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from .font import font_scale, text_mask

COLORS = {  # name -> RGB in [0, 1]; hues ~0, 30, 57, 125, 228, 281 degrees
    "red": (0.90, 0.12, 0.12),
    "orange": (1.00, 0.50, 0.00),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.15, 0.68, 0.20),
    "blue": (0.15, 0.30, 0.90),
    "purple": (0.60, 0.15, 0.80),
}
BACKGROUNDS = {  # neutral: chroma <= 0.16, so never mistaken for an object colour
    "white": (0.95, 0.95, 0.95),
    "gray": (0.66, 0.66, 0.68),
    "cream": (0.96, 0.92, 0.80),
    "dark": (0.16, 0.16, 0.19),
}
LIGHT_BACKGROUNDS = ("white", "gray", "cream")
# Saturated backgrounds at hues 37+ degrees from every object colour (the detector's tolerance is
# 30, so they are never objects). No prompt names them; the conflict dial's appeal likes them.
VIVID_BACKGROUNDS = {"teal": (0.05, 0.60, 0.60), "rose": (0.85, 0.20, 0.60)}  # hues 180, 323
SIGN_RGB = (0.99, 0.99, 0.99)
INK_RGB = (0.08, 0.08, 0.10)
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 9, "medium": 11, "large": 13}  # side of the bounding box at 32x32, odd


def object_px(size_name: str, image_size: int) -> int:
    """Side in pixels of an object of a named size in an image of side `image_size` (odd)."""
    side = round(SIZES[size_name] * image_size / 32)
    return side if side % 2 else side + 1


@lru_cache(maxsize=None)
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Bool mask [side, side] of a shape filling its box (pixel centres tested, no AA)."""
    c = (np.arange(side) + 0.5) / side - 0.5  # pixel centres in [-0.5, 0.5]
    y, x = c[:, None], c[None, :]
    if shape == "circle":
        return x**2 + y**2 <= 0.25 + 0.5 / side**2  # slack so the disc touches its box
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "triangle":  # apex up, base on the bottom row
        return np.abs(x) <= (y + 0.5) / 2 + 0.5 / side
    if shape == "cross":  # arms 3 px thick at 32x32 (a quarter to a third of the side)
        half = max(1, round(side / 9)) + 0.5
        return (np.abs(x) * side <= half) | (np.abs(y) * side <= half)
    raise ValueError(f"unknown shape {shape!r}; shapes are {SHAPES}")


@dataclass
class Item:
    """One object: a shape of a colour, its box side in px and its top-left corner."""
    shape: str
    color: str
    side: int
    y: int
    x: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), inclusive, as GenEval's detector boxes."""
        return (self.x, self.y, self.x + self.side - 1, self.y + self.side - 1)


@dataclass
class Scene:
    """What one image shows. `text` is drawn at `text_yx` on a white sign when non-empty."""
    background: str
    items: list[Item] = field(default_factory=list)
    text: str = ""
    text_yx: tuple[int, int] = (0, 0)


def sign_box(text: str, text_yx: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) exclusive of the sign behind the text: the text plus a 2 px margin."""
    h, w = text_mask(text, font_scale(size)).shape
    pad = max(1, size // 16)
    y, x = text_yx
    return max(0, y - pad), max(0, x - pad), min(size, y + h + pad), min(size, x + w + pad)


def draw_scene(scene: Scene, size: int) -> np.ndarray:
    """Render one scene into a float32 array [size, size, 3] in [0, 1]."""
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = BACKGROUNDS.get(scene.background) or VIVID_BACKGROUNDS[scene.background]
    for it in scene.items:  # items may hang over the edge (perturbed scenes): clip them
        y0, x0 = max(it.y, 0), max(it.x, 0)
        y1, x1 = min(it.y + it.side, size), min(it.x + it.side, size)
        if y1 > y0 and x1 > x0:
            mask = shape_mask(it.shape, it.side)[y0 - it.y: y1 - it.y, x0 - it.x: x1 - it.x]
            img[y0:y1, x0:x1][mask] = COLORS[it.color]
    if scene.text:
        y0, x0, y1, x1 = sign_box(scene.text, scene.text_yx, size)
        img[y0:y1, x0:x1] = SIGN_RGB
        mask = text_mask(scene.text, font_scale(size))
        y, x = scene.text_yx
        region = img[y: y + mask.shape[0], x: x + mask.shape[1]]
        region[mask[: region.shape[0], : region.shape[1]]] = INK_RGB
    return img


def render_scenes(scenes: list[Scene], size: int = 32) -> torch.Tensor:
    """Render scenes to a float32 tensor [B, 3, size, size] in [0, 1]."""
    arr = np.stack([draw_scene(s, size) for s in scenes]) if scenes else np.zeros((0, size, size, 3), np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
