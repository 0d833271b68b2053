"""A pixel detector for the toy world: colour segmentation, components, shapes, boxes.

Shared by the GenEval reward, the hidden taste and the DeQA score. Steps, all batched:
1. Colour: a pixel is an object pixel when its chroma (max - min of RGB) is high enough; its
   colour is the palette colour nearest in hue (blending with a neutral background keeps hue,
   so blurry generated edges keep their colour) within a hue tolerance. Within each region,
   pixels under half the region's peak chroma are dropped (the blurred halo).
2. Components: 4-connected regions of one colour (scipy.ndimage.label, per image plane).
   Regions smaller than `min_area` are specks (counted as stray pixels, never objects).
3. Shape: the component's mask sampled on an 8x8 grid over its box is compared with soft
   templates made from the renderer's own masks; the best template is the class and its
   agreement (times a squareness factor) the confidence. Below `FIT_MIN` nothing is detected,
   as GenEval's detector drops low-confidence boxes.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from scipy import ndimage

from ..toy.scenes import COLORS, SHAPES, SIZES, object_px, shape_mask

CHROMA_MIN = 0.25   # neutral backgrounds, sign and ink stay below; palette colours are >= 0.75
HUE_TOL = 30.0      # degrees from the nearest palette hue; beyond (cyan, pink...) is no object colour
FIT_MIN = 0.8       # shape confidence needed to count as a detection
GRID = 8
FOUR_CONNECTED = np.array([[[0, 0, 0], [0, 0, 0], [0, 0, 0]],
                           [[0, 1, 0], [1, 1, 1], [0, 1, 0]],
                           [[0, 0, 0], [0, 0, 0], [0, 0, 0]]])


def to_numpy(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """[B, 3, H, W] tensor in [0, 1] -> float32 numpy [B, H, W, 3], clipped."""
    x = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, np.float32)
    return np.clip(x.transpose(0, 2, 3, 1), 0, 1)


def hue_chroma(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360) and chroma of RGB pixels [..., 3]."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    mx, mn = x.max(-1), x.min(-1)
    c = mx - mn
    safe = np.where(c > 0, c, 1)
    h = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return (60 * h) % 360, c


PALETTE_HUES = hue_chroma(np.array(list(COLORS.values()), np.float32))[0]


def color_classes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: index into COLORS or -1 (not an object colour), and the chroma."""
    hue, chroma = hue_chroma(x)
    d = np.abs(hue[..., None] - PALETTE_HUES)
    d = np.minimum(d, 360 - d)
    cls = d.argmin(-1)
    ok = (chroma >= CHROMA_MIN) & (np.take_along_axis(d, cls[..., None], -1)[..., 0] <= HUE_TOL)
    return np.where(ok, cls, -1), chroma


def grid_points(start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """GRID sample coordinates across each box side: [n, GRID] integer pixel indices."""
    frac = (np.arange(GRID) + 0.5) / GRID
    return (start[:, None] + np.floor(frac[None] * length[:, None])).astype(np.int64)


@lru_cache(maxsize=None)
def shape_templates(image_size: int) -> np.ndarray:
    """Soft templates [len(SHAPES), GRID, GRID]: each shape's grid samples averaged over sizes."""
    out = np.zeros((len(SHAPES), GRID, GRID), np.float32)
    sides = [object_px(name, image_size) for name in SIZES]
    for i, shape in enumerate(SHAPES):
        for side in sides:
            pts = grid_points(np.zeros(1), np.array([side]))[0]
            out[i] += shape_mask(shape, side)[np.ix_(pts, pts)]
    return out / len(sides)


@dataclass
class Detections:
    """Objects found in a batch. Per object (arrays of length N): the image it is in, shape and
    colour indices (into SHAPES / COLORS; shape -1 when no template fits), confidence, area and
    box (x0, y0, x1, y1) inclusive. Per image [B]: specks (regions too small to be objects)."""
    image: np.ndarray
    shape: np.ndarray
    color: np.ndarray
    fit: np.ndarray
    area: np.ndarray
    box: np.ndarray
    specks: np.ndarray

    def objects_in(self, b: int) -> np.ndarray:
        """Indices of image b's detected objects, most confident first."""
        idx = np.nonzero((self.image == b) & (self.shape >= 0))[0]
        return idx[np.argsort(-self.fit[idx], kind="stable")]


def min_area(size: int) -> int:
    return max(3, round(12 * (size / 32) ** 2))


def label_components(cls: np.ndarray) -> tuple[np.ndarray, int]:
    """Unique labels for the 4-connected same-colour regions of every image: [B, H, W], count."""
    labels = np.zeros(cls.shape, np.int64)
    total = 0
    for c in range(len(COLORS)):
        lab, n = ndimage.label(cls == c, structure=FOUR_CONNECTED)
        labels += np.where(lab > 0, lab + total, 0)
        total += n
    return labels, total


def sharpen(cls: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """Keep only the pixels of each region with at least half its peak chroma: the half-way
    contour of a blurred edge is where the sharp edge was, so blurry shapes keep their shape."""
    labels, n = label_components(cls)
    if n == 0:
        return cls
    peak = np.concatenate([[np.inf], ndimage.maximum(chroma, labels, np.arange(1, n + 1))])
    return np.where(chroma >= 0.5 * peak[labels], cls, -1)


def detect(images: torch.Tensor | np.ndarray) -> Detections:
    """Run the detector on a batch [B, 3, H, W] in [0, 1]."""
    x = to_numpy(images)
    b, h, w, _ = x.shape
    cls = sharpen(*color_classes(x))
    labels, n = label_components(cls)
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1)[1:]
    bidx = np.repeat(np.arange(b), h * w)
    img_of = np.rint(np.bincount(flat, bidx, n + 1)[1:] / np.maximum(area, 1)).astype(np.int64)
    color_of = np.zeros(n, np.int64)
    color_of[flat[flat > 0] - 1] = cls.ravel()[flat > 0]

    big = np.nonzero(area >= min_area(h))[0]
    specks = np.bincount(img_of[area < min_area(h)], minlength=b)
    slices = ndimage.find_objects(labels)
    box = np.array([[slices[i][2].start, slices[i][1].start, slices[i][2].stop - 1, slices[i][1].stop - 1]
                    for i in big], np.int64).reshape(-1, 4)
    bw, bh = box[:, 2] - box[:, 0] + 1, box[:, 3] - box[:, 1] + 1
    ys, xs = grid_points(box[:, 1], bh), grid_points(box[:, 0], bw)
    samples = labels[img_of[big][:, None, None], ys[:, :, None], xs[:, None, :]] == (big + 1)[:, None, None]
    agree = 1 - np.abs(samples[:, None].astype(np.float32) - shape_templates(h)[None]).mean((-1, -2))
    squareness = np.minimum(1, np.minimum(bw, bh) / np.maximum(np.maximum(bw, bh), 1) / 0.8)
    fit = agree.max(-1) * squareness if len(big) else np.zeros(0)
    shape = np.where(fit >= FIT_MIN, agree.argmax(-1) if len(big) else 0, -1)
    return Detections(image=img_of[big], shape=shape, color=color_of[big], fit=fit, area=area[big],
                      box=box, specks=specks)
