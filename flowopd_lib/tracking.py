"""Run directories: every run writes its config, provenance and metrics next to its outputs.

    with Run("runs/teacher_geneval", config) as run:
        run.log({"reward/geneval": 0.41, "loss": 0.02}, step=1)

writes `config.yaml`, `provenance.json` (git commit, dirty flag, package versions, command, host)
and `metrics.csv` (one row per step; a new metric name extends the header), and mirrors metrics
to wandb. wandb runs offline unless WANDB_MODE says otherwise, so a run never waits on the
network; `WANDB_MODE=disabled` or `use_wandb=False` turns it off.
"""
from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config

TRACKED_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft", "numpy", "papermill", "wandb")


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch.Generator seeded the same for explicit use."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def git_state(path: str | Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the repository holding `path` (this package by default)."""
    cwd = Path(path or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def provenance() -> dict[str, Any]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"git": git_state(), "packages": versions, "python": sys.version.split()[0],
            "platform": platform.platform(), "host": socket.gethostname(), "argv": sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch_threads": torch.get_num_threads()}


class MetricsCSV:
    """Append-only CSV of per-step metrics whose header grows when a new metric appears."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.columns: list[str] = []
        if self.path.exists():
            with self.path.open() as f:
                self.columns = next(csv.reader(f), [])

    def append(self, row: dict[str, Any]) -> None:
        new = [k for k in row if k not in self.columns]
        if new or not self.path.exists():
            old_rows = self.read() if self.path.exists() else []
            self.columns += new
            with self.path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.columns)
                writer.writeheader()
                writer.writerows(old_rows)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(row)

    def read(self) -> list[dict[str, str]]:
        with self.path.open() as f:
            return list(csv.DictReader(f))

    def drop_after(self, step: int) -> None:
        """Remove the rows logged after `step`: a run resumed from that step's checkpoint logs them again."""
        if not self.path.exists():
            return
        kept = [row for row in self.read() if int(float(row["step"])) <= step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(kept)


class Run:
    """A run directory with config, provenance, metrics.csv and (offline) wandb.

    `resume=True` keeps an existing metrics.csv and appends to it (dropping the rows after
    `resumed_step`, the checkpoint's update, which the resumed run logs again); otherwise an existing
    metrics.csv is an error, so two runs never mix their numbers in one file."""

    def __init__(self, out_dir: str | Path, config: Config | None = None, *, name: str | None = None,
                 project: str = "flowopd", use_wandb: bool = True, resume: bool = False,
                 resumed_step: int | None = None, is_main_process: bool = True):
        self.dir = Path(out_dir)
        self.is_main = is_main_process
        self.config = config
        self._wandb = None
        if not self.is_main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.dir / "metrics.csv"
        if metrics_path.exists() and not resume:
            raise FileExistsError(f"{metrics_path} exists: pass resume=True to continue that run, "
                                  f"or choose a new output directory")
        if config is not None:
            config.to_yaml(self.dir / "config.yaml")
        (self.dir / "provenance.json").write_text(json.dumps(provenance(), indent=2))
        self.metrics = MetricsCSV(metrics_path)
        if resume and resumed_step is not None:  # steps past the checkpoint are re-logged, not duplicated
            self.metrics.drop_after(resumed_step)
        if use_wandb:
            self._wandb = _start_wandb(self.dir, name or self.dir.name, project, config)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.is_main:
            return
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: _scalar(v) for k, v in metrics.items()})
        self.metrics.append(row)
        if self._wandb is not None:
            # wandb's own step must only grow; phases restart their step count (autoencoder then
            # flow), so the run's step is logged as a metric and wandb counts calls.
            self._wandb.log({k: v for k, v in row.items() if k != "time"})

    def finish(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _start_wandb(run_dir: Path, name: str, project: str, config: Config | None):
    mode = os.environ.get("WANDB_MODE") or "offline"  # unset or empty: offline
    if mode == "disabled":
        return None
    import wandb  # lazy: ~1 s import, not needed by most library users

    return wandb.init(project=project, name=name, dir=str(run_dir), mode=mode,
                      config=config.to_dict() if config is not None else None,
                      settings=wandb.Settings(init_timeout=60, silent=True))
