"""Training checkpoints: everything a loop needs to continue as if never interrupted.

One file per checkpoint (`state.pt`: module and optimizer states, EMA, step, RNG states,
anything else the trainer adds), written atomically so a kill mid-write never leaves a
half-written checkpoint behind; `latest()` finds the newest one. A file can still be damaged
afterwards (a full disk, a bad copy): `load_latest()` warns about an unreadable newest checkpoint,
naming it, and falls back to the previous complete one (`save` keeps two for that reason).

Safety: a checkpoint is loaded with `weights_only=True` (tensors, numbers, strings, lists, dicts:
nothing in the file can run code), so the RNG states are stored as tensors and plain tuples. A file
that would need more (a crafted pickle) is refused with a CheckpointError, never skipped with a
warning: a run directory someone else made must not run code or silently resume from older state.
Devices: `map_location` puts every tensor on the loading process's device (each rank its own GPU,
not the one the state was saved from).
"""
from __future__ import annotations

import os
import pickle
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cli import UserError


class CheckpointError(UserError, RuntimeError):
    """No complete checkpoint to resume from although checkpoints exist (the message names them); a
    run directory's problem, so a command reports it in one line (cli.py)."""


def rng_state() -> dict[str, Any]:
    """The global RNG states in types a weights-only load accepts (tensors, ints, floats, tuples)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
            "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys.cpu().numpy(), dtype=np.uint32), pos, has_gauss, cached))
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


class UnsafeCheckpointError(CheckpointError):
    """The file holds objects a weights-only load refuses: it could run code, so it is not loaded."""


def load(path: str | Path, restore_rng: bool = True, map_location=None) -> dict[str, Any]:
    """Load a checkpoint directory (or its state.pt) onto `map_location` (default: where it was
    saved from); restores the global RNGs unless told not to. Weights only: a file whose objects
    could run code raises UnsafeCheckpointError."""
    path = Path(path)
    file = path / "state.pt" if path.is_dir() else path
    if map_location is not None and torch.device(map_location).type == "cpu":
        map_location = "cpu"  # accelerate's CPU ranks say cpu:0, which torch.load cannot restore to
    try:
        state = torch.load(file, weights_only=True, map_location=map_location)
    except pickle.UnpicklingError as error:
        refused = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line]
        if not refused:
            raise  # a damaged file (garbage bytes), not one that asked for code to run
        raise UnsafeCheckpointError(
            f"{file} is unsafe to load: it asks to import code, which a checkpoint never needs "
            f"({refused[0][:200]}). It was not loaded; delete it if you did not write it") from None
    if restore_rng:
        set_rng_state(state["rng"])
    return state


def load_latest(directory: str | Path, restore_rng: bool = True, required: tuple[str, ...] = ("step",),
                map_location=None) -> tuple[Path, dict[str, Any]] | None:
    """(path, state) of the newest checkpoint under `directory` that loads and has the `required`
    keys, tensors on `map_location`; None if there is no checkpoint at all.

    An unreadable one (truncated, garbage, not a checkpoint) is reported by path in a warning and
    the one before it is tried; if checkpoints exist but none loads, CheckpointError names them all."""
    found = sorted((p for p in Path(directory).glob("step_*") if (p / "state.pt").exists()), reverse=True)
    failures = []
    for path in found:
        try:
            state = load(path, restore_rng=False, map_location=map_location)
            missing = [k for k in required if k not in state] if isinstance(state, dict) else list(required)
            if missing:
                raise ValueError(f"not a complete checkpoint: no {missing}")
        except UnsafeCheckpointError:
            raise
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
