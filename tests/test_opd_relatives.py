"""The on-policy distillation methods that followed Flow-OPD, in the same loop (docs/method.md section 5.6):
DiffusionOPD's mean matching (objective `mean_match`, on SDE or ODE rollouts: `rollout`), DanceOPD's
supervision at a few low-noise steps (`supervised_steps`) and the no-teacher control (objective
`no_teacher`). Analytic cases first, then one tiny OPDTrainer run per objective or setting."""
from __future__ import annotations

import pytest
import torch
import yaml

from flowopd_lib import adapters, flow
from flowopd_lib.config import ConfigError
from flowopd_lib.opd import (OBJECTIVES, OPDTrainer, fixed_advantages, mean_matching, mean_weight, step_kl,
                             supervised_step_indices, teacher_name)
from test_opd import opd_cfg, save_random_adapter
from tiny import tiny_model

S, S_NEXT, A = torch.tensor(0.6), torch.tensor(0.5), 0.7


# ----------------------------------------------------------------------------- DiffusionOPD: mean matching

@pytest.mark.parametrize("level", [A, 0.0])
def test_mean_matching_is_half_the_squared_gap_of_the_step_means(level):
    """SDE (level a) and ODE (level 0) steps: 0.5 ||mu(v) - mu(u)||^2 summed over dimensions, with
    mu the step's mean; at level 0 that is the Euler step x + dt v, so 0.5 dt^2 ||v - u||^2."""
    x, v, u = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert mean_matching(v, v, x, S, S_NEXT, level).abs().max() == 0
    mean_v, _ = flow.sde_mean_std(v, x, S, S_NEXT, level)
    mean_u, _ = flow.sde_mean_std(u, x, S, S_NEXT, level)
    expected = 0.5 * ((mean_v - mean_u) ** 2).flatten(1).sum(1)
    assert torch.allclose(mean_matching(v, u, x, S, S_NEXT, level), expected, rtol=1e-4)
    if level == 0:
        ode = 0.5 * ((flow.ode_step(v, x, S, S_NEXT) - flow.ode_step(u, x, S, S_NEXT)) ** 2).flatten(1).sum(1)
        assert torch.allclose(mean_matching(v, u, x, S, S_NEXT, 0.0), ode, rtol=1e-4)
        assert torch.allclose(mean_weight(S, S_NEXT, 0.0), (S - S_NEXT) ** 2 / 2)
    per_sample = mean_matching(v, u, x, torch.full((3,), 0.6), torch.full((3,), 0.5), level)  # sigma [B]
    assert per_sample.shape == (3,) and torch.allclose(per_sample, expected, rtol=1e-4)


def test_mean_matching_is_the_kl_times_the_step_variance():
    """The two steps share their variance std^2 = sig^2 |dt|, so mean matching = std^2 * KL and its
    gradient is the KL's times std^2: the same direction at each step, another weighting across steps.
    Below s = 1, mu_v - mu_u = (1 + a^2 / 2) dt (v - u), so on a uniform grid mean matching weighs every
    step alike: it is the `uniform` ablation times dt^2 (1 + a^2/2)^2 / 2 (the first step, at s = 1, has 1)."""
    x, u = torch.randn(4, 8), torch.randn(4, 8)
    v = torch.randn(4, 8, requires_grad=True)
    _, std = flow.sde_mean_std(v, x, S, S_NEXT, A)
    (grad_mm,) = torch.autograd.grad(mean_matching(v, u, x, S, S_NEXT, A).sum(), v)
    (grad_kl,) = torch.autograd.grad(step_kl(v, u, x, S, S_NEXT, A).sum(), v)
    assert torch.allclose(grad_mm, std ** 2 * grad_kl, rtol=1e-5)
    assert torch.allclose(mean_matching(v, u, x, S, S_NEXT, A), std ** 2 * step_kl(v, u, x, S, S_NEXT, A), rtol=1e-5)
    sigmas = flow.sigma_schedule(10)
    for k in range(10):
        c, dt = (1.0 if k == 0 else 1 + A ** 2 / 2), sigmas[k] - sigmas[k + 1]
        expected = dt ** 2 * c ** 2 / 2 * step_kl(v, u, x, sigmas[k], sigmas[k + 1], A, scaling="uniform")
        assert torch.allclose(mean_matching(v, u, x, sigmas[k], sigmas[k + 1], A), expected, rtol=1e-4), k


