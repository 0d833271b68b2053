"""The memory/time estimate printed before a run (estimate.py)."""
import json
import math
import types

import pytest
import torch

from flowopd_lib import estimate as estimate_module
from flowopd_lib.estimate import estimate
from flowopd_lib.grpo import GRPOConfig, GRPOTrainer, train_grpo
from flowopd_lib.opd import OPDConfig
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


# ----------------------------------------------------------------------------- what the estimate used to leave out
# One test per term, each on a case whose bytes are worked out by hand.

def tiny_sd3_estimate(tmp_path, trainer_cls=GRPOTrainer, **overrides):
    """estimate() on the tiny random SD3 pipeline (32 px, 16 latent channels, VAE (8, 8), 77 + 256 tokens of 64)."""
    from flowopd_lib import adapters
    from flowopd_lib.models import SD3FlowModel, tiny_sd3_pipeline

    model = SD3FlowModel.from_pipeline(tiny_sd3_pipeline())
    trainable = adapters.add(model, "student", rank=4, seed=0)
    cfg = config(tmp_path, **overrides)
    return model, cfg, estimate(model, cfg, 1, trainable, 4, seconds_per_sample_forward=1e-3)


def test_reward_models_in_the_process_and_on_their_servers(tmp_path):
    """PickScore (CLIP-H, 986,109,441 parameters, float32) loads into the training process; GenEval's and
    DeQA's models run on reward servers (weights per server GPU, reported apart)."""
    pickscore = estimate_module.PICKSCORE_PARAMETERS * 4
    assert estimate_module.reward_model_bytes(["pickscore_v1", "deqa_server"]) == pickscore
    assert estimate_module.reward_model_bytes(["geneval", "deqa", "pickscore"]) == 0  # the toy rewards: no model
    assert estimate_module.reward_server_bytes(["deqa_server", "pickscore_v1"]) == 8_200_000_000 * 2
    assert estimate_module.reward_server_bytes(["geneval_server"]) == (69_000_000 + 428_000_000) * 4
    trainer = GRPOTrainer(tiny_model(), config(tmp_path))
    scored = estimate(trainer.model, config(tmp_path, rewards={"pickscore_v1": 0.6, "deqa_server": 0.4}), 1,
                      trainer.params, 0, seconds_per_sample_forward=1e-3)
    assert scored.reward_model_bytes == pickscore and scored.reward_server_bytes == 16_400_000_000
    plain = estimate(trainer.model, trainer.cfg, 1, trainer.params, 0, seconds_per_sample_forward=1e-3)
    assert scored.resident_bytes - plain.resident_bytes == pickscore  # servers are not this process's memory
    assert "PickScore" in str(scored)


def test_labelling_transient_is_one_micro_batch_forward_and_labels_are_kept(tmp_path):
    """No-grad forwards of micro_batch samples (x2 with CFG): batch x tokens x width x bytes x 16."""
    assert estimate_module.no_grad_forward_bytes(2, 10, 8, 2) == 2 * 10 * 8 * 2 * 16
    trainer = GRPOTrainer(tiny_model(), config(tmp_path))
    model, params = trainer.model, trainer.params
    width = model.transformer.config.num_attention_heads * model.transformer.config.attention_head_dim
    dtype_bytes = next(model.transformer.parameters()).element_size()
    guided = estimate(model, config(tmp_path, micro_batch=2, cfg_scale=2.0), 1, params, 3, seconds_per_sample_forward=1e-3)
    assert guided.labelling_batch == 2 * 2  # micro_batch x CFG
    assert guided.labelling_bytes == 4 * (8 * 8 + 16) * width * dtype_bytes * estimate_module.NO_GRAD_WIDTHS_PER_TOKEN
    assert guided.stored_labels_bytes == 8 * 3 * (8 * 8 * 8 * 4)  # 8 samples x 3 labelled steps x a float32 latent
    whole = estimate(model, config(tmp_path, micro_batch=None), 1, params, 3, seconds_per_sample_forward=1e-3)
    assert whole.labelling_batch == 8  # without micro_batch every local sample at once
    none = estimate(model, trainer.cfg, 1, params, 0, seconds_per_sample_forward=1e-3)
    assert none.labelling_batch == none.labelling_bytes == none.stored_labels_bytes == 0


