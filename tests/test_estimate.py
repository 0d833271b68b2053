"""The memory/time estimate printed before a run (estimate.py)."""
import json
import math

import pytest

from flowopd_lib import estimate as estimate_module
from flowopd_lib.estimate import estimate
from flowopd_lib.grpo import GRPOConfig, GRPOTrainer, train_grpo
from tiny import tiny_model


def config(tmp_path, **overrides):
    values = dict(rewards={"deqa": 1.0}, datasets={"pickscore": 1.0}, prompts_per_update=2, group_size=4,
                  sde_steps=4, updates=1, out_dir=str(tmp_path / "run"))
    return GRPOConfig(**{**values, **overrides})


def test_estimate_counts_and_scales(tmp_path):
    trainer = GRPOTrainer(tiny_model(), config(tmp_path, micro_batch=2))
    small = estimate(trainer.model, trainer.cfg, 1, trainer.params, trainer.label_forwards_per_sample)
    assert small.adapter_params == sum(p.numel() for p in trainer.params) > 0
    assert small.base_params == sum(p.numel() for p in trainer.model.parameters()) - small.adapter_params
    assert small.samples_per_process == 8 and small.samples_per_backward == 2
    assert small.tokens == 8 * 8 + 16  # tiny: 8x8 latent at patch 1, 16 text tokens
    big = estimate(trainer.model, config(tmp_path, micro_batch=4, cfg_scale=2.0), 1, trainer.params, 4)
    assert big.activation_bytes == 2 * 2 * small.activation_bytes  # twice the samples, CFG doubles the batch
    saved = estimate(trainer.model, config(tmp_path, micro_batch=2, gradient_checkpointing=True), 1, trainer.params, 0)
    assert saved.activation_bytes < small.activation_bytes / 1.5  # tiny has 2 layers: 17+2 vs 34 units
    two = estimate(trainer.model, trainer.cfg, 2, trainer.params, trainer.label_forwards_per_sample)
    assert two.samples_per_process == 4 and two.forwards_per_update == small.forwards_per_update // 2


def test_estimated_update_time_is_forwards_times_the_timed_forward(tmp_path, monkeypatch):
    """The time is the update's sample-forwards x one timed forward. Checked through its structure
    (no comparison with a measured update: that depends on the machine's load; timing is diagnostics/bench.py's)."""
    trainer = GRPOTrainer(tiny_model(), config(tmp_path))
    real = estimate_module.time_forward(trainer.model, 2, repeats=1)
    assert 0 < real < math.inf
    timed = []
    monkeypatch.setattr(estimate_module, "time_forward", lambda model, batch: timed.append(batch) or 2e-3)

    def guess(label_forwards=0, **overrides):
        return estimate(trainer.model, config(tmp_path, **overrides), 1, trainer.params, label_forwards)

    base = guess()  # 2 prompts x 4 = 8 samples, 4 SDE steps of which round(0.9 x 4) = 4 trained
    assert base.forward_seconds_per_sample == 2e-3 and timed[-1] == 4  # one minibatch of the 2: 4 samples
    assert base.forwards_per_update == 8 * (4 + 3 * 4)  # rollout + forward and ~2-forward backward per trained step
    assert base.update_seconds == pytest.approx(base.forwards_per_update * 2e-3) and math.isfinite(base.update_seconds)
    # linear in the samples, whichever setting makes them
    assert guess(prompts_per_update=4).update_seconds == pytest.approx(2 * base.update_seconds)
    assert guess(group_size=8).update_seconds == pytest.approx(2 * base.update_seconds)
    # the components add up: labelling forwards, another inner epoch, more steps, CFG's doubled batch
    assert guess(label_forwards=3).forwards_per_update == base.forwards_per_update + 8 * 3
    assert guess(inner_epochs=2).forwards_per_update == base.forwards_per_update + 8 * 3 * 4
    assert guess(sde_steps=8).forwards_per_update == base.forwards_per_update + 8 * (4 + 3 * 3)  # 7 of 8 trained
    assert guess(cfg_scale=2.0).forwards_per_update == 2 * base.forwards_per_update and timed[-1] == 8
    guess(prompts_per_update=64, micro_batch=128, cfg_scale=2.0)
    assert timed[-1] == 64  # the timing batch is capped, so the estimate stays cheap


def test_training_prints_and_saves_the_estimate(tmp_path, capsys):
    cfg = config(tmp_path)
    train_grpo(cfg, model=tiny_model())
    assert "estimate per process" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "estimate.json").read_text())
    assert saved["samples_per_process"] == 8 and saved["update_seconds"] > 0
