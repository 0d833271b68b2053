"""Training checkpoints: everything a loop needs to continue as if never interrupted.

One file per checkpoint (`state.pt`: module and optimizer states, EMA, step, RNG states,
anything else the trainer adds), written atomically so a kill mid-write never leaves a
half-written checkpoint behind; `latest()` finds the newest one.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(directory: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `directory/step_{step:07d}/state.pt` atomically; keep only the newest `keep`."""
    directory = Path(directory)
    target = directory / f"step_{step:07d}"
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / "state.pt.tmp"
    torch.save({"step": step, "rng": rng_state(), **state}, tmp)
    os.replace(tmp, target / "state.pt")
    for old in sorted(directory.glob("step_*"))[:-keep]:
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    return target


def latest(directory: str | Path) -> Path | None:
    done = sorted(p for p in Path(directory).glob("step_*") if (p / "state.pt").exists())
    return done[-1] if done else None


def load(path: str | Path, restore_rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint directory (or its state.pt); restores the global RNGs unless told not to."""
    path = Path(path)
    state = torch.load(path / "state.pt" if path.is_dir() else path, weights_only=False)
    if restore_rng:
        set_rng_state(state["rng"])
    return state
