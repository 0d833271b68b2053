"""A DeQA-like image-quality score for the toy world, 1 (bad) to 5 (clean), prompt-agnostic.

Five quality terms in (0, 1]:
- noise:   1 / (1 + (std / 0.04)^2), std from Immerkaer's residual, taking the median |residual|
           so the few edge pixels of a clean flat render do not count as noise;
- blur:    how much a 3-tap box blur would still reduce the gradients (Crete-Roffet's re-blur
           test): a hard step loses 2/3 of its gradient, an already blurred edge almost none;
- stray:   specks of object colour too small to be objects;
- shapes:  how well the coloured regions fit a shape template (broken or melted shapes fit badly);
- content: an empty canvas is clean but not a good image.
score = 1 + 4 * sqrt(product of the terms): every defect costs, none alone pins the score to 1,
so the score stays graded (a GRPO signal) on blurry samples. Clean renders score 5, a blank
canvas ~2.3, blur sigma 0.7 ~3.4, noise std 0.1 ~1.2 (measured on test prompts).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..toy.grammar import Prompt
from .detect import Detections, detect, to_numpy

NOISE_SCALE = 0.04       # noise std at which the noise term is 1/2
SHARP, SOFT = 0.62, 0.05  # re-blur loss of a sharp render (2/3 for a perfect step) / of a smooth one
STRAY_SCALE = 8.0        # specks at which the stray term is 1/e
CONTENT_MIN = 0.03       # fraction of non-background pixels of a scene with something in it
FLOOR = 0.01             # no term reaches 0, so a product stays informative
def noise_std(x: np.ndarray) -> np.ndarray:
    """Per-image noise std estimate [B] of images [B, H, W, 3] (Immerkaer's residual
    [[1,-2,1],[-2,4,-2],[1,-2,1]], median |residual| for robustness to edges)."""
    rows = x[:, :-2] - 2 * x[:, 1:-1] + x[:, 2:]
    r = rows[:, :, :-2] - 2 * rows[:, :, 1:-1] + rows[:, :, 2:]
    # |r| of white noise of std s has median 0.674 * 6 s (the kernel's norm is 6)
    return np.median(np.abs(r).reshape(len(x), -1), axis=1) / (0.674 * 6)


def reblur_loss(x: np.ndarray) -> np.ndarray:
    """Fraction of gradient a 3-tap box blur removes, per image [B]; 2/3 for hard edges."""
    loss, total = 0, 0
    for axis in (1, 2):
        n = x.shape[axis]
        grad = np.abs(np.diff(x, axis=axis)).take(range(1, n - 2), axis=axis)
        blurred = (x.take(range(0, n - 2), axis=axis) + x.take(range(1, n - 1), axis=axis)
                   + x.take(range(2, n), axis=axis)) / 3
        loss = loss + np.maximum(grad - np.abs(np.diff(blurred, axis=axis)), 0).reshape(len(x), -1).sum(1)
        total = total + grad.reshape(len(x), -1).sum(1)
    return np.where(total > 1e-6, loss / np.maximum(total, 1e-6), 2 / 3)


def content_fraction(x: np.ndarray) -> np.ndarray:
    """Fraction of pixels clearly different from the background (the border's median colour)."""
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)  # [B, 4W, 3]
    bg = np.median(border, axis=1)[:, None, None]
    return (np.abs(x - bg).max(-1) > 0.2).reshape(len(x), -1).mean(1)


def shape_quality(det: Detections, batch: int) -> np.ndarray:
    """Mean template fit of each image's coloured regions mapped to [0, 1]; 1 without regions."""
    good = np.clip((det.fit - 0.6) / 0.35, 0, 1)
    n = np.bincount(det.image, minlength=batch)
    total = np.bincount(det.image, good, minlength=batch)
    return np.where(n > 0, total / np.maximum(n, 1), 1.0)


def quality_terms(images: torch.Tensor, det: Detections | None = None) -> dict[str, torch.Tensor]:
    """The five quality terms in [FLOOR, 1], each [B]."""
    x = to_numpy(images)
    det = det if det is not None else detect(images)
    terms = {
        "noise": 1 / (1 + (noise_std(x) / NOISE_SCALE) ** 2),
        "blur": (reblur_loss(x) - SOFT) / (SHARP - SOFT),
        "stray": np.exp(-det.specks / STRAY_SCALE),
        "shapes": shape_quality(det, len(x)),
        "content": 0.1 + 0.9 * content_fraction(x) / CONTENT_MIN,
    }
    return {k: torch.from_numpy(np.clip(v, FLOOR, 1).astype(np.float32)) for k, v in terms.items()}


def score(images: torch.Tensor, prompts: list[Prompt] | None = None,
          det: Detections | None = None) -> dict[str, torch.Tensor]:
    """{"reward": quality 1-5 [B]} (prompts are ignored: quality is judged on any prompt)."""
    q = math.prod(quality_terms(images, det).values())
    return {"reward": 1 + 4 * q.sqrt()}