def test_mean_match_objective_minimises_the_mean_gap():
    objective = OBJECTIVES["mean_match"]
    assert objective.mean_gap and objective.teacher and not objective.ppo_ratio and not objective.every_step
    gap = torch.tensor([0.5, 2.0])
    assert torch.equal(objective.loss(torch.tensor([9.0, 9.0]), mean_gap=gap), gap)


# ----------------------------------------------------------------------------- DanceOPD: supervised steps

def test_supervised_steps_select_among_the_trained_steps():
    assert supervised_step_indices("all", 4) == [0, 1, 2, 3]
    assert supervised_step_indices("first:2", 4) == [0, 1]
    assert supervised_step_indices("last:1", 4) == [3]
    assert supervised_step_indices("last:4", 4) == [0, 1, 2, 3]
    assert supervised_step_indices("one:1", 4) == [1]
    assert supervised_step_indices("one:-1", 4) == [3]
    for bad in ("some", "first:0", "last:5", "one:4", "one:-5", "one:x", "first:", "first:1.5", "all:2", "last"):
        with pytest.raises(ValueError, match="supervised_steps="):
            supervised_step_indices(bad, 4)


def test_bad_supervised_steps_is_a_config_error_naming_the_value_and_the_forms(tmp_path):
    g = save_random_adapter(tmp_path, "g", 1)
    with pytest.raises(ConfigError, match=r"supervised_steps='last:3'.*'all', 'first:k', 'last:k'.*'one:i'"):
        opd_cfg(tmp_path, {"geneval": g}, supervised_steps="last:3")  # 2 trained steps
    with pytest.raises(ConfigError, match="scores every step"):
        opd_cfg(tmp_path, {"geneval": g}, supervised_steps="last:1", objective="kl_rtg")
    with pytest.raises(ConfigError, match="rollout='ode'"):
        opd_cfg(tmp_path, {"geneval": g}, rollout="ode", objective="pg_undetached")
    with pytest.raises(ConfigError, match="rollout"):
        opd_cfg(tmp_path, {"geneval": g}, rollout="euler")


def manual_update_loss(trainer: OPDTrainer, traj, steps) -> torch.Tensor:
    """The first update's loss computed outside the trainer: the exact per-step KL between the student's
    and the teacher's velocities at the stored states, averaged over samples and the given steps."""
    kls = []
    for k in steps:
        with torch.no_grad(), adapters.active(trainer.model, trainer.cfg.adapter):
            student = trainer.policy_velocity(traj, k)
        with torch.no_grad(), adapters.active(trainer.model, teacher_name("geneval")):
            teacher = trainer.policy_velocity(traj, k)
        kls.append(flow.step_kl(student, teacher, traj.latents[:, k], traj.sigmas[k], traj.sigmas[k + 1], A))
    return torch.stack(kls).mean()


def test_all_steps_is_the_default_update_and_a_subset_labels_and_trains_only_its_steps(tmp_path, monkeypatch):
    g = save_random_adapter(tmp_path, "g", 1)
    settings = dict(mar_lambda=0.0, minibatches=1, sde_steps=4, train_fraction=0.75, ema_decay=0.0)

    def trainer(name, **over):
        return OPDTrainer(tiny_model(), opd_cfg(tmp_path, {"geneval": g}, out_dir=str(tmp_path / name),
                                                **settings, **over))

    default, explicit = trainer("default"), trainer("all", supervised_steps="all")
    traj = default.rollout(0)
    expected = manual_update_loss(default, traj, range(3))
    loss = default.run_update(0)["loss"]
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    explicit.run_update(0)
    a, b = adapters.state_dict(default.model, "student"), adapters.state_dict(explicit.model, "student")
    assert all(torch.equal(a[k], b[k]) for k in a)  # "all" is the default, bit for bit

    asked, trained = [], []
    subset = trainer("subset", supervised_steps="one:1")
    original_velocities, original_policy = subset.target_velocities, subset.policy_velocity
    monkeypatch.setattr(subset, "target_velocities",
                        lambda t, steps: asked.append(list(steps)) or original_velocities(t, steps))
    monkeypatch.setattr(subset, "policy_velocity",
                        lambda t, k: trained.append(k) or original_policy(t, k))
    traj = subset.rollout(0)
    labels, _ = subset.label(traj, 0)
    assert asked == [[1]] and labels["v_target"].shape[1] == 1  # teacher labels of step 1 only
    expected = manual_update_loss(subset, traj, [1])
    trained.clear()
    metrics = subset.run_update(0)
    assert set(trained) == {1}  # the rollout's policy forwards aside, only step 1 is trained
    assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-5)  # a mean over the supervised step
    assert subset.label_forwards_per_sample == 1


