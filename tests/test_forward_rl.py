"""DiffusionNFT and AWM: the losses on analytic cases, a Gaussian mixture whose reward picks one
mode, and the trainers on the tiny toy model and the tiny SD3 wrapper."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from flowopd_lib import adapters, rewards
from flowopd_lib.awm import AWMConfig, AWMTrainer, awm_loss
from flowopd_lib.losses import group_advantages
from flowopd_lib.nft import NFTConfig, NFTTrainer, nft_loss, old_decay
from tiny import tiny_model


def _brightness(images, prompts):
    return {"reward": images.mean(dim=(1, 2, 3))}


def _flat(images, prompts):
    return {"reward": torch.ones(len(images))}


rewards.register("test_fwd_brightness", _brightness)
rewards.register("test_fwd_flat", _flat)


# ----------------------------------------------------------------------------- pure losses

def _case(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(b, 3, 4, 4, generator=g), torch.randn(b, 3, 4, 4, generator=g)
    sigma = torch.rand(b, generator=g) * 0.9 + 0.05
    x_s = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
    v_old = torch.randn(b, 3, 4, 4, generator=g)
    advantage = torch.randn(b, generator=g) * 2
    return x0, noise, sigma, x_s, v_old, advantage


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_gradient_at_the_old_policy_is_the_advantage_weighted_fm_gradient(beta):
    x0, noise, sigma, x_s, v_old, advantage = _case()
    v = v_old.clone().requires_grad_(True)
    nft_loss(v, v_old, x0, x_s, sigma, advantage, beta=beta, adv_clip=5.0)[0].sum().backward()

    u = v_old.clone().requires_grad_(True)
    s = sigma.view(-1, 1, 1, 1)
    error = x_s - s * u - x0                                   # = s (eps - x0 - u)
    w = error.detach().abs().flatten(1).mean(dim=1)            # NFT's adaptive normaliser at v_old
    weighted_fm = advantage.clamp(-5, 5) * error.pow(2).flatten(1).mean(dim=1) / w
    weighted_fm.sum().backward()
    torch.testing.assert_close(v.grad, u.grad, rtol=1e-5, atol=1e-7)
    # and the error really is s (eps - x0 - v): the flow-matching residual scaled by s
    torch.testing.assert_close(error.detach(), s * (noise - x0 - v_old), rtol=1e-5, atol=1e-6)


def test_zero_advantage_gives_zero_gradient_at_the_old_policy():
    x0, noise, sigma, x_s, v_old, _ = _case()
    for loss_fn in (lambda v: nft_loss(v, v_old, x0, x_s, sigma, torch.zeros(6))[0],
                    lambda v: awm_loss(v, v_old, x0, noise, sigma, torch.zeros(6))[0]):
        v = v_old.clone().requires_grad_(True)
        loss_fn(v).sum().backward()
        assert torch.count_nonzero(v.grad) == 0


def test_awm_on_policy_gradient_is_advantage_times_fm_gradient():
    x0, noise, sigma, x_s, v_old, advantage = _case(seed=1)
    v = v_old.clone().requires_grad_(True)
    awm_loss(v, v_old, x0, noise, sigma, advantage, clip_range=1.0)[0].sum().backward()
    u = v_old.clone().requires_grad_(True)
    (advantage * (u - (noise - x0)).pow(2).flatten(1).mean(dim=1)).sum().backward()
    torch.testing.assert_close(v.grad, u.grad, rtol=1e-5, atol=1e-7)


def test_old_decay_schedules_of_diffusionnft():
    assert [old_decay(u, 0.001, 0.5) for u in (0, 10, 1000)] == [0.0, pytest.approx(0.01), 0.5]
    assert old_decay(74, 0.0075, 0.999, start=75) == 0.0
    assert old_decay(75 + 100, 0.0075, 0.999, start=75) == pytest.approx(0.75)
    assert old_decay(10_000, 0.0075, 0.999, start=75) == 0.999


# ----------------------------------------------------------------------------- a Gaussian mixture

MEANS, STD = torch.tensor([-2.0, 2.0]), 0.5


def mixture_velocity(x: torch.Tensor, s: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The exact rectified-flow velocity E[eps - x0 | x_s] of the 1-D mixture sum_k pi_k N(m_k, STD^2)
    with pi = softmax(logits): a 'model' whose only parameters are the mode weights."""
    x, s = x[:, None], s[:, None]                               # [B, 1] against the K modes
    var = (1 - s) ** 2 * STD ** 2 + s ** 2
    centred = x - (1 - s) * MEANS
    log_post = torch.log_softmax(logits, 0) - 0.5 * centred ** 2 / var - 0.5 * torch.log(var)
    post = torch.softmax(log_post, dim=1)
    e_x0 = MEANS + (1 - s) * STD ** 2 / var * centred
    e_eps = s / var * centred
    return (post * (e_eps - e_x0)).sum(dim=1)


