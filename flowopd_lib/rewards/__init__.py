"""Rewards: a registry of batched scorers `score(name, images, prompts) -> dict of [B] tensors`.

Every scorer takes images float [B, 3, H, W] in [0, 1] and a list of `toy.Prompt` and returns a
dict whose "reward" entry is the training signal; some add evaluation entries:

    geneval    reward (Flow-GRPO partial credit), strict (GenEval correctness, 0/1);
               per-category accuracy: `rewards.geneval.per_category(out["strict"], prompts)`
    ocr        reward (Flow-GRPO OCR reward), exact (text read in full, 0/1)
    pickscore  reward (learned proxy in (0, 1)), true (the hidden taste in [0, 1])
    deqa       reward (quality 1-5; the prompt is ignored)
    taste      reward (the hidden taste alone) and its terms

The toy world's conflict dial (`conflict.py`) changes pickscore and taste (and their versions).

Real-scale scorers for SD3.5-M, named by engine (`rewards.real`): rapidocr (judges ocr),
pickscore_v1, geneval_server (judges geneval; also strict), deqa_server (also quality 1-5).

`register(name, fn, tasks, version)` adds a scorer (e.g. a real-scale one wrapping a reward
server); `tasks` names the prompt tasks it can judge (None = any prompt: it needs no task-specific
spec) and `judges(name, task)` asks. `version(name)` identifies a learned scorer's weights (the
evaluation cache keys on it, so retraining the toy PickScore never reuses its old scores).
`available()` lists the scorers. The toy scorers read pixels only (no access to how an image was made).
"""
from __future__ import annotations

from typing import Callable

import torch

from . import conflict, deqa, geneval, ocr, real, taste

Scorer = Callable[[torch.Tensor, list], dict]
_REGISTRY: dict[str, Scorer] = {}
_TASKS: dict[str, tuple[str, ...] | None] = {}
_VERSIONS: dict[str, Callable[[], str]] = {}


def register(name: str, fn: Scorer, tasks: tuple[str, ...] | None = None,
             version: Callable[[], str] | None = None) -> Scorer:
    """Register a scorer under a name (replacing any previous one); returns it. `version`
    returns a string that changes when the scorer's behaviour does (e.g. a digest of its weights)."""
    _REGISTRY[name] = fn
    _TASKS[name] = tuple(tasks) if tasks is not None else None
    _VERSIONS[name] = version or (lambda: "")
    return fn


def version(name: str) -> str:
    """The registered scorer's version string ("" for a programmatic one without weights)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; available: {available()}")
    return _VERSIONS[name]()


def judges(name: str, task: str) -> bool:
    """Whether reward `name` can score prompts of `task` (geneval needs GenEval specs, ocr a quote)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; available: {available()}")
    return _TASKS[name] is None or task in _TASKS[name]


def available() -> list[str]:
    return sorted(_REGISTRY)


def score(name: str, images: torch.Tensor, prompts: list) -> dict[str, torch.Tensor]:
    """Score a batch with a registered scorer; raises ValueError naming the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; available: {available()}")
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    return _REGISTRY[name](images, prompts)


def _pickscore(images: torch.Tensor, prompts: list) -> dict[str, torch.Tensor]:
    from . import pickscore  # imported on first use: it loads torch weights
    return pickscore.score(images, prompts)


def _pickscore_version() -> str:
    from . import pickscore
    return pickscore.weights_digest() + conflict.tag()  # '' at 0: today's cache keys stay valid


def _taste(images: torch.Tensor, prompts: list) -> dict[str, torch.Tensor]:
    terms = taste.taste_terms(images, prompts)
    return {"reward": terms.pop("taste"), **terms}


register("geneval", geneval.score, tasks=("geneval",))
register("ocr", ocr.score, tasks=("ocr",))
register("pickscore", _pickscore, version=_pickscore_version)
register("deqa", deqa.score)
register("taste", _taste, version=conflict.tag)
register("rapidocr", real.rapidocr.score, tasks=("ocr",))
register("pickscore_v1", real.PickScoreV1())
register("geneval_server", real.GenEvalServer(), tasks=("geneval",))
register("deqa_server", real.DeQAServer())

__all__ = ["available", "conflict", "deqa", "geneval", "judges", "ocr", "real", "register", "score", "taste", "version"]