def test_vae_decode_of_a_rollout_chunk(tmp_path):
    """SD3's VAE at 512 px: 3 live feature maps of 256 channels at full resolution, float32, per image."""
    sd3_vae = types.SimpleNamespace(block_out_channels=(128, 256, 512, 512))
    assert estimate_module.vae_decode_bytes(sd3_vae, 512, 512, 12, 4) == 12 * 512 * 512 * 256 * 4 * 3  # 9 GiB
    model, cfg, result = tiny_sd3_estimate(tmp_path, rollout_chunks=3)  # 8 samples in chunks of 3
    assert result.decode_batch == 3 and model.vae.config.block_out_channels == (8, 8)
    assert result.decode_bytes == 3 * 32 * 32 * 8 * 4 * 3
    assert result.images_bytes == 8 * 3 * 32 * 32 * 4
    opd = OPDConfig(teachers={"pickscore": "t"}, datasets={"pickscore": 1.0}, prompts_per_update=2, group_size=4,
                    sde_steps=4, rollout_chunks=3, out_dir=str(tmp_path / "opd"))  # labels from velocities
    with_labels = estimate(model, opd, 1, [], 4, seconds_per_sample_forward=1e-3)
    assert with_labels.decode_batch == with_labels.decode_bytes == with_labels.images_bytes == 0


def test_prompt_cache_counts_bound_or_the_runs_prompts(tmp_path):
    """SD3.5-M's prompt: (77 + 256) x 4096 bf16 tokens + 2048 pooled = 2,732,032 bytes (~2.7 MB)."""
    sd35 = types.SimpleNamespace(tokens=torch.empty(1, 333, 4096, dtype=torch.bfloat16, device="meta"),
                                 pooled=torch.empty(1, 2048, dtype=torch.bfloat16, device="meta"))
    assert estimate_module.prompt_embedding_bytes(sd35) == 333 * 4096 * 2 + 2048 * 2 == 2_732_032
    cfg = config(tmp_path, updates=10, prompts_per_update=6)
    unbounded = types.SimpleNamespace()
    assert estimate_module.cached_prompt_count(unbounded, cfg, 2) == 10 * 3 + 1  # 3 prompts a process + ""
    assert estimate_module.cached_prompt_count(types.SimpleNamespace(max_cached_prompts=5), cfg, 2) == 5
    assert estimate_module.cached_prompt_count(types.SimpleNamespace(max_cached_prompts=None), cfg, 2) == 31
    model, _, result = tiny_sd3_estimate(tmp_path, updates=1000)
    per_prompt = 333 * 64 * 4 + 48 * 4  # the tiny SD3: float32 tokens of width 64, pooled 16 + 32
    assert result.cached_prompts == min(model.max_cached_prompts, 1000 * 2 + 1)
    assert result.prompt_cache_bytes == result.cached_prompts * per_prompt


def test_rollout_storage_holds_each_samples_prompt_embeddings(tmp_path):
    """States and velocities (2T + 1 latents) plus cond and uncond embeddings per sample."""
    model, cfg, result = tiny_sd3_estimate(tmp_path, cfg_scale=4.5)
    per_prompt = 333 * 64 * 4 + 48 * 4
    assert result.rollout_bytes == 8 * (2 * 4 + 1) * (16 * 16 * 16 * 4) + 8 * 2 * per_prompt


def test_peak_is_everything_resident_plus_the_largest_transient(tmp_path):
    _, _, result = tiny_sd3_estimate(tmp_path)
    resident = (result.base_bytes + result.adapter_bytes + result.optimizer_bytes + result.rollout_bytes
                + result.stored_labels_bytes + result.images_bytes + result.reward_model_bytes
                + result.prompt_cache_bytes)
    assert result.peak_bytes == resident + max(result.activation_bytes, result.labelling_bytes, result.decode_bytes)
    assert result.forward_seconds_per_sample == 1e-3 and result.forward_time_assumed and "assumed" in str(result)
    for line in ("labelling", "VAE decode", "reward models", "prompt cache", "peak"):
        assert f"  {line}" in str(result)
