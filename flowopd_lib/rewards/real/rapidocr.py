"""`rapidocr`: Flow-GRPO's OCR reward read by a real OCR engine that works offline.

Flow-GRPO reads text with PaddleOCR; RapidOCR (`rapidocr_onnxruntime`) runs the same PP-OCR
models (v4 detection and recognition, exported to ONNX) and ships them inside its wheel, so no
download happens at run time. The engine is configured like Flow-GRPO's PaddleOCR: no angle
classifier, detection input limited to 960 px on the longest side (PaddleOCR's default; a 512 px
image is read at its own size), recognitions below confidence 0.5 dropped.

Scoring is the toy OCR reward's rule (`rewards.ocr.ocr_reward`, Flow-GRPO's): the target is the
text between the prompt's first pair of double quotes; every recognised line is joined in the
engine's reading order; both lower-cased with spaces removed; distance 0 if the target is a
substring of what was read, else the Levenshtein distance capped at the target's length;
reward = 1 - distance / len(target). "exact" is 1 when the reward is 1. A prompt whose quotes
hold no text (`a sign that says ""`) raises ValueError naming it (`rewards.ocr.target_text`).

The engine runs on the CPU (onnxruntime), as Flow-GRPO's PaddleOCR does (`use_gpu=False`);
it is built on first use and cached. `score(images, prompts, engine=RapidOCR(...))` scores with
another configuration.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from ..ocr import ocr_reward, target_text
from .inputs import prompt_text, to_uint8

ENGINE_OPTIONS = {"use_cls": False, "det_limit_type": "max", "det_limit_side_len": 960, "text_score": 0.5}


@lru_cache(maxsize=1)
def default_engine():
    """The shared RapidOCR engine with `ENGINE_OPTIONS` (loads in ~1 s)."""
    from rapidocr_onnxruntime import RapidOCR

    return RapidOCR(**ENGINE_OPTIONS)


def read_text(images: torch.Tensor, engine=None) -> list[str]:
    """Everything the engine reads in each image [B, 3, H, W], lines joined ("" if nothing)."""
    engine = engine or default_engine()
    texts = []
    for pixels in to_uint8(images):
        lines, _ = engine(pixels)
        texts.append("".join(text for _, text, _ in lines or []))
    return texts


def score(images: torch.Tensor, prompts: list, engine=None) -> dict[str, torch.Tensor]:
    """{"reward": Flow-GRPO OCR reward [B], "exact": 1 if the quoted text was read in full [B]}.
    Raises ValueError naming a prompt that quotes no text (`a sign that says ""`)."""
    targets = [target_text(prompt_text(p)) for p in prompts]  # before the engine reads anything
    read = read_text(images, engine)
    rewards = torch.tensor([ocr_reward(r, t) for r, t in zip(read, targets)], dtype=torch.float32)
    return {"reward": rewards, "exact": (rewards == 1).float()}
