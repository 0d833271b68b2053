"""GenEval for the toy world: strict correctness for evaluation, partial credit for training.

Objects come from the pixel detector (`detect.py`); the judging mirrors the rules of
Flow-GRPO's GenEval reward server on GenEval metadata (`include` clauses, `exclude` for
counting, relative position with GenEval's 0.1 box-size threshold):

reward (training, partial credit), the mean over per-clause terms:
  count term          1 - |count - found| / count   (found = all detections of the class;
                      unclipped, so it goes negative when many more are found, as upstream)
  if the count is wrong, one 0 term for the clause's colour and/or position;
  else colour term    1 - |count - found with the right colour| / count
       position term  (only if the colour matched) 1 if every object stands in the relation
                      to every object of the target clause, else 0 (upstream also appends a
                      1 after a failing 0, a slip not copied here)
strict (evaluation, 0/1): every count exact, every colour right, every relation held, and no
  `exclude` clause violated.

Per-category accuracy: the GenEval category of each prompt is `prompt.spec["tag"]`;
`per_category(strict, prompts)` averages strict correctness per tag.
"""
from __future__ import annotations

import numpy as np
import torch

from ..toy.grammar import GENEVAL_TAGS, Prompt
from ..toy.layout import relations
from ..toy.scenes import COLORS, SHAPES
from .detect import Detections, detect

COLOR_INDEX = {c: i for i, c in enumerate(COLORS)}
SHAPE_INDEX = {s: i for i, s in enumerate(SHAPES)}


def judge(det: Detections, b: int, meta: dict) -> tuple[bool, float]:
    """(strict correctness, partial-credit score) of image b against GenEval metadata."""
    objs = det.objects_in(b)
    by_class = {s: objs[det.shape[objs] == i] for s, i in SHAPE_INDEX.items()}
    correct, terms, groups = True, [], []
    for clause in meta.get("include", []):
        found = by_class[clause["class"]]
        want = clause["count"]
        matched = True
        terms.append(1 - abs(want - len(found)) / want)
        if len(found) != want:
            correct = matched = False
            if "color" in clause or "position" in clause:
                terms.append(0.0)
        else:
            if "color" in clause:
                right = int((det.color[found] == COLOR_INDEX[clause["color"]]).sum())
                terms.append(1 - abs(want - right) / want)
                if right != want:
                    correct = matched = False
            if "position" in clause and matched:
                rel, target = clause["position"]
                held = groups[target] is not None and all(
                    rel in relations(det.box[i], det.box[j]) for i in found for j in groups[target])
                terms.append(1.0 if held else 0.0)
                correct = matched = correct and held
        groups.append(found if matched else None)
    for clause in meta.get("exclude", []):
        if len(by_class[clause["class"]]) >= clause["count"]:
            correct = False
    return correct, (sum(terms) / len(terms) if terms else 0.0)


def score(images: torch.Tensor, prompts: list[Prompt]) -> dict[str, torch.Tensor]:
    """{"reward": partial credit [B], "strict": 0/1 [B]} for GenEval prompts."""
    det = detect(images)
    out = np.array([judge(det, b, p.spec) for b, p in enumerate(prompts)], dtype=np.float32).reshape(-1, 2)
    return {"reward": torch.from_numpy(out[:, 1].copy()), "strict": torch.from_numpy(out[:, 0].copy())}


def per_category(strict: torch.Tensor, prompts: list[Prompt]) -> dict[str, float]:
    """Strict accuracy per GenEval tag (tags absent from the batch are left out) and "overall",
    the mean over the tags present, as GenEval reports it."""
    tags = np.array([p.spec["tag"] for p in prompts])
    acc = {t: float(strict.numpy()[tags == t].mean()) for t in GENEVAL_TAGS if (tags == t).any()}
    acc["overall"] = float(np.mean(list(acc.values()))) if acc else float("nan")
    return acc
