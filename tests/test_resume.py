"""Resuming is safe: a run directory resumes only with the config it was trained with (the budget
and evaluation settings may change), and a corrupt latest checkpoint falls back, with a warning
naming it, to the previous complete one."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from flowopd_lib import checkpoint
from flowopd_lib.grpo import GRPOTrainer
from flowopd_lib.opd import OPDTrainer
from test_grpo import tiny_cfg
from test_opd import opd_cfg, save_random_adapter
from tiny import tiny_model


def _saved_config(cfg) -> dict:
    return yaml.safe_load((Path(cfg.out_dir) / "config.yaml").read_text())


def test_resume_with_a_changed_config_is_an_error_listing_old_and_new(tmp_path):
    cfg = tiny_cfg(tmp_path, lr=0.01, updates=1)
    GRPOTrainer(tiny_model(), cfg).train()
    changed = cfg.replace(lr=0.5, group_size=2, updates=2)
    trainer = GRPOTrainer(tiny_model(), changed)
    with pytest.raises(ValueError) as error:
        trainer.train(resume=True)
    message = str(error.value)
    assert "lr: 0.01 -> 0.5" in message and "group_size: 4 -> 2" in message
    assert not re.search(r"^\s*updates:", message, re.M)  # the budget may change
    assert cfg.out_dir in message and "delete" in message and "out_dir" in message
    assert _saved_config(cfg)["lr"] == 0.01 and trainer.update == 0  # nothing was resumed or rewritten


def test_opd_resume_with_a_changed_objective_is_an_error(tmp_path):
    g = save_random_adapter(tmp_path, "g", 1)
    cfg = opd_cfg(tmp_path, {"geneval": g})
    OPDTrainer(tiny_model(), cfg).train()
    with pytest.raises(ValueError, match=r"mar_lambda: 0.02 -> 0.1"):
        OPDTrainer(tiny_model(), cfg.replace(mar_lambda=0.1, updates=2)).train()


def test_resume_may_change_the_budget_and_evaluation_settings(tmp_path):
    cfg = tiny_cfg(tmp_path, updates=1)
    GRPOTrainer(tiny_model(), cfg).train()
    more = cfg.replace(updates=2, time_budget_minutes=60.0, eval_every=1, checkpoint_every=2)
    trainer = GRPOTrainer(tiny_model(), more)
    trainer.train(resume=True)
    assert trainer.update == 2 and _saved_config(cfg)["updates"] == 2


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_latest_checkpoint_resumes_from_the_previous_one(tmp_path, damage):
    full = tiny_cfg(tmp_path, updates=3, out_dir=str(tmp_path / "full"))
    GRPOTrainer(tiny_model(), full).train()
    part = full.replace(out_dir=str(tmp_path / "part"), updates=2)
    GRPOTrainer(tiny_model(), part).train()
    latest = Path(part.out_dir) / "checkpoints" / "step_0000002" / "state.pt"
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a checkpoint" * 10)
    resumed = GRPOTrainer(tiny_model(), part.replace(updates=3))
    with pytest.warns(UserWarning, match=re.escape(str(latest))):
        resumed.train(resume=True)
    assert resumed.update == 3
    states = [checkpoint.load(Path(c.out_dir) / "checkpoints" / "step_0000003", restore_rng=False)
              for c in (full, part)]
    for key, value in states[0]["adapter"].items():  # as if update 2 had never been lost
        assert torch.equal(value, states[1]["adapter"][key]), key


def test_no_complete_checkpoint_is_an_error_naming_them(tmp_path):
    cfg = tiny_cfg(tmp_path, updates=2)
    GRPOTrainer(tiny_model(), cfg).train()
    paths = sorted((Path(cfg.out_dir) / "checkpoints").glob("step_*/state.pt"))
    assert len(paths) == 2
    for path in paths:
        path.write_bytes(b"\0" * 16)
    with pytest.raises(checkpoint.CheckpointError) as error, pytest.warns(UserWarning):
        GRPOTrainer(tiny_model(), cfg.replace(updates=3)).train(resume=True)
    message = str(error.value)
    assert all(str(p) in message for p in paths) and "delete" in message