def test_a_low_noise_subset_trains_and_records_its_setting(tmp_path):
    g = save_random_adapter(tmp_path, "g", 1)
    cfg = opd_cfg(tmp_path, {"geneval": g}, supervised_steps="last:1", kl_scaling="uniform", anchor=g)
    metrics = OPDTrainer(tiny_model(), cfg).train()
    assert metrics["grad_norm"] > 0 and "mar" in metrics and "teacher_kl/geneval" in metrics
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["supervised_steps"] == "last:1"


# ----------------------------------------------------------------------------- the no-teacher control

def test_no_teacher_gradient_does_not_depend_on_the_teacher():
    objective = OBJECTIVES["no_teacher"]
    assert not objective.teacher and objective.ppo_ratio and objective.advantages is not None
    x, sampled = torch.randn(5, 8), torch.randn(5, 8)
    v = torch.randn(5, 8, requires_grad=True)
    advantage = fixed_advantages(5, 1, -1.0)[:, 0]
    assert fixed_advantages(5, 3, -0.5).shape == (5, 3) and (fixed_advantages(5, 3, -0.5) == -0.5).all()
    grads = []
    for teacher in (torch.zeros(5, 8), torch.randn(5, 8) * 3):
        log_prob = flow.sde_step(v, x, S, S_NEXT, A, prev_sample=sampled).log_prob
        kl = step_kl(v, teacher, x, S, S_NEXT, A)
        loss = objective.loss(kl, log_prob=log_prob, old_log_prob=log_prob.detach(), clip_range=0.2,
                              advantage=advantage)
        grads.append(torch.autograd.grad(loss.sum(), v)[0])
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])
    assert torch.equal(objective.loss(None, log_prob=log_prob, old_log_prob=log_prob.detach(), clip_range=0.2,
                                      advantage=advantage), loss)  # the trainer passes no KL at all


def test_no_teacher_expected_gradient_on_a_gaussian_step_is_zero():
    """A constant advantage times the score has zero expectation: on the SDE step (whose std does not
    depend on theta) the control moves the step mean only by sampling noise."""
    g = torch.Generator().manual_seed(0)
    n = 20000
    x, v = torch.zeros(n, 4), torch.zeros(n, 4, requires_grad=True)
    with torch.no_grad():
        sampled = flow.sde_step(v, x, S, S_NEXT, A, generator=g).prev_sample
    step = flow.sde_step(v, x, S, S_NEXT, A, prev_sample=sampled, reduce="sum")
    loss = OBJECTIVES["no_teacher"].loss(None, log_prob=step.log_prob, old_log_prob=step.log_prob.detach(),
                                         clip_range=1.0, advantage=fixed_advantages(n, 1, -1.0)[:, 0])
    (grad,) = torch.autograd.grad(loss.mean(), v, retain_graph=True)
    one_sample = torch.autograd.grad(loss[0], v)[0][0]
    assert grad.sum(0).norm() < 0.05 * one_sample.norm()