def train_on_mixture(loss_name: str, rounds: int = 30, n: int = 64, seed: int = 0) -> float:
    """Mass of the rewarded mode (x > 0) after `rounds` of sample -> reward -> forward-process loss."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(rounds):
        old = logits.detach().clone()
        with torch.no_grad():  # exact samples of the current policy (any solver would do)
            mode = torch.multinomial(torch.softmax(old, 0), n, replacement=True, generator=g)
            x0 = MEANS[mode] + STD * torch.randn(n, generator=g)
        advantage, _ = group_advantages((x0 > 0).float(), group_size=n)
        noise, sigma = torch.randn(n, generator=g), torch.rand(n, generator=g) * 0.98 + 0.01
        x_s = (1 - sigma) * x0 + sigma * noise
        v, v_old = mixture_velocity(x_s, sigma, logits), mixture_velocity(x_s, sigma, old)
        if loss_name == "nft":
            loss = nft_loss(v[:, None], v_old[:, None], x0[:, None], x_s[:, None], sigma, advantage)[0]
        else:
            loss = awm_loss(v[:, None], v_old[:, None], x0[:, None], noise[:, None], sigma, advantage)[0]
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    return torch.softmax(logits.detach(), 0)[1].item()


@pytest.mark.parametrize("loss_name", ["nft", "awm"])
def test_each_trainer_raises_the_mass_of_the_rewarded_mode(loss_name):
    assert train_on_mixture(loss_name, rounds=0) == pytest.approx(0.5)
    assert train_on_mixture(loss_name) > 0.8


def test_mixture_velocity_is_the_flow_of_the_mixture():
    """Sanity of the analytic model: integrating its ODE from noise lands on the modes in proportion."""
    logits = torch.tensor([math.log(0.2), math.log(0.8)])
    x = torch.randn(4000, generator=torch.Generator().manual_seed(0))
    sigmas = torch.linspace(1, 0, 201)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_next - s) * mixture_velocity(x, s.expand(len(x)), logits)
    assert (x > 0).float().mean().item() == pytest.approx(0.8, abs=0.03)


# ----------------------------------------------------------------------------- trainers on tiny models

def tiny_cfg(cls, tmp_path, **overrides):
    values = dict(rewards={"test_fwd_brightness": 1.0}, datasets={"pickscore": 1.0}, prompts_per_update=2,
                  group_size=4, sde_steps=3, train_timesteps=2, updates=2, lr=3e-2, ema_decay=0.5,
                  checkpoint_every=1, out_dir=str(tmp_path / "run"))
    return cls(**{**values, **overrides})


@pytest.mark.parametrize("trainer_cls,config_cls", [(NFTTrainer, NFTConfig), (AWMTrainer, AWMConfig)])
def test_training_moves_the_reward(tmp_path, trainer_cls, config_cls):
    cfg = tiny_cfg(config_cls, tmp_path, updates=8, lr=5e-2, beta=0.0)
    trainer = trainer_cls(tiny_model(), cfg)
    first = trainer.run_update(0)
    trainer.update = 1
    metrics = trainer.train()
    assert metrics["reward/test_fwd_brightness"] > first["reward/test_fwd_brightness"]
    assert (Path(cfg.out_dir) / "adapter" / adapters.WEIGHT_NAME).exists()


def test_equal_rewards_in_every_group_leave_the_adapter_unchanged(tmp_path):
    for trainer_cls, config_cls in [(NFTTrainer, NFTConfig), (AWMTrainer, AWMConfig)]:
        trainer = trainer_cls(tiny_model(), tiny_cfg(config_cls, tmp_path, rewards={"test_fwd_flat": 1.0},
                                                     weight_decay=0.0))
        before = [p.detach().clone() for p in trainer.params]
        metrics = trainer.run_update(0)
        assert metrics["zero_spread_fraction"] == 1.0
        assert all(torch.equal(a, b.detach()) for a, b in zip(before, trainer.params))


def test_nft_samples_from_old_which_follows_the_trained_adapter_by_its_decay(tmp_path):
    cfg = tiny_cfg(NFTConfig, tmp_path, old_decay_rate=0.25, old_decay_max=0.5)
    trainer = NFTTrainer(tiny_model(), cfg)
    assert trainer.sampling_adapter == f"{cfg.adapter}_old"
    old_start = [p.detach().clone() for p in trainer.old_params]
    assert all(torch.equal(o, p) for o, p in zip(old_start, trainer.params))  # old starts as the trained one
    trainer.run_update(0)                                    # decay 0: old = trained
    assert all(torch.equal(o, p) for o, p in zip(trainer.old_params, trainer.params))
    before_old = [p.detach().clone() for p in trainer.old_params]
    trainer.run_update(1)                                    # decay 0.25
    for o, b, p in zip(trainer.old_params, before_old, trainer.params):
        torch.testing.assert_close(o, 0.25 * b + 0.75 * p.detach())


@pytest.mark.parametrize("trainer_cls,config_cls", [(NFTTrainer, NFTConfig), (AWMTrainer, AWMConfig)])
def test_resume_equals_uninterrupted(tmp_path, trainer_cls, config_cls):
    full = tiny_cfg(config_cls, tmp_path, updates=3, out_dir=str(tmp_path / "full"))
    trainer_cls(tiny_model(), full).train()
    part = full.replace(out_dir=str(tmp_path / "part"), updates=1)
    trainer_cls(tiny_model(), part).train()
    trainer_cls(tiny_model(), part.replace(updates=3)).train(resume=True)
    states = [torch.load(Path(c.out_dir) / "checkpoints" / "step_0000003" / "state.pt", weights_only=True)
              for c in (full, part)]
    for key in ("adapter", *(("old",) if trainer_cls is NFTTrainer else ())):
        for name, value in states[0][key].items():
            assert torch.equal(value, states[1][key][name]), (key, name)


@pytest.mark.parametrize("trainer_cls,config_cls", [(NFTTrainer, NFTConfig), (AWMTrainer, AWMConfig)])
def test_update_on_tiny_sd3_with_guidance(tmp_path, trainer_cls, config_cls):
    from flowopd_lib.models import SD3FlowModel, tiny_sd3_pipeline

    model = SD3FlowModel.from_pipeline(tiny_sd3_pipeline())
    cfg = tiny_cfg(config_cls, tmp_path, updates=1, cfg_scale=4.5, shift=3.0, sde_steps=2, lr=1e-2,
                   solver="sde")
    trainer = trainer_cls(model, cfg)
    before = {k: v.clone() for k, v in adapters.state_dict(model, cfg.adapter).items()}
    metrics = trainer.train()
    after = adapters.state_dict(model, cfg.adapter)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert metrics["zero_spread_fraction"] == 0 and metrics["grad_norm"] > 0 and metrics["kl_ref"] >= 0


def test_efficiency_run_writes_its_table_and_figure(tmp_path, monkeypatch):
    """The side-by-side command on a tiny base, two updates per trainer (monkeypatched sizes)."""
    from flowopd_lib import models, teachers

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(models, "load_base", lambda name="toy": tiny_model())
    monkeypatch.setitem(teachers.EFFICIENCY_SHARED, "prompts_per_update", 2)
    monkeypatch.setitem(teachers.EFFICIENCY_SHARED, "group_size", 2)
    monkeypatch.setitem(teachers.EFFICIENCY_SHARED, "sde_steps", 2)
    monkeypatch.setitem(teachers.EFFICIENCY_SHARED, "cfg_scale", 1.0)
    monkeypatch.setattr(teachers, "PROTOCOL", {"cfg_scale": 1.0, "steps": 2, "seed": 0})
    table = teachers.efficiency("ocr", samples=8, eval_every_samples=4, out=tmp_path, eval_prompts=4)
    assert list(table["trainer"].unique()) == ["grpo", "nft", "awm"]
    assert sorted(table[table.trainer == "nft"]["samples"]) == [0, 4, 8]
    assert (table["se"] >= 0).all() and (table.dropna(subset=["samples_per_s"])["samples_per_s"] > 0).all()
    assert (tmp_path / "efficiency.png").exists() and (tmp_path / "efficiency.csv").exists()
