"""GRPO: the loss pieces on hand-made cases, and the trainer on a tiny random toy model."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from flowopd_lib import adapters, flow, rewards, train
from flowopd_lib.config import ConfigError
from flowopd_lib.grpo import GRPOConfig, GRPOTrainer, combined_rewards
from flowopd_lib.losses import group_advantages, ppo_clip_loss
from flowopd_lib.trainer import update_tasks
from flowopd_lib import toy
from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _brightness(images, prompts):
    """A dense easy reward with spread on random models (so every group carries signal)."""
    return {"reward": images.mean(dim=(1, 2, 3))}


rewards.register("test_brightness", _brightness)


def tiny_cfg(tmp_path, **overrides) -> GRPOConfig:
    values = dict(rewards={"test_brightness": 1.0}, datasets={"pickscore": 1.0}, prompts_per_update=2,
                  group_size=4, sde_steps=3, train_fraction=0.67, updates=2, lr=3e-2, ema_decay=0.5,
                  checkpoint_every=1, out_dir=str(tmp_path / "run"))
    values.update(overrides)
    return GRPOConfig(**values)


# ----------------------------------------------------------------------------- pure pieces

def test_group_advantages_hand_made_group():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 4.0, 4.0])  # groups of 4: mean 3 and 2
    adv, keep = group_advantages(r, 4, std_mode="global", clip=5.0, eps=0.0)
    std = r.std(unbiased=False)
    expected = torch.tensor([-2.0, -1.0, 0.0, 3.0, -2.0, -2.0, 2.0, 2.0]) / std
    assert torch.allclose(adv, expected)
    assert keep.all()
    adv_g, _ = group_advantages(r, 4, std_mode="group", eps=0.0)
    assert torch.allclose(adv_g[:4], torch.tensor([-2.0, -1.0, 0.0, 3.0]) / r[:4].std(unbiased=False))


def test_zero_spread_groups_are_dropped_and_advantages_clipped():
    r = torch.tensor([5.0, 5.0, 5.0, 0.0, 0.0, 100.0])
    adv, keep = group_advantages(r, 3, std_mode="group", clip=1.0)
    assert keep.tolist() == [False, False, False, True, True, True]
    assert adv[:3].eq(0).all()
    assert adv.abs().max() <= 1.0 and adv[5] == 1.0
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.ones(6), 4)


def test_ppo_clip_loss_cases():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.5]))
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0])
    loss, clipped, approx_kl = ppo_clip_loss(new, old, adv, clip_range=0.2)
    # ratio 1: -A; ratio 1.5, A>0: clipped to 1.2 -> -1.2; ratio 0.5, A>0: max(-0.5, -0.8) = -0.5;
    # ratio 1.5, A<0: max(1.5, 1.2) = 1.5 (pessimistic bound)
    assert torch.allclose(loss, torch.tensor([-1.0, -1.2, -0.5, 1.5]))
    assert clipped.tolist() == [0.0, 1.0, 1.0, 1.0]
    assert torch.allclose(approx_kl, 0.5 * new ** 2)


def test_combined_rewards_judge_only_their_tasks():
    prompts = toy.sample_prompts("geneval", 2, "test") + toy.sample_prompts("ocr", 2, "test")
    images = toy.render(prompts, seed=0)
    total, per = combined_rewards(images, prompts, {"geneval": 1.0, "ocr": 2.0})
    assert per["geneval"].judged.tolist() == [True, True, False, False] and per["geneval"].values[:2].eq(1).all()
    assert per["ocr"].judged.tolist() == [False, False, True, True] and per["ocr"].values[2:].eq(1).all()
    assert not any(r.values.isnan().any() for r in per.values())  # 'not judged' is the mask, not NaN
    assert total.tolist() == [1.0, 1.0, 2.0, 2.0] and per["ocr"].mean() == 1.0
    with pytest.raises(ValueError, match="task 'ocr'"):
        combined_rewards(images, prompts, {"geneval": 1.0})
    _, per = combined_rewards(images, prompts, {"geneval": 1.0, "ocr": 1.0, "deqa": 1.0})
    assert per["deqa"].judged.all()  # deqa judges any prompt...
    total, per = combined_rewards(images, prompts, {"geneval": 1.0, "ocr": 1.0, "deqa": 1.0},
                                  task_rewards={"geneval": "geneval", "ocr": "ocr"})
    assert not per["deqa"].judged.any() and total.tolist() == [1.0, 1.0, 1.0, 1.0]  # ...unless only own tasks count


def test_update_tasks_mixed_and_alternate(tmp_path):
    cfg = tiny_cfg(tmp_path, datasets={"geneval": 3, "ocr": 1}, prompts_per_update=8)
    assert sorted(update_tasks(cfg, 0)) == ["geneval"] * 6 + ["ocr"] * 2
    alt = cfg.replace(dataset_mode="alternate")
    assert [update_tasks(alt, u)[0] for u in range(5)] == ["geneval"] * 3 + ["ocr", "geneval"]


def test_config_errors_name_the_bad_value(tmp_path):
    with pytest.raises(ConfigError, match="nope"):
        tiny_cfg(tmp_path, rewards={"nope": 1.0})
    with pytest.raises(ConfigError, match="unknown task"):
        tiny_cfg(tmp_path, datasets={"gen_eval": 1.0})


# ----------------------------------------------------------------------------- trainer

def test_ratio_is_one_at_the_first_inner_step(tmp_path):
    cfg = tiny_cfg(tmp_path, cfg_scale=2.0)
    trainer = GRPOTrainer(tiny_model(), cfg)
    traj = trainer.rollout(0)
    labels, _ = trainer.label(traj, 0)
    with adapters.active(trainer.model, cfg.adapter), torch.no_grad():
        for k in range(cfg.trained_steps):
            _, metrics = trainer.step_loss(traj, labels, k, trainer.policy_velocity(traj, k))
            assert metrics["ratio_dev"].max() < 1e-5
    assert labels["weight"].all()  # brightness always has spread


def test_shared_initial_noise_is_shared_within_groups_only(tmp_path):
    def starts(shared):
        trainer = GRPOTrainer(tiny_model(), tiny_cfg(tmp_path, shared_initial_noise=shared))
        traj = trainer.rollout(0)
        return traj.latents[:, 0].flatten(1), traj.latents[:, 1].flatten(1)
    x0, x1 = starts(True)  # 2 prompts x 4 samples
    assert torch.equal(x0[0], x0[3]) and torch.equal(x0[4], x0[7]) and not torch.equal(x0[0], x0[4])
    assert not torch.equal(x1[0], x1[1])  # the SDE steps still differ within a group
    y0, y1 = starts(False)
    assert not torch.equal(y0[0], y0[1])
    assert torch.equal(x0[0], y0[0]) and torch.equal(x1[0], y1[0])  # a group's first sample is unchanged


def test_ode_after_trained_makes_only_the_trained_steps_random(tmp_path):
    cfg = tiny_cfg(tmp_path, sde_steps=4, train_fraction=0.5, ode_after_trained=True, shared_initial_noise=True)
    trainer = GRPOTrainer(tiny_model(), cfg)
    traj = trainer.rollout(0)
    assert torch.isfinite(traj.log_probs[:, :2]).all() and torch.isnan(traj.log_probs[:, 2:]).all()
    # an untrained step replays exactly as an Euler ODE step: no noise was added
    x2 = traj.latents[:, 2]
    replay = flow.ode_step(traj.velocities[:, 2], x2, traj.sigmas[2], traj.sigmas[3])
    assert torch.allclose(replay, traj.latents[:, 3], atol=1e-6)
    plain = GRPOTrainer(tiny_model(), tiny_cfg(tmp_path, sde_steps=4, train_fraction=0.5)).rollout(0)
    assert torch.isfinite(plain.log_probs).all()


def test_chunked_rollout_scores_on_a_worker_thread_and_equals_one_batch(tmp_path):
    threads = []

    def recording_brightness(images, prompts):
        threads.append(threading.current_thread().name)
        return _brightness(images, prompts)

    rewards.register("test_recording_brightness", recording_brightness)
    results = {}
    for chunks in (1, 3):
        trainer = GRPOTrainer(tiny_model(), tiny_cfg(tmp_path, rewards={"test_recording_brightness": 1.0},
                                                     rollout_chunks=chunks))
        traj = trainer.rollout(0)
        results[chunks] = traj, trainer.label(traj, 0)
    assert threads[1:] == ["reward_0"] * 3 and threads[0] == "reward_0"  # 1 + 3 sub-batches, off the main thread
    (one, (labels_one, metrics_one)), (three, (labels_three, metrics_three)) = results[1], results[3]
    assert three.prompts == one.prompts
    torch.testing.assert_close(three.latents, one.latents, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(three.images, one.images, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(labels_three["advantage"], labels_one["advantage"], atol=1e-4, rtol=1e-4)
    assert metrics_three["reward"] == pytest.approx(metrics_one["reward"], abs=1e-6)


def test_micro_batches_and_checkpointing_give_the_same_update(tmp_path):
    params = {}
    for variant in ({}, {"micro_batch": 3}, {"gradient_checkpointing": True}):
        trainer = GRPOTrainer(tiny_model(), tiny_cfg(tmp_path, beta=0.04, **variant))
        metrics = trainer.run_update(0)
        params[str(variant)] = torch.cat([p.detach().flatten() for p in trainer.params]), metrics["loss"]
    (reference, loss), *others = params.values()
    for other, other_loss in others:
        torch.testing.assert_close(other, reference, atol=1e-5, rtol=1e-4)  # Adam at lr 3e-2 amplifies float noise
        assert other_loss == pytest.approx(loss, rel=1e-4, abs=1e-7)


def test_a_process_without_weighted_samples_still_takes_part_in_the_step(tmp_path):
    """With several processes a minibatch can have signal on one process and none on another (its
    groups had no reward spread): that process runs no forward (an empty batch would crash SD3's
    attention) but still joins the gradient all-reduce and the step."""
    trainer = GRPOTrainer(tiny_model(), tiny_cfg(tmp_path))
    traj = trainer.rollout(0)
    labels, _ = trainer.label(traj, 0)
    labels["weight"] = torch.zeros_like(labels["weight"])
    sum_here = trainer.dist.sum
    trainer.dist.sum = lambda t: t + 1 if t.ndim == 0 else sum_here(t)  # another process holds weighted samples
    metrics = trainer.optimize(traj, labels, 0)
    assert metrics["grad_norm"] == 0


def test_training_moves_the_reward_and_writes_outputs(tmp_path):
    cfg = tiny_cfg(tmp_path, updates=6, lr=5e-2, beta=0.0)
    trainer = GRPOTrainer(tiny_model(), cfg)
    first = trainer.run_update(0)
    trainer.update = 1
    metrics = trainer.train()
    assert metrics["reward/test_brightness"] > first["reward/test_brightness"]
    run = Path(cfg.out_dir)
    assert (run / "adapter" / adapters.WEIGHT_NAME).exists() and (run / "metrics.csv").exists()
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("reward", "reward/test_brightness", "zero_spread_fraction", "clip_fraction", "approx_kl",
                   "grad_norm", "time/rollout", "time/train"):
        assert column in header


def test_resume_equals_uninterrupted(tmp_path):
    full = tiny_cfg(tmp_path, updates=3, out_dir=str(tmp_path / "full"))
    GRPOTrainer(tiny_model(), full).train()
    part = full.replace(out_dir=str(tmp_path / "part"), updates=1)
    GRPOTrainer(tiny_model(), part).train()
    resumed = GRPOTrainer(tiny_model(), part.replace(updates=3))
    resumed.train(resume=True)
    state_full = torch.load(Path(full.out_dir) / "checkpoints" / "step_0000003" / "state.pt", weights_only=True)
    state_part = torch.load(Path(part.out_dir) / "checkpoints" / "step_0000003" / "state.pt", weights_only=True)
    assert state_full["adapter"]
    for key, value in state_full["adapter"].items():
        assert torch.equal(value, state_part["adapter"][key]), key


def test_saved_adapter_loads_with_diffusers(tmp_path):
    cfg = tiny_cfg(tmp_path, updates=1)
    trainer = GRPOTrainer(tiny_model(), cfg)
    trainer.train()
    fresh = tiny_model()
    fresh.transformer.load_lora_adapter(str(Path(cfg.out_dir) / "adapter"), weight_name=adapters.WEIGHT_NAME,
                                        adapter_name="loaded", prefix="transformer")
    x = torch.randn(2, *fresh.latent_shape)
    embeds = fresh.encode_prompts(["a photo of a cat", ""])
    with trainer.ema_weights(), adapters.active(trainer.model, cfg.adapter), torch.no_grad():
        expected = trainer.model.velocity(x, torch.tensor(0.5), embeds)
    with torch.no_grad():
        got = fresh.velocity(x, torch.tensor(0.5), embeds)
    assert torch.allclose(got, expected, atol=1e-5)
    assert json.loads((Path(cfg.out_dir) / "adapter" / "adapter.json").read_text())["updates"] == 1


def test_full_grpo_update_on_tiny_sd3_and_the_adapter_loads_into_a_pipeline(tmp_path):
    from flowopd_lib.models import SD3FlowModel, tiny_sd3_pipeline

    model = SD3FlowModel.from_pipeline(tiny_sd3_pipeline())
    cfg = tiny_cfg(tmp_path, updates=1, cfg_scale=4.5, shift=3.0, sde_steps=2, train_fraction=0.5, lr=1e-2)
    trainer = GRPOTrainer(model, cfg)
    before = {k: v.clone() for k, v in adapters.state_dict(model, cfg.adapter).items()}
    metrics = trainer.train()
    after = adapters.state_dict(model, cfg.adapter)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the update changed the adapter
    assert metrics["zero_spread_fraction"] == 0 and metrics["grad_norm"] > 0

    pipe = tiny_sd3_pipeline()
    pipe.load_lora_weights(str(Path(cfg.out_dir) / "adapter"), weight_name=adapters.WEIGHT_NAME, adapter_name="t")
    loaded = SD3FlowModel.from_pipeline(pipe)
    x = torch.randn(2, *model.latent_shape)
    with trainer.ema_weights(), adapters.active(model, cfg.adapter), torch.no_grad():
        expected = model.velocity(x, torch.tensor(0.3), model.encode_prompts(["a cat", ""]))
    with torch.no_grad():
        got = loaded.velocity(x, torch.tensor(0.3), loaded.encode_prompts(["a cat", ""]))
    assert torch.allclose(got, expected, atol=1e-5)


WORKER = """
import json, os, sys, torch
sys.path.insert(0, {tests!r})
from pathlib import Path
from tiny import tiny_model
from test_grpo import tiny_cfg
from flowopd_lib import adapters
from flowopd_lib.grpo import GRPOTrainer
cfg = tiny_cfg(Path({tmp!r}), updates=2, out_dir={out!r})
model = tiny_model()
rank = int(os.environ.get("RANK", 0))
torch.manual_seed(1000 + rank)  # each rank's global RNG differs, as on real nodes
trainer = GRPOTrainer(model, cfg)
report = Path({out!r}).parent / f"rank{{rank}}"
report.mkdir(parents=True, exist_ok=True)
(report / "info.json").write_text(json.dumps({{"rank": trainer.acc.process_index,
                                               "num_processes": trainer.acc.num_processes}}))