def test_no_teacher_control_trains_without_a_teacher_forward(tmp_path, monkeypatch):
    g = save_random_adapter(tmp_path, "g", 1)
    cfg = opd_cfg(tmp_path, {"geneval": g}, objective="no_teacher", clip_range=0.2, fixed_advantage=-0.5)
    trainer = OPDTrainer(tiny_model(), cfg)
    original = trainer.velocities_through
    seen = []
    monkeypatch.setattr(trainer, "target_velocities", lambda *a: pytest.fail("the control asked for teacher labels"))
    monkeypatch.setattr(trainer, "velocities_through", lambda t, steps, names: seen.append(set(names))
                        or original(t, steps, names))
    labels, metrics = trainer.label(trainer.rollout(0), 0)
    assert "v_target" not in labels and not metrics and (labels["advantage"] == -0.5).all()
    assert seen == [{None}]  # the MAR anchor (the base) only
    assert trainer.label_forwards_per_sample == cfg.trained_steps  # MAR's, no teacher's
    metrics = trainer.train()
    assert metrics["grad_norm"] > 0 and "mar" in metrics and not any(k.startswith("teacher_kl") for k in metrics)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["objective"] == "no_teacher"


# ----------------------------------------------------------------------------- DiffusionOPD end to end

def test_mean_match_trains_on_sde_rollouts(tmp_path):
    g = save_random_adapter(tmp_path, "g", 1)
    metrics = OPDTrainer(tiny_model(), opd_cfg(tmp_path, {"geneval": g}, objective="mean_match")).train()
    assert metrics["grad_norm"] > 0 and metrics["mean_gap"] > 0 and "teacher_kl/geneval" in metrics
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["objective"] == "mean_match"


def test_mean_match_on_ode_rollouts_matches_the_euler_steps(tmp_path):
    """rollout: ode samples deterministic student trajectories (every step the Euler step of the stored
    velocity); the teachers label the same states and mean matching compares the two Euler steps."""
    g = save_random_adapter(tmp_path, "g", 1)
    cfg = opd_cfg(tmp_path, {"geneval": g}, objective="mean_match", rollout="ode", mar_lambda=0.0, minibatches=1)
    trainer = OPDTrainer(tiny_model(), cfg)
    traj = trainer.rollout(0)
    assert torch.isnan(traj.log_probs).all()
    for k in range(cfg.sde_steps):
        euler = flow.ode_step(traj.velocities[:, k], traj.latents[:, k], traj.sigmas[k], traj.sigmas[k + 1])
        assert torch.allclose(traj.latents[:, k + 1], euler, atol=1e-6)
    labels, _ = trainer.label(traj, 0)
    expected = torch.stack([0.5 * (traj.sigmas[k + 1] - traj.sigmas[k]) ** 2
                            * ((traj.velocities[:, k] - labels["v_target"][:, k]) ** 2).flatten(1).sum(1)
                            for k in range(cfg.trained_steps)]).mean()
    metrics = trainer.run_update(0)
    assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-4) and metrics["grad_norm"] > 0
    assert yaml.safe_load(cfg.to_yaml())["rollout"] == "ode"


def test_every_named_method_builds_a_valid_config_and_a_clash_is_refused(tmp_path):
    """Notebook 04's `method`: each of opd.METHODS is a valid OPDConfig on the same loop; a parameter
    that contradicts the method is an error naming both, never silently one or the other."""
    from flowopd_lib.config import ConfigError
    from flowopd_lib.opd import METHODS, OPDConfig, method_settings

    base = {"teachers": {"geneval": "t"}, "datasets": {"geneval": 1.0}, "out_dir": str(tmp_path), "objective": None}
    assert {"flow_opd", "flow_opd_paper", "flow_opd_released", "diffusion_opd_sde", "diffusion_opd_ode", "dance_opd",
            "no_teacher"} == set(METHODS)
    for name, fields in METHODS.items():
        cfg = OPDConfig.from_settings(method_settings(name, base))
        assert all(getattr(cfg, k) == v for k, v in fields.items()), name
    assert method_settings(None, base) == base
    assert method_settings("dance_opd", {**base, "objective": "kl"})["supervised_steps"] == "last:1"  # agreeing is fine
    with pytest.raises(ConfigError, match=r"method='diffusion_opd_ode' sets objective='mean_match'.*objective='kl'"):
        method_settings("diffusion_opd_ode", {**base, "objective": "kl"})
    with pytest.raises(ConfigError, match=r"rollout='ode'.*rollout='sde'"):
        method_settings("diffusion_opd_ode", base, {"rollout": "sde"})
    with pytest.raises(ConfigError, match=r"method='dance'.*\['dance_opd'"):
        method_settings("dance", base)
