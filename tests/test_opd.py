"""Flow-OPD: objectives on analytic cases (incl. the estimator question) and the trainer on a tiny model."""
from __future__ import annotations

import pytest
import torch

from flowopd_lib import adapters, flow
from flowopd_lib.config import ConfigError
from flowopd_lib.opd import (OPDConfig, OPDTrainer, kl_rtg_advantages, logratio_advantages, pg_kl_loss,
                             reward_to_go, step_kl, teacher_name)
from flowopd_lib.losses import ppo_clip_loss
from tiny import tiny_model

S, S_NEXT, A = torch.tensor(0.6), torch.tensor(0.5), 0.7


# ----------------------------------------------------------------------------- pure pieces

def test_kl_is_zero_for_equal_velocities_and_matches_the_gaussian_formula():
    x, v, u = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert step_kl(v, v, x, S, S_NEXT, A).abs().max() == 0
    mean_v, std = flow.sde_mean_std(v, x, S, S_NEXT, A)
    mean_u, _ = flow.sde_mean_std(u, x, S, S_NEXT, A)
    expected = ((mean_v - mean_u) ** 2 / (2 * std ** 2)).flatten(1).sum(1)
    assert torch.allclose(step_kl(v, u, x, S, S_NEXT, A), expected, rtol=1e-4)
    released = step_kl(v, u, x, S, S_NEXT, A, scaling="released")
    assert torch.allclose(released, expected / (S - S_NEXT) / 32, rtol=1e-4)
    uniform = step_kl(v, u, x, S, S_NEXT, A, scaling="uniform")
    assert torch.allclose(uniform, ((v - u) ** 2).flatten(1).sum(1), rtol=1e-4)


def test_reward_to_go_and_baselines():
    r = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    assert reward_to_go(r, include_current=True).tolist() == [[6.0, 5.0, 3.0], [6.0, 6.0, 6.0]]
    assert reward_to_go(r, include_current=False).tolist() == [[5.0, 3.0, 0.0], [6.0, 6.0, 0.0]]
    adv = kl_rtg_advantages(r, group_size=2)  # -[5,3,0] and -[6,6,0], minus their mean
    assert adv.tolist() == [[0.5, 1.5, 0.0], [-0.5, -1.5, 0.0]]
    assert logratio_advantages(r, torch.ones_like(r), to_go=False).tolist() == [[0.0, 1.0, 2.0], [-1.0, -1.0, 5.0]]