torch.save(adapters.state_dict(trainer.model, cfg.adapter), report / "initial.pt")
trainer.train()
"""


def test_two_ranks_match_one_process(tmp_path):
    """Two real CPU ranks (torch.distributed.run + gloo, as `train.launch` starts them) each see a
    world of 2, start from the same adapter, and end where one process ends (float tolerance)."""
    script = tmp_path / "run_grpo.py"
    out2, out1 = tmp_path / "two" / "run", tmp_path / "one"
    script.write_text(WORKER.format(tests=str(ROOT / "tests"), tmp=str(tmp_path), out=str(out2)))
    command, env = train.cpu_ranks_command(2, [str(script)])
    env = {**env, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    infos = [json.loads((out2.parent / f"rank{r}" / "info.json").read_text()) for r in range(2)]
    assert infos == [{"rank": 0, "num_processes": 2}, {"rank": 1, "num_processes": 2}]
    initial = [torch.load(out2.parent / f"rank{r}" / "initial.pt") for r in range(2)]
    assert initial[0] and all(torch.equal(initial[0][k], initial[1][k]) for k in initial[0])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched processes: compare process counts, not thread counts
    try:
        GRPOTrainer(tiny_model(), tiny_cfg(tmp_path, updates=2, out_dir=str(out1))).train()
    finally:
        torch.set_num_threads(threads)
    two = torch.load(out2 / "checkpoints" / "step_0000002" / "state.pt", weights_only=True)["adapter"]
    one = torch.load(out1 / "checkpoints" / "step_0000002" / "state.pt", weights_only=True)["adapter"]
    assert any(not torch.equal(one[k], initial[0][k]) for k in one)  # it trained
    for key in one:
        # gloo's sum order differs from one process's, and the CPU's kernels (AVX2 or AVX-512) round
        # differently; Adam at lr 3e-2 turns a near-zero gradient's rounding into a full-size step on a
        # few elements (1e-3 on 6 of 256 on an AVX-512 box, 3e-5 on AVX2). A rank that skipped the
        # all-reduce would step elsewhere by about the whole update; so: within 5% of the update.
        moved = (one[key] - initial[0][key]).abs().max()
        gap = (two[key] - one[key]).abs().max()
        assert gap <= 0.05 * moved, f"{key}: two ranks end {gap:.2e} from one process, the update moved {moved:.2e}"


def test_time_budget_counts_update_time_across_resumes(tmp_path):
    """An interrupted run resumes with what is left of its budget, not a fresh one."""
    cfg = tiny_cfg(tmp_path, updates=5, time_budget_minutes=1e-6)  # spent by the first update
    first = GRPOTrainer(tiny_model(), cfg)
    first.train()
    assert first.update == 1
    resumed = GRPOTrainer(tiny_model(), cfg)
    resumed.train(resume=True)
    assert resumed.update == 1 and resumed.train_seconds == first.train_seconds
    assert len(Path(cfg.out_dir, "metrics.csv").read_text().splitlines()) == 2  # header + update 1


def test_first_minibatch_reports_the_ppo_ratio_before_any_step(tmp_path):
    """At the first minibatch the policy equals the rollout's: its ratio deviation is numerics only
    (0 up to float32 rounding on CPU), the number to read on GPUs under bf16 (trainer.py)."""
    trainer = GRPOTrainer(tiny_model(), tiny_cfg(tmp_path, minibatches=2))
    metrics = trainer.run_update(0)
    assert metrics["ratio_dev_first_minibatch"] < 1e-4 and metrics["clip_fraction_first_minibatch"] == 0
    assert metrics["ratio_dev"] >= metrics["ratio_dev_first_minibatch"]  # the second minibatch moved
