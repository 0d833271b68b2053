"""A non-finite value never reaches the optimizer or a checkpoint: a NaN reward (GRPO), label (OPD's
teacher velocities), loss term or gradient stops the run before `optimizer.step` with a
NonFiniteError naming the value, the prompt and the update; the adapter keeps its last good weights
and the last written checkpoint stays the one a resumed run starts from."""
from __future__ import annotations

import re

import pytest
import torch

from flowopd_lib import adapters, checkpoint, rewards
from flowopd_lib.grpo import GRPOTrainer, combined_rewards
from flowopd_lib.opd import OPDTrainer
from flowopd_lib.trainer import NonFiniteError
from test_grpo import tiny_cfg
from test_opd import opd_cfg, save_random_adapter
from tiny import tiny_model

CALLS = {"n": 0}


def _nan_in_the_second_update(images, prompts):
    """Brightness, but NaN for sample 1 on its second call (= update 2 with one rollout chunk)."""
    CALLS["n"] += 1
    out = images.mean(dim=(1, 2, 3))
    if CALLS["n"] == 2:
        out[1] = float("nan")
    return {"reward": out}


rewards.register("test_nan_second_update", _nan_in_the_second_update)


def _adapter(trainer) -> dict[str, torch.Tensor]:
    return adapters.state_dict(trainer.model, trainer.cfg.adapter)


def _assert_kept_the_last_checkpoint(trainer, step: int | None):
    """The adapter is finite; with a checkpoint, it equals that checkpoint's (the resumable one)."""
    weights = _adapter(trainer)
    assert all(torch.isfinite(v).all() for v in weights.values())
    latest = checkpoint.latest(trainer.ckpt_dir)
    if step is None:
        assert latest is None
        return
    assert latest is not None and latest.name == f"step_{step:07d}"
    saved = checkpoint.load(latest, restore_rng=False)["adapter"]
    assert all(torch.equal(saved[k], weights[k]) for k in weights)


def test_nan_reward_stops_grpo_before_the_step_and_keeps_the_last_checkpoint(tmp_path):
    CALLS["n"] = 0
    cfg = tiny_cfg(tmp_path, rewards={"test_nan_second_update": 1.0}, updates=3)
    trainer = GRPOTrainer(tiny_model(), cfg)
    prompt = trainer.prompts_for(1)[1 // cfg.group_size]
    with pytest.raises(NonFiniteError) as error:
        trainer.train()
    message = str(error.value)
    assert "test_nan_second_update" in message and prompt.text in message
    assert re.search(r"update 2\b", message) and "step_0000001" in message
    _assert_kept_the_last_checkpoint(trainer, step=1)


def test_a_judged_nan_is_not_taken_for_not_judged():
    """'Not judged' is a mask: a NaN from a reward that judges the prompt is a value, not a gap."""
    from flowopd_lib import toy

    prompts = toy.sample_prompts("pickscore", 4, "test")
    images = toy.render(prompts, seed=0)
    CALLS["n"] = 1  # the next call returns a NaN
    total, per = combined_rewards(images, prompts, {"test_nan_second_update": 1.0})
    assert per["test_nan_second_update"].judged.all()
    assert total.isnan().tolist() == [False, True, False, False]


def test_nan_teacher_velocity_stops_opd_before_the_step(tmp_path, monkeypatch):
    g = save_random_adapter(tmp_path, "g", 1)
    trainer = OPDTrainer(tiny_model(), opd_cfg(tmp_path, {"geneval": g}, updates=2))
    clean = trainer.target_velocities

    def one_nan_in_update_2(traj, k):
        v = clean(traj, k)
        if trainer.update == 1:
            v[1] = float("nan")
        return v

    monkeypatch.setattr(trainer, "target_velocities", one_nan_in_update_2)
    prompt = trainer.prompts_for(1)[1 // trainer.cfg.group_size]
    with pytest.raises(NonFiniteError) as error:
        trainer.train()
    message = str(error.value)
    assert "v_target" in message and prompt.text in message and re.search(r"update 2\b", message)
    _assert_kept_the_last_checkpoint(trainer, step=1)


def test_nan_loss_term_is_named_and_nothing_steps(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, beta=0.04, updates=1)
    trainer = GRPOTrainer(tiny_model(), cfg)
    clean = trainer.step_loss

    def nan_kl(traj, labels, k, v):
        loss, metrics = clean(traj, labels, k, v)
        if k == 1:  # a NaN KL to the reference for the minibatch's first sample
            nan = torch.where(torch.arange(len(loss)) == 0, float("nan"), 0.0)
            metrics = {**metrics, "kl_ref": metrics["kl_ref"] + nan}
            loss = loss + cfg.beta * nan
        return loss, metrics

    monkeypatch.setattr(trainer, "step_loss", nan_kl)
    before = _adapter(trainer)
    with pytest.raises(NonFiniteError, match=r"loss term 1 \(kl_ref\) is nan for prompt '") as error:
        trainer.train()
    assert "update 1" in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in _adapter(trainer).items())
    _assert_kept_the_last_checkpoint(trainer, step=None)


def test_nan_gradient_is_named_and_nothing_steps(tmp_path):
    trainer = GRPOTrainer(tiny_model(), tiny_cfg(tmp_path, updates=1))
    name = next(k for k in _adapter(trainer) if "lora_B" in k)
    param = dict(trainer.model.transformer.named_parameters())[name]
    param.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    before = _adapter(trainer)
    with pytest.raises(NonFiniteError, match=re.escape(name)):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in _adapter(trainer).items())
    _assert_kept_the_last_checkpoint(trainer, step=None)
