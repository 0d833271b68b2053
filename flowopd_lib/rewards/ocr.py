"""OCR for the toy world: a template-matching glyph reader and Flow-GRPO's OCR reward.

Reader: darkness (1 - luminance) is matched against every glyph of the toy font at every
position by normalised cross-correlation (zero-mean, unit-norm, so it ignores contrast and
brightness, which makes it tolerant to blurry or washed-out text and blind to flat regions;
each template includes a blank frame around the glyph).
The text line is the row of the best match (+-1 px); along it, peaks above `MATCH_MIN` that
are the best within one glyph pitch are read left to right. One line of text is read.

Reward, exactly Flow-GRPO's: target = the quoted text of the prompt; both lower-cased with
spaces removed; distance = 0 if the target is a substring of what was read, else the
Levenshtein distance, capped at the target's length; reward = 1 - distance / len(target).
"exact" is 1 when the reward is 1. A prompt whose quotes hold no text (`a sign that says ""`, or
only spaces) has no reward (it would divide by 0): scoring it raises ValueError naming the prompt.
"""
from __future__ import annotations

from functools import lru_cache

import Levenshtein
import numpy as np
import torch
import torch.nn.functional as F

from ..toy.font import GLYPHS, font_scale, glyph_masks, glyph_spacing
from ..toy.grammar import Prompt, parse_ocr

MATCH_MIN = 0.8  # normalised correlation a glyph needs to be read


@lru_cache(maxsize=None)
def templates(size: int) -> torch.Tensor:
    """Zero-mean, unit-norm glyph templates [G, 1, gh, gw] for images of side `size`, each
    glyph framed by one glyph spacing of blank: a glyph is ink with paper around it, which
    keeps the edges of a sign or a shape from reading as "L" or "H"."""
    pad = glyph_spacing(font_scale(size))
    t = torch.from_numpy(np.pad(glyph_masks(font_scale(size)), ((0, 0), (pad, pad), (pad, pad))).astype(np.float32))
    t = t - t.mean((1, 2), keepdim=True)
    return (t / t.norm(dim=(1, 2), keepdim=True))[:, None]


def match_maps(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best normalised correlation over glyphs at each top-left position, and which glyph:
    two [B, H - gh + 1, W - gw + 1] tensors."""
    dark = 1 - images.float().clamp(0, 1).mean(1, keepdim=True)
    t = templates(images.shape[-1])
    gh, gw = t.shape[-2:]
    num = F.conv2d(dark, t)  # templates are zero-mean: sum (p - mean p) t = sum p t
    box = torch.ones(1, 1, gh, gw)
    s1, s2 = F.conv2d(dark, box), F.conv2d(dark**2, box)
    norm = (s2 - s1**2 / (gh * gw)).clamp_min(0).sqrt()
    ncc = num / norm.clamp_min(0.05 * (gh * gw) ** 0.5)  # flat patches (std < 0.05) score ~0
    return ncc.max(1)


def read_text(images: torch.Tensor) -> list[str]:
    """The line of glyphs the reader sees in each image [B, 3, H, W] (may be empty)."""
    if len(images) == 0:
        return []
    score, glyph = match_maps(images)
    b, hy, wx = score.shape
    row = score.reshape(b, -1).argmax(1) // wx
    rows = (row[:, None] + torch.arange(-1, 2)).clamp(0, hy - 1)       # the line, +-1 px
    band = score.gather(1, rows[:, :, None].expand(b, 3, wx))
    best, which_row = band.max(1)
    which = glyph.gather(1, rows[:, :, None].expand(b, 3, wx)).gather(1, which_row[:, None])[:, 0]
    pitch = templates(images.shape[-1]).shape[-1]  # framed width = glyph width + spacing (x2 halves)
    k = pitch - 1 if pitch % 2 == 0 else pitch  # odd window of about one glyph pitch
    local_max = F.max_pool1d(best[:, None], k, stride=1, padding=k // 2)[:, 0]
    keep = (best >= MATCH_MIN) & (best == local_max)
    return ["".join(GLYPHS[g] for g in which[i][keep[i]].tolist()) for i in range(b)]


def ocr_reward(read: str, target: str) -> float:
    """Flow-GRPO's OCR reward of what was read against the target text (ValueError if the target
    is empty once spaces are removed: the reward divides by its length)."""
    read, target = read.replace(" ", "").lower(), target.replace(" ", "").lower()
    if not target:
        raise ValueError(f"the OCR target text is empty ({target!r}); the reward needs text to read")
    dist = 0 if target in read else Levenshtein.distance(read, target)
    return 1 - min(dist, len(target)) / len(target)


def target_text(prompt: Prompt | str) -> str:
    """The text an OCR prompt asks for: its spec's "text", else what its first pair of double
    quotes holds. ValueError naming the prompt when that is empty (or only spaces)."""
    spec = getattr(prompt, "spec", None) or {}
    text = getattr(prompt, "text", prompt)
    target = spec["text"] if "text" in spec else parse_ocr(text)["text"]
    if not target.replace(" ", ""):
        raise ValueError(f"OCR prompt {text!r} quotes no text ({target!r}): the OCR reward scores the quoted "
                         "text, so quote some, e.g. 'a sign that says \"OPEN\"'")
    return target


def score(images: torch.Tensor, prompts: list[Prompt]) -> dict[str, torch.Tensor]:
    """{"reward": Flow-GRPO OCR reward [B], "exact": 1 if the text was read in full [B]}.
    Raises ValueError naming a prompt that quotes no text (`a sign that says ""`)."""
    targets = [target_text(p) for p in prompts]
    rewards = torch.tensor([ocr_reward(r, t) for r, t in zip(read_text(images), targets)], dtype=torch.float32)
    return {"reward": rewards, "exact": (rewards == 1).float()}