def _policy_gradients(n: int = 20000, seed: int = 0) -> dict[str, torch.Tensor]:
    """Mean gradient wrt the student's velocity of each objective, on a Gaussian step policy whose
    optimum is known (student v = 0, teacher v = 1 everywhere; one state, n sampled actions)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 4)
    v = torch.zeros(n, 4, requires_grad=True)
    v_teacher = torch.ones(n, 4)
    with torch.no_grad():
        sampled = flow.sde_step(v, x, S, S_NEXT, A, generator=g)
    out = {}
    for name in ("kl", "pg_detached", "pg_undetached", "pg_logratio"):
        v.grad = None
        step = flow.sde_step(v, x, S, S_NEXT, A, prev_sample=sampled.prev_sample, reduce="sum")
        kl = step_kl(v, v_teacher, x, S, S_NEXT, A)
        old = step.log_prob.detach()
        if name == "kl":
            loss = kl
        elif name in ("pg_detached", "pg_undetached"):
            loss = pg_kl_loss(kl, step.log_prob, old, clip_range=1.0, detach=name == "pg_detached")
        else:
            teacher = flow.sde_step(v_teacher, x, S, S_NEXT, A, prev_sample=sampled.prev_sample, reduce="sum")
            advantage = logratio_advantages(teacher.log_prob[:, None], old[:, None], to_go=False)[:, 0]
            loss = ppo_clip_loss(step.log_prob, old, advantage, clip_range=1.0)[0]
        loss.mean().backward()
        out[name] = v.grad.sum(0)  # d mean-loss / d v (v shared by all samples)
    return out


def test_estimators_on_a_gaussian_policy_with_known_optimum():
    grads = _policy_gradients()
    toward_teacher = -torch.ones(4)  # descending the loss must raise v toward the teacher's 1
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=0)  # noqa: E731
    assert cos(grads["kl"], toward_teacher) > 0.999
    assert cos(grads["pg_logratio"], toward_teacher) > 0.9
    assert cos(grads["pg_undetached"], toward_teacher) > 0.9   # dominated by its direct KL term
    # The paper's detached form: the per-step KL does not depend on the action -> ~zero mean gradient.
    assert grads["pg_detached"].norm() < 0.05 * grads["kl"].norm()


# ----------------------------------------------------------------------------- trainer

def save_random_adapter(tmp_path, name: str, seed: int):
    model = tiny_model()
    torch.manual_seed(seed)
    adapters.add(model, name, rank=4, gaussian_init=False)
    return str(adapters.save(model, name, tmp_path / name))


def opd_cfg(tmp_path, teachers, **overrides) -> OPDConfig:
    values = dict(teachers=teachers, datasets={t: 1.0 for t in teachers}, prompts_per_update=2, group_size=2,
                  sde_steps=3, train_fraction=0.67, updates=1, lr=1e-2, cfg_scale=2.0, checkpoint_every=1,
                  out_dir=str(tmp_path / "run"))
    values.update(overrides)
    return OPDConfig(**values)


def test_mixed_adapter_labels_equal_per_adapter_forwards(tmp_path):
    """label() computes routed-teacher and MAR-anchor velocities in batched mixed-adapter forwards;
    each sample's labels must equal its own teacher's and the base's velocities computed alone."""
    teachers = {"geneval": save_random_adapter(tmp_path, "g", 1), "ocr": save_random_adapter(tmp_path, "o", 2)}
    trainer = OPDTrainer(tiny_model(), opd_cfg(tmp_path, teachers, prompts_per_update=4, mar_lambda=0.1))
    traj = trainer.rollout(0)
    assert {p.task for p in traj.prompts} == {"geneval", "ocr"}
    labels, _ = trainer.label(traj, 0)
    assert labels["v_anchor"].shape == labels["v_target"][:, :trainer.cfg.trained_steps].shape
    for k in range(trainer.cfg.trained_steps):
        for i, p in enumerate(traj.prompts):
            one = traj.select(torch.tensor([i]))
            with torch.no_grad():
                with adapters.active(trainer.model, teacher_name(p.task)):
                    teacher = trainer.policy_velocity(one, k)
                with adapters.active(trainer.model, None):
                    base = trainer.policy_velocity(one, k)
            assert torch.allclose(labels["v_target"][i:i + 1, k], teacher, atol=1e-5)
            assert torch.allclose(labels["v_anchor"][i:i + 1, k], base, atol=1e-5)
            assert not torch.allclose(teacher, base, atol=1e-5)  # the adapters do change the velocity


