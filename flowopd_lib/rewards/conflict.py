"""The toy world's conflict dial: how far the hidden taste trades faithfulness for appeal.

Real preference models reward more than faithfulness to the prompt: fewer, larger, centred
subjects and saturated backgrounds (on SD3.5-M the paper's PickScore teacher drops GenEval
0.63 -> 0.51). At conflict c in [0, 1] the taste (`taste.py`) becomes

    taste_c = F ** (1 - c) * (0.25 + 0.75 * ((1 - c) * A + c * P))

with F faithfulness, A the aesthetic terms of today's taste (harmony, composition, clean edges)
and P the appeal (`taste.appeal`: one bold subject on a vivid background). c = 0 is today's
world bit for bit; at c = 1 faithfulness no longer counts. GenEval, OCR and DeQA never change.

The dial is one number per process, taken from the run's config (`EvalConfig.conflict`) by every
trainer and evaluation job (`use(cfg.conflict)`), written in every run's config, and part of the
version of every reward that depends on it (`pickscore`, `taste`), so the evaluation cache never
mixes settings. Each setting has its own PickScore proxy, learned from that setting's taste
(`pickscore.weights_dir`); `python -m flowopd_lib.rewards.pickscore --conflict c` trains one.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

from ..cli import UserError

_setting = 0.0


def check(value: float) -> float:
    """`value` as a float in [0, 1]; a UserError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise UserError(f"conflict={value!r} is not a number in [0, 1] (0: today's toy world, where the taste "
                        "rewards faithfulness; 1: appeal alone)")
    return float(value)


def get() -> float:
    """The current setting."""
    return _setting


def use(value: float) -> None:
    """Set the dial for this process (trainers and evaluation jobs call it with their config's value)."""
    global _setting
    _setting = check(value)


@contextlib.contextmanager
def setting(value: float) -> Iterator[float]:
    """The dial at `value` inside the block, restored after it."""
    before = get()
    use(value)
    try:
        yield get()
    finally:
        use(before)


def tag(value: float | None = None) -> str:
    """A setting as a short name ('' at 0, so today's caches and weights keep their names)."""
    value = get() if value is None else check(value)
    return "" if value == 0 else f"conflict{value:g}"
