"""The memory/time estimate printed before a run (estimate.py)."""
import json
import time

import pytest

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


def test_estimated_update_time_is_the_right_order(tmp_path):
    trainer = GRPOTrainer(tiny_model(), config(tmp_path, prompts_per_update=4))
    guess = estimate(trainer.model, trainer.cfg, 1, trainer.params, trainer.label_forwards_per_sample)
    trainer.run_update(0)  # warm-up
    start = time.perf_counter()
    trainer.run_update(1)
    actual = time.perf_counter() - start
    assert actual / 5 < guess.update_seconds < actual * 5, (guess.update_seconds, actual)


def test_training_prints_and_saves_the_estimate(tmp_path, capsys):
    cfg = config(tmp_path)
    train_grpo(cfg, model=tiny_model())
    assert "estimate per process" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "estimate.json").read_text())
    assert saved["samples_per_process"] == 8 and saved["update_seconds"] > 0
