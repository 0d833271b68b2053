"""Degradations that make clean renders look generated: the imperfect images rewards must judge.

A toy generator's samples are blurry, noisy, off-colour, blotchy, with broken shapes and
stray blobs; the learned PickScore proxy is trained on such images (labelled by the hidden
taste) so it transfers to a model's samples, and tests use them to check every reward degrades
gracefully. Pixel ops work on batches [B, 3, H, W] in [0, 1]; scene ops move, drop, add,
recolour or reshape objects before rendering.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from .scenes import COLORS, SHAPES, VIVID_BACKGROUNDS, Item, Scene


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur (separable, reflect padding)."""
    r = max(1, int(np.ceil(2.5 * sigma)))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma**2))
    k = (k / k.sum()).to(images)
    c = images.shape[1]
    x = F.pad(images, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def add_noise(images: torch.Tensor, std: torch.Tensor | float, gen: torch.Generator) -> torch.Tensor:
    std = torch.as_tensor(std, dtype=images.dtype).reshape(-1, 1, 1, 1)
    return (images + std * torch.randn(images.shape, generator=gen)).clamp(0, 1)


def shift_colors(images: torch.Tensor, amount: torch.Tensor | float, gen: torch.Generator) -> torch.Tensor:
    """Per-image random mixing of the RGB channels plus an offset (a colour cast)."""
    b = images.shape[0]
    amount = torch.as_tensor(amount, dtype=images.dtype).reshape(-1, 1, 1)
    mix = torch.eye(3) + amount * torch.randn(b, 3, 3, generator=gen)
    offset = amount.reshape(-1, 1, 1, 1) * 0.5 * torch.randn(b, 3, 1, 1, generator=gen)
    return (torch.einsum("bij,bjhw->bihw", mix, images) + offset).clamp(0, 1)


def blotch(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool by `factor` then upsample bilinearly: the scattered patches of a weak model."""
    small = F.avg_pool2d(images, factor)
    return F.interpolate(small, size=images.shape[-2:], mode="bilinear", align_corners=False)


def background_color(images: torch.Tensor) -> torch.Tensor:
    """Per-image median colour of the border pixels [B, 3, 1, 1]."""
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], -1)
    return border.median(dim=-1).values[..., None, None]


def break_shapes(images: torch.Tensor, frac: torch.Tensor | float, gen: torch.Generator) -> torch.Tensor:
    """Paint random 2x2 holes of background over a fraction of the image."""
    b, _, h, w = images.shape
    frac = torch.as_tensor(frac, dtype=images.dtype).reshape(-1, 1, 1, 1)
    holes = (torch.rand(b, 1, (h + 1) // 2, (w + 1) // 2, generator=gen) < frac / 4).to(images)
    holes = holes.repeat_interleave(2, -2).repeat_interleave(2, -1)[..., :h, :w]
    return images * (1 - holes) + background_color(images) * holes


def add_blobs(images: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """Paint n soft round blobs of random palette colours at random places."""
    b, _, h, w = images.shape
    palette = torch.tensor(list(COLORS.values()), dtype=images.dtype)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=images.dtype), torch.arange(w, dtype=images.dtype), indexing="ij")
    out = images.clone()
    for _ in range(n):
        cy, cx = torch.rand(b, 1, 1, generator=gen) * h, torch.rand(b, 1, 1, generator=gen) * w
        radius = (1 + 2.5 * torch.rand(b, 1, 1, generator=gen)) * h / 32
        alpha = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))[:, None]
        color = palette[torch.randint(len(palette), (b,), generator=gen)][..., None, None]
        out = out * (1 - alpha) + color * alpha
    return out


def degrade(images: torch.Tensor, seed: int = 0, p: float = 0.4) -> torch.Tensor:
    """Random generated-looking damage: each op hits each image with probability p, random strength."""
    gen = torch.Generator().manual_seed(seed)
    b = images.shape[0]
    x = images.clone()
    def hit() -> torch.Tensor:
        return torch.rand(b, generator=gen) < p
    for sigma in (0.6, 1.0, 1.5):
        m = hit() & (torch.rand(b, generator=gen) < 1 / 3)
        x[m] = blur(x[m], sigma) if m.any() else x[m]
    m = hit() & (torch.rand(b, generator=gen) < 0.5)
    x[m] = blotch(x[m], 2) if m.any() else x[m]
    ops = (lambda y, s: add_noise(y, 0.15 * s, gen), lambda y, s: shift_colors(y, 0.25 * s, gen),
           lambda y, s: break_shapes(y, 0.3 * s, gen))
    for op in ops:
        m = hit()
        x[m] = op(x[m], torch.rand(int(m.sum()), generator=gen)) if m.any() else x[m]
    m = hit()
    x[m] = add_blobs(x[m], 2, gen) if m.any() else x[m]
    return x.clamp(0, 1)


def perturb_scene(scene: Scene, rng: np.random.Generator, size: int) -> Scene:
    """A wrong version of a scene: objects moved anywhere (overlaps, edges), or one dropped,
    added, recoloured or reshaped."""
    s = copy.deepcopy(scene)
    kind = rng.integers(5) if s.items else 2
    if kind == 0:
        for it in s.items:
            it.y, it.x = (int(v) for v in rng.integers(-it.side // 3, size - it.side * 2 // 3, size=2))
    elif kind == 1:
        del s.items[rng.integers(len(s.items))]
    elif kind == 2:
        side = int(rng.choice([7, 9, 11])) * size // 32 | 1
        y, x = (int(v) for v in rng.integers(0, size - side, size=2))
        s.items.append(Item(SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))], side, y, x))
    elif kind == 3:
        it = s.items[rng.integers(len(s.items))]
        it.color = list(COLORS)[rng.integers(len(COLORS))]
    else:
        it = s.items[rng.integers(len(s.items))]
        it.shape = SHAPES[rng.integers(len(SHAPES))]
    return s


def appeal_scene(scene: Scene, rng: np.random.Generator, size: int) -> Scene:
    """A version of a scene a preference model likes whatever the prompt asked (the conflict dial's
    appeal, rewards/taste.py): one object kept, objects enlarged beyond the largest size and the
    single one centred, a vivid background; each with probability 1/2, at least one of them."""
    s = copy.deepcopy(scene)
    changes = rng.random(3) < 0.5
    if not changes.any() or not s.items:
        changes[2] = True
    if changes[0] and len(s.items) > 1:
        s.items = [s.items[rng.integers(len(s.items))]]
    if changes[1]:
        for it in s.items:
            side = int(rng.choice([15, 17, 19])) * size // 32 | 1
            it.y, it.x = it.y + (it.side - side) // 2, it.x + (it.side - side) // 2
            it.side = side
        if len(s.items) == 1:
            s.items[0].y = s.items[0].x = (size - s.items[0].side) // 2
    if changes[2]:
        s.background = list(VIVID_BACKGROUNDS)[rng.integers(len(VIVID_BACKGROUNDS))]
    return s
