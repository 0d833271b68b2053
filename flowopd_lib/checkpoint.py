"""Training checkpoints: everything a loop needs to continue as if never interrupted.

One file per checkpoint (`state.pt`: module and optimizer states, EMA, step, RNG states,
anything else the trainer adds), written atomically so a kill mid-write never leaves a
half-written checkpoint behind; `latest()` finds the newest one. A file can still be damaged
afterwards (a full disk, a bad copy): `load_latest()` warns about an unreadable newest checkpoint,
naming it, and falls back to the previous complete one (`save` keeps two for that reason).
"""
from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """No complete checkpoint to resume from although checkpoints exist (the message names them)."""


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


def load_latest(directory: str | Path, restore_rng: bool = True,
                required: tuple[str, ...] = ("step",)) -> tuple[Path, dict[str, Any]] | None:
    """(path, state) of the newest checkpoint under `directory` that loads and has the `required`
    keys; None if there is no checkpoint at all.

    An unreadable one (truncated, garbage, not a checkpoint) is reported by path in a warning and
    the one before it is tried; if checkpoints exist but none loads, CheckpointError names them all."""
    found = sorted((p for p in Path(directory).glob("step_*") if (p / "state.pt").exists()), reverse=True)
    failures = []
    for path in found:
        try:
            state = load(path, restore_rng=False)
            missing = [k for k in required if k not in state] if isinstance(state, dict) else list(required)
            if missing:
                raise ValueError(f"not a complete checkpoint: no {missing}")
        except Exception as error:  # torch.load raises RuntimeError, UnpicklingError, EOFError, ...
            first_line = (str(error).splitlines() or [""])[0][:200]
            failures.append(f"{path / 'state.pt'} ({type(error).__name__}: {first_line})")
            warnings.warn(f"unreadable checkpoint {failures[-1]}; trying the one before it", stacklevel=2)
            continue
        if restore_rng:
            set_rng_state(state["rng"])
        return path, state
    if failures:
        raise CheckpointError(f"no complete checkpoint in {directory}: " + "; ".join(failures) +
                              f". Restore one of these files, or delete {directory} (or the whole run "
                              "directory) to start fresh")
    return None