def test_folded_adapter_forward_equals_the_lora_forward_and_leaves_the_base_as_it_was(tmp_path):
    """adapters.folded (the teachers' labels) computes with W + s B A: the same velocities as peft's
    LoRA forward (`active`) and as its per-sample routing (`mixed`) to 1e-5, and the base weights
    are the same tensors with the same values afterwards."""
    model = tiny_model()
    for name, seed in (("g", 1), ("o", 2)):
        adapters.load(model, save_random_adapter(tmp_path, name, seed), name)
    x, sigma = torch.randn(4, *model.latent_shape), torch.full((4,), 0.6)
    embeds = model.encode_prompts(["a red circle", "a blue square", "", "a sign"])
    before = {n: (p, p.detach().clone()) for n, p in model.transformer.named_parameters()}
    with torch.no_grad():
        assert adapters.foldable(model, "g")
        with adapters.active(model, "g"):
            lora = model.velocity(x, sigma, embeds)
        with adapters.folded(model, "g"):
            fold = model.velocity(x, sigma, embeds)
        with adapters.mixed(model, ["g", "o", "g", None]):
            routed = model.velocity(x, sigma, embeds)
        with adapters.folded(model, None):
            base = model.velocity(x, sigma, embeds)
    assert torch.allclose(fold, lora, atol=1e-5, rtol=1e-5) and not torch.allclose(fold, base, atol=1e-3)
    assert torch.allclose(fold[[0, 2]], routed[[0, 2]], atol=1e-5, rtol=1e-5)
    after = dict(model.transformer.named_parameters())
    assert all(after[n] is p and torch.equal(p, value) for n, (p, value) in before.items())
    with pytest.raises(RuntimeError, match="no_grad"):
        with adapters.folded(model, "g"):
            pass


def test_routing_with_a_single_teacher_equals_the_single_teacher_run(tmp_path):
    g, o = save_random_adapter(tmp_path, "g", 1), save_random_adapter(tmp_path, "o", 2)
    one = OPDTrainer(tiny_model(), opd_cfg(tmp_path, {"geneval": g}, out_dir=str(tmp_path / "one")))
    one.train()
    two = OPDTrainer(tiny_model(), opd_cfg(tmp_path, {"geneval": g, "ocr": o}, datasets={"geneval": 1.0},
                                           out_dir=str(tmp_path / "two")))
    two.train()
    a, b = adapters.state_dict(one.model, "student"), adapters.state_dict(two.model, "student")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_student_equal_to_teacher_has_zero_kl_and_the_loss_pulls_toward_the_teacher(tmp_path):
    g = save_random_adapter(tmp_path, "g", 1)
    same = OPDTrainer(tiny_model(), opd_cfg(tmp_path, {"geneval": g}, init_adapter=g, mar_lambda=0.0,
                                            out_dir=str(tmp_path / "same")))
    assert same.run_update(0)["teacher_kl/geneval"] < 1e-8
    fresh = OPDTrainer(tiny_model(), opd_cfg(tmp_path, {"geneval": g}, mar_lambda=0.0, lr=3e-2, updates=4,
                                             ema_decay=0.0, out_dir=str(tmp_path / "fresh")))
    first = fresh.run_update(0)["teacher_kl/geneval"]
    fresh.update = 1
    last = fresh.train()["teacher_kl/geneval"]
    assert first > 0 and last < first


@pytest.mark.parametrize("objective", ["kl_rtg", "pg_undetached", "pg_detached", "pg_logratio"])
def test_every_objective_runs_an_update(tmp_path, objective):
    g = save_random_adapter(tmp_path, "g", 1)
    cfg = opd_cfg(tmp_path, {"geneval": g}, objective=objective, reward_to_go=True, anchor=g, clip_range=0.2)
    metrics = OPDTrainer(tiny_model(), cfg).train()
    assert metrics["grad_norm"] > 0 and "mar" in metrics and "teacher_kl/geneval" in metrics


def test_unknown_task_label_is_a_clear_error(tmp_path):
    g = save_random_adapter(tmp_path, "g", 1)
    with pytest.raises(ConfigError, match="no teacher for task"):
        opd_cfg(tmp_path, {"geneval": g}, datasets={"ocr": 1.0})
    with pytest.raises(ConfigError, match="ode_after_trained=False"):
        opd_cfg(tmp_path, {"geneval": g}, objective="pg_logratio", ode_after_trained=True)
    trainer = OPDTrainer(tiny_model(), opd_cfg(tmp_path, {"geneval": g}))
    traj = trainer.rollout(0)
    traj.prompts[0].task = "ocr"
    with pytest.raises(ValueError, match="'ocr' has no teacher; known teachers: \\['geneval'\\]"):
        trainer.label(traj, 0)
