"""Pretraining data for the toy base model: random scenes of every family with web-like captions.

Real text-to-image models are weak at counting, relative position and text because their web
captions rarely state those right. The same is done here: with probability `caption_noise` a
caption loses or garbles its count, relation, quoted text, an object, or (at half that rate)
its colours, while the image stays what the clean prompt described. Colours and shapes stay
mostly right, so the base learns those well and is weak where real models are.

This module makes the data (`pretraining_batch`); the training loop that consumes it is
`flowopd_lib/pretrain.py`.
"""
from __future__ import annotations

import numpy as np
import torch

from .font import GLYPHS
from .grammar import (COUNT_WORDS, PLURALS, RELATIONS, Prompt, article, freeform_text,
                      random_prompt, random_text)
from .layout import scene_for_prompt
from .scenes import COLORS, render_scenes

FAMILY_WEIGHTS = {"geneval": 0.55, "ocr": 0.3, "pickscore": 0.15}
CAPTION_NOISE = 0.2  # the shipped base's (notebook 01 compares 0.3, 0.2 and 0.15)
OCR_WITHOUT_TEXT = ("a sign", "a white sign", "a poster", "a label", "a street sign")


def other(rng: np.random.Generator, options, current):
    options = [o for o in options if o != current]
    return options[rng.integers(len(options))]


def noisy_geneval(p: Prompt, rng: np.random.Generator, noise: float) -> str:
    tag, inc = p.spec["tag"], p.spec["include"]
    def obj(c, color=None):
        head = f"{color} {c['class']}" if color else c["class"]
        return f"{article(head)} {head}"
    if tag == "counting" and rng.random() < noise:
        cls, n = inc[0]["class"], inc[0]["count"]
        if rng.random() < 0.5:
            return f"a photo of {PLURALS[cls]}"
        return f"a photo of {COUNT_WORDS[other(rng, COUNT_WORDS, n)]} {PLURALS[cls]}"
    if tag == "position" and rng.random() < noise:
        a, b = inc[1], inc[0]
        if rng.random() < 0.5:
            return f"a photo of {obj(a)} and {obj(b)}"
        return f"a photo of {obj(a)} {other(rng, RELATIONS, a['position'][0])} {obj(b)}"
    if tag == "two_object" and rng.random() < noise:
        return f"a photo of {obj(inc[rng.integers(2)])}"
    if tag in ("colors", "color_attr") and rng.random() < noise / 2:
        mode = rng.integers(3) if tag == "color_attr" else rng.integers(2)
        colors = [c["color"] for c in inc]
        if mode == 0:    # colours left out
            colors = [None] * len(inc)
        elif mode == 1:  # a wrong colour
            colors[0] = other(rng, COLORS, colors[0])
        else:            # colours bound to the wrong objects
            colors = colors[::-1]
        return "a photo of " + " and ".join(obj(c, col) for c, col in zip(inc, colors))
    return p.text


def noisy_ocr(p: Prompt, rng: np.random.Generator, noise: float) -> str:
    if rng.random() >= noise:
        return p.text
    text = p.spec["text"]
    if rng.random() < 0.5:
        return OCR_WITHOUT_TEXT[rng.integers(len(OCR_WITHOUT_TEXT))]
    if rng.random() < 0.5:  # one glyph wrong
        i = rng.integers(len(text))
        wrong = text[:i] + other(rng, GLYPHS, text[i]) + text[i + 1:]
    else:                   # another text altogether
        wrong = random_text(rng)
    return p.text.replace(f'"{text}"', f'"{wrong}"')


def noisy_freeform(p: Prompt, rng: np.random.Generator, noise: float) -> str:
    if rng.random() >= noise:
        return p.text
    spec = {**p.spec, "objects": [dict(o) for o in p.spec["objects"]]}
    i = rng.integers(len(spec["objects"]))
    mode = rng.integers(4)
    if mode == 0 and len(spec["objects"]) > 1:
        del spec["objects"][i]
    elif mode == 1:
        spec["objects"][i]["count"] = other(rng, [1, 2, 3], spec["objects"][i]["count"])
    elif mode == 2:
        spec["objects"][i]["color"] = None
    else:
        spec["background"] = None
    return freeform_text(spec)


def noisy_caption(p: Prompt, rng: np.random.Generator, noise: float, ocr_noise: float | None = None) -> str:
    """A web-like caption of the scene that `p` describes (see the module docstring); `ocr_noise`
    (None: `noise`) is the rate for signs, whose text web captions transcribe even more rarely."""
    if p.task == "geneval":
        return noisy_geneval(p, rng, noise)
    if p.task == "ocr":
        return noisy_ocr(p, rng, noise if ocr_noise is None else ocr_noise)
    return noisy_freeform(p, rng, noise)


def pretraining_batch(n: int, seed: int, caption_noise: float = CAPTION_NOISE, size: int = 32,
                      ocr_caption_noise: float | None = None) -> tuple[torch.Tensor, list[str]]:
    """n random scenes from all families, rendered [n, 3, size, size], with noisy captions
    (`ocr_caption_noise`: the signs' own rate; None: `caption_noise`)."""
    rng, caption_rng = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    families = list(FAMILY_WEIGHTS)
    picks = rng.choice(len(families), size=n, p=list(FAMILY_WEIGHTS.values()))
    scenes, captions = [], []
    for k in picks:  # scenes do not depend on caption_noise: it only changes the captions
        prompt = random_prompt(families[k], rng)
        scenes.append(scene_for_prompt(prompt, rng, size))
        captions.append(noisy_caption(prompt, caption_rng, caption_noise, ocr_caption_noise))
    return render_scenes(scenes, size), captions
