"""From a prompt's spec to a concrete scene: sizes, colours left open, positions; then pixels.

Ground-truth renders satisfy their prompt exactly (every object fully visible with a gap to
its neighbours, relations held by a clear margin) so the rewards can be strict on them.
Relative position is GenEval's rule (centre offset minus 0.1 of the summed box sizes,
normalised, |component| > 0.5), shared with the detector so scene and judge agree.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .font import font_scale, text_mask
from .grammar import Prompt
from .scenes import (BACKGROUNDS, COLORS, LIGHT_BACKGROUNDS, SIZES, Item, Scene, object_px,
                     render_scenes, sign_box)

POSITION_THRESHOLD = 0.1  # GenEval's
RELATION_MARGIN = 0.7     # ground truth holds its relation well beyond GenEval's 0.5
# Object corners sit at one phase of the toy autoencoder's 4-px latent grid (models.toy), so a
# shape always has the same latent code wherever it stands. At free pixel offsets the base drew
# blobs for twice as long (docs/toy_world.md, design measurements).
LATENT_CELL = 4


def relation_vector(box_a, box_b) -> tuple[float, float]:
    """GenEval's revised offset of A from B, normalised: (dx, dy), y pointing down."""
    off = ((box_a[0] + box_a[2] - box_b[0] - box_b[2]) / 2, (box_a[1] + box_a[3] - box_b[1] - box_b[3]) / 2)
    dim = (box_a[2] - box_a[0] + box_b[2] - box_b[0], box_a[3] - box_a[1] + box_b[3] - box_b[1])
    revised = [math.copysign(max(abs(o) - POSITION_THRESHOLD * d, 0), o) for o, d in zip(off, dim)]
    norm = math.hypot(*off)
    if norm == 0 or max(abs(r) for r in revised) < 1e-3:
        return 0.0, 0.0
    return revised[0] / norm, revised[1] / norm


def relations(box_a, box_b, threshold: float = 0.5) -> set[str]:
    """The GenEval relations ("left of", ...) that hold for A relative to B."""
    dx, dy = relation_vector(box_a, box_b)
    found = set()
    if dx < -threshold: found.add("left of")
    if dx > threshold: found.add("right of")
    if dy < -threshold: found.add("above")
    if dy > threshold: found.add("below")
    return found


def _corner_grid(low: int, high: int) -> np.ndarray:
    """Corner coordinates in [low, high] on the latent grid's phase (all of them if none is)."""
    free = np.arange(low, high + 1)
    on_grid = free[free % LATENT_CELL == LATENT_CELL // 2]
    return on_grid if len(on_grid) else free


def place(sides: list[int], size: int, rng: np.random.Generator, relation: str | None = None,
          tries: int = 100) -> list[tuple[int, int]]:
    """Top-left corners for boxes of these sides, inside the image with a margin and a gap
    between boxes; with `relation`, box 1 stands in that relation to box 0."""
    margin = gap = max(1, size // 32)
    grids = [_corner_grid(margin, size - margin - side) for side in sides]
    for _ in range(tries):
        corners = []
        for side, grid in zip(sides, grids):
            for y, x in grid[rng.integers(len(grid), size=(30, 2))].tolist():
                if all(y >= cy + cs + gap or cy >= y + side + gap or x >= cx + cs + gap or cx >= x + side + gap
                       for (cy, cx), cs in zip(corners, sides)):
                    corners.append((y, x))
                    break
            else:
                break
        if len(corners) < len(sides):
            continue
        boxes = [(x, y, x + s - 1, y + s - 1) for (y, x), s in zip(corners, sides)]
        if relation is None or relation in relations(boxes[1], boxes[0], RELATION_MARGIN):
            return corners
    raise RuntimeError(f"could not place {len(sides)} objects in a {size}px image")


def pick(rng: np.random.Generator, options) -> str:
    options = list(options)
    return options[rng.integers(len(options))]


def wanted_items(prompt: Prompt, rng: np.random.Generator) -> tuple[list[dict], str | None]:
    """The objects a prompt asks for, one dict per object, and a relation between the first two."""
    spec = prompt.spec
    if prompt.task == "geneval":
        objs, relation = [], None
        for clause in spec["include"]:
            color = clause.get("color") or pick(rng, COLORS)  # one colour per clause
            many = sum(c["count"] for c in spec["include"]) > 2
            for _ in range(clause["count"]):
                objs.append({"shape": clause["class"], "color": color,
                             "size": pick(rng, ["small", "medium"] if many else SIZES)})
            if "position" in clause:
                relation = clause["position"][0]
        return objs, relation
    objs = []
    many = sum(g["count"] for g in spec.get("objects", [])) > 2
    for group in spec.get("objects", []):
        color = group.get("color") or pick(rng, COLORS)
        for _ in range(group["count"]):
            size = group.get("size") or pick(rng, ["small", "medium"] if many else SIZES)
            objs.append({"shape": group["shape"], "color": color, "size": size})
    return objs, None


def scene_for_prompt(prompt: Prompt, rng: np.random.Generator, size: int = 32) -> Scene:
    """A random scene that satisfies the prompt (what is left open is drawn from `rng`)."""
    if prompt.task == "ocr":
        text = prompt.spec["text"]
        # Centred, as on most signs. At a random offset every glyph (pitch 7 px) lands at any
        # phase of the 4-px latent grid: the base then read right less than half as often
        # (docs/toy_world.md, design measurements).
        h, w = text_mask(text, font_scale(size)).shape
        return Scene(pick(rng, ["gray", "cream", "dark"]), [], text, ((size - h) // 2, (size - w) // 2))
    objs, relation = wanted_items(prompt, rng)
    sides = [object_px(o["size"], size) for o in objs]
    corners = place(sides, size, rng, relation)
    background = prompt.spec.get("background") or pick(
        rng, LIGHT_BACKGROUNDS if prompt.task == "geneval" else BACKGROUNDS)
    items = [Item(o["shape"], o["color"], s, y, x) for o, s, (y, x) in zip(objs, sides, corners)]
    return Scene(background, items)


def scenes_for_prompts(prompts: list[Prompt], seed: int = 0, size: int = 32) -> list[Scene]:
    """One scene per prompt; prompt i draws from the generator seeded (seed, i)."""
    return [scene_for_prompt(p, np.random.default_rng([seed, i]), size) for i, p in enumerate(prompts)]


def render(prompts: list[Prompt], seed: int = 0, size: int = 32) -> torch.Tensor:
    """Ground-truth images of prompts: float32 [B, 3, size, size] in [0, 1]; same seed, same images."""
    return render_scenes(scenes_for_prompts(prompts, seed, size), size)
