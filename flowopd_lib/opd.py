"""Stage 2: multi-teacher on-policy distillation (Flow-OPD) with Manifold Anchor Regularization.

docs/method.md section 5. Per update the student samples G SDE trajectories per prompt from its own
policy; each prompt is routed by its task label to one teacher adapter; the teachers' (and the
anchor's) velocities at the student's stored states are computed once, without gradient, each
adapter on its own prompts with its LoRA folded into the base weights (so a teacher's forward costs
what the base's does); then one of these objectives is minimised on the trained steps:

    kl             the closed-form per-step KL(student || teacher) at on-policy states (default)
    kl_rtg         kl + clipped policy gradient crediting each action with the KLs of the later
                   steps it leads to (reward-to-go, group-mean baseline): the full gradient of
                   the trajectory-level KL
    pg_undetached  clipped ratio x (-KL) with the KL NOT detached (the released code)
    pg_detached    clipped ratio x (-KL) detached (the paper's text; zero expected gradient,
                   because the per-step KL depends on the state only, not on the sampled action)
    pg_logratio    clipped PG with the sampled-action reward log pi_teacher - log pi_student
                   (LLM on-policy distillation), optionally summed to go

plus MAR: lambda * w(s) ||v_student - v_anchor||^2 on every sample (anchor = the base or an adapter).
Every objective is a pure function below, shape-documented and unit-tested, and one entry of the
registry `OBJECTIVES` (name -> `Objective`: that loss and what the trainer must compute for it: teacher
labels at every SDE step or only the trained ones, the sampled action's PPO ratio, per-step
advantages at labelling). The trainer consults the registry; it never compares objective names.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import torch

from . import adapters, flow, rollout
from .config import ConfigError, param
from .losses import ppo_clip_loss
from .models.base import FlowModel
from .trainer import OnPolicyConfig, OnPolicyTrainer


# ----------------------------------------------------------------------------- pure pieces

def step_kl(v: torch.Tensor, v_target: torch.Tensor, x: torch.Tensor, sigma, sigma_next, noise_level: float,
            scaling: str = "exact") -> torch.Tensor:
    """Per-sample KL [B] between the student's and the target's SDE step at states x [B, ...].

    'exact': the Gaussian KL `w(s) ||v - v_target||^2` (sum over dimensions);
    'released': the released code's scale, averaged over dimensions and without the |dt| factor;
    'uniform': `||v - v_target||^2` (sum over dimensions), the same weight at every step. Not a KL:
    an ablation of the step weighting, since w(s) weighs late steps ~100x more than early ones."""
    kl = flow.step_kl(v, v_target, x, sigma, sigma_next, noise_level)
    if scaling == "exact":
        return kl
    if scaling == "released":
        dt = (torch.as_tensor(sigma_next, dtype=torch.float32) - torch.as_tensor(sigma, dtype=torch.float32)).abs()
        return kl / (dt.to(kl.device) * x[0].numel())
    if scaling == "uniform":
        return kl / flow.kl_weight(sigma, sigma_next, noise_level).to(kl.device)
    raise ValueError(f"kl scaling={scaling!r}: use 'exact', 'released' or 'uniform'")


def kl_loss(kl: torch.Tensor) -> torch.Tensor:
    """`kl`: minimise the per-step KL [B] directly (its gradient flows through the student's v)."""
    return kl


def pg_kl_loss(kl: torch.Tensor, log_prob: torch.Tensor, old_log_prob: torch.Tensor, clip_range: float,
               detach: bool) -> torch.Tensor:
    """`pg_undetached` / `pg_detached`: PPO-clipped ratio with the advantage -KL [B] (no baseline)."""
    advantage = -(kl.detach() if detach else kl)
    return ppo_clip_loss(log_prob, old_log_prob, advantage, clip_range)[0]


def pg_advantage_loss(kl: torch.Tensor, log_prob: torch.Tensor, old_log_prob: torch.Tensor, clip_range: float,
                      advantage: torch.Tensor, add_kl: bool) -> torch.Tensor:
    """`kl_rtg` (add_kl) / `pg_logratio`: PPO-clipped ratio with the labelled advantage [B] of the
    step, plus the direct per-step KL [B] where add_kl (without it the KL is not part of the loss)."""
    pg = ppo_clip_loss(log_prob, old_log_prob, advantage, clip_range)[0]
    return kl + pg if add_kl else pg


def reward_to_go(step_rewards: torch.Tensor, include_current: bool) -> torch.Tensor:
    """[B, T] -> [B, T]: sum of the rewards of steps >= t (or > t when not include_current)."""
    to_go = step_rewards.flip(1).cumsum(1).flip(1)
    return to_go if include_current else to_go - step_rewards


def group_baseline(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """Subtract each prompt group's mean: values [B, ...] in groups of group_size along dim 0."""
    grouped = values.view(-1, group_size, *values.shape[1:])
    return (grouped - grouped.mean(dim=1, keepdim=True)).view_as(values)


def kl_rtg_advantages(step_kls: torch.Tensor, group_size: int) -> torch.Tensor:
    """Advantages [B, T] of `kl_rtg`: minus the KLs of the later steps, group-mean baseline."""
    return group_baseline(-reward_to_go(step_kls, include_current=False), group_size)


def logratio_advantages(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor,
                        to_go: bool) -> torch.Tensor:
    """Advantages [B, T] of `pg_logratio`: the sampled action's log pi_teacher - log pi_student,
    optionally summed over the remaining steps."""
    r = teacher_log_probs - student_log_probs
    return reward_to_go(r, include_current=True) if to_go else r


# ----------------------------------------------------------------------------- the objectives

def kl_rtg_labels(kls: torch.Tensor, traj: rollout.Trajectories, v_target: torch.Tensor, cfg) -> torch.Tensor:
    """`kl_rtg`'s advantages [B, T] from the per-step KLs [B, T] of the labelled steps."""
    return kl_rtg_advantages(kls, cfg.group_size)


def logratio_labels(kls: torch.Tensor, traj: rollout.Trajectories, v_target: torch.Tensor, cfg) -> torch.Tensor:
    """`pg_logratio`'s advantages [B, T]: the stored actions' exact (summed) log-densities under the
    teacher's step Gaussians (velocities v_target [B, T, ...]) minus the student's at rollout."""
    steps = v_target.shape[1]
    teacher_lp = torch.stack([flow.sde_step(v_target[:, k], traj.latents[:, k], traj.sigmas[k], traj.sigmas[k + 1],
                                            cfg.noise_level, prev_sample=traj.latents[:, k + 1], reduce="sum").log_prob
                              for k in range(steps)], dim=1)
    student_lp = traj.log_probs[:, :steps] * traj.latents[0, 0].numel()  # stored means -> exact sums
    return logratio_advantages(teacher_lp, student_lp, cfg.reward_to_go)


@dataclasses.dataclass(frozen=True)
class Objective:
    """One OPD objective: the pure per-step loss [B] it minimises and what the trainer computes for it.

    `loss(kl, **inputs)` gets the step KL [B] and, where `ppo_ratio`, log_prob, old_log_prob (the
    sampled action's log-prob now and at rollout) and clip_range; where `advantages`, also the
    step's advantage [B] from labels["advantage"], which `advantages(kls, traj, v_target, cfg)`
    computes once per update from the labelled steps' KLs [B, T] and teacher velocities."""
    loss: Callable[..., torch.Tensor]
    every_step: bool = False  # teacher labels at every SDE step, not only the trained ones (scores the
                              # whole trajectory, so it needs SDE steps throughout)
    ppo_ratio: bool = False   # uses the PPO likelihood ratio of the sampled action
    advantages: Callable[..., torch.Tensor] | None = None  # per-step advantages [B, T] at labelling

    def __post_init__(self):
        if self.advantages is not None and not self.ppo_ratio:
            raise ValueError("an objective with advantages needs ppo_ratio: advantages weigh the PPO ratio")


OBJECTIVES: dict[str, Objective] = {
    "kl": Objective(kl_loss),
    "kl_rtg": Objective(functools.partial(pg_advantage_loss, add_kl=True), every_step=True, ppo_ratio=True,
                        advantages=kl_rtg_labels),
    "pg_undetached": Objective(functools.partial(pg_kl_loss, detach=False), ppo_ratio=True),
    "pg_detached": Objective(functools.partial(pg_kl_loss, detach=True), ppo_ratio=True),
    "pg_logratio": Objective(functools.partial(pg_advantage_loss, add_kl=False), every_step=True, ppo_ratio=True,
                             advantages=logratio_labels),
}


# ----------------------------------------------------------------------------- trainer

@dataclasses.dataclass
class OPDConfig(OnPolicyConfig):
    teachers: dict = param(None, "task -> directory of its teacher adapter (routing R(c) by the prompt's task)",
                           default_factory=dict)
    routing: str = param("hard", "'hard': each prompt's own teacher; 'soft': every prompt gets the "
                         "soft_weights blend of all teachers", choices=("hard", "soft"))
    soft_weights: dict[str, float] = param(None, "task -> weight of its teacher in 'soft' routing (default: equal)",
                               default_factory=dict)
    objective: str = param("kl", "training objective (module docstring)", choices=tuple(OBJECTIVES))
    kl_scaling: str = param("exact", "'exact' Gaussian KL, the released per-dimension no-|dt| scale, or "
                            "'uniform' (squared velocity error, every step weighted the same: an ablation)",
                            choices=("exact", "released", "uniform"))
    reward_to_go: bool = param(False, "pg_logratio: credit each action with the rewards of the steps after it")
    clip_range: float = param(1e-4, "PPO ratio clip of the policy-gradient objectives", range=(0, 1))
    mar_lambda: float = param(0.02, "weight of Manifold Anchor Regularization (0 = off)", range=(0, None))
    anchor: str = param("base", "MAR anchor: 'base' (adapters off) or a directory of an adapter (e.g. the deqa teacher)")
    datasets: dict[str, float] = param(None, "task -> sampling ratio of its training prompts",
                           default_factory=lambda: {"geneval": 1.0, "ocr": 1.0, "pickscore": 1.0})
    updates: int = param(40, "number of updates (rollout + optimizer steps); 40: the toy study's distillation "
                         "(papermill_runs/toy_full.yaml), ~4 minutes on 2 cores", range=(0, None))
    out_dir: str = param("runs/student", "run directory (adapter/, checkpoints/, metrics.csv)")

    def check(self) -> None:
        super().check()
        if not self.teachers:
            raise ConfigError("teachers is empty: map each task to its teacher adapter directory, e.g. "
                              "{geneval: runs/teacher_geneval/adapter}")
        if self.routing == "hard":
            untaught = [t for t in self.datasets if t not in self.teachers]
            if untaught:
                raise ConfigError(f"no teacher for task(s) {untaught} in datasets; known teachers: "
                                  f"{sorted(self.teachers)}")
        unknown = [t for t in self.soft_weights if t not in self.teachers]
        if unknown:
            raise ConfigError(f"soft_weights names task(s) {unknown} without a teacher; teachers: {sorted(self.teachers)}")
        if self.ode_after_trained and OBJECTIVES[self.objective].every_step:
            raise ConfigError(f"objective={self.objective!r} scores every step of the trajectory, which needs SDE "
                              "steps throughout: set ode_after_trained=False or use objective 'kl'")

    def input_adapters(self) -> dict[str, str]:
        """The start adapter, each teacher and a MAR anchor that is an adapter folder."""
        found = {**super().input_adapters(), **{f"teachers[{task!r}]": d for task, d in self.teachers.items()}}
        return {**found, "anchor": self.anchor} if self.anchor != "base" else found


def teacher_name(task: str) -> str:
    return f"teacher_{task}"


class OPDTrainer(OnPolicyTrainer):
    cfg: OPDConfig
    ANCHOR = "anchor"
    decode_rollouts = False  # labels come from teacher velocities: no VAE decode of the samples

    def __init__(self, model: FlowModel, cfg: OPDConfig, accelerator=None, eval_fn=None, prompt_source=None):
        super().__init__(model, cfg, accelerator, eval_fn, prompt_source)
        for task, directory in cfg.teachers.items():
            if teacher_name(task) not in adapters.names(self.model):
                adapters.load(self.model, directory, teacher_name(task))
        if cfg.anchor != "base" and self.ANCHOR not in adapters.names(self.model):
            adapters.load(self.model, cfg.anchor, self.ANCHOR)

    # -- routing
    def route(self, prompts: list) -> list[str]:
        """The teacher adapter of each prompt (hard routing by its task label)."""
        out = []
        for p in prompts:
            if p.task not in self.cfg.teachers:
                raise ValueError(f"prompt task {p.task!r} has no teacher; known teachers: {sorted(self.cfg.teachers)}")
            out.append(teacher_name(p.task))
        return out

    @torch.no_grad()
    def velocities_through(self, traj: rollout.Trajectories, steps: Sequence[int],
                           per_sample: list[str | None]) -> torch.Tensor:
        """Velocities [B, len(steps), ...] at the given steps' states, each sample through its own
        adapter (None = the base): per adapter, one forward per step on that adapter's samples, with
        its LoRA folded into the base weights once for all steps (`adapters.folded`). A teacher's
        forward then costs what the base's does; peft's per-sample routing of one mixed batch
        (`adapters.mixed`) cost ~1.35 base forwards (`python -m flowopd_lib.diagnostics.bench`)."""
        out = None
        for name in dict.fromkeys(per_sample):
            index = torch.tensor([i for i, n in enumerate(per_sample) if n == name])
            part = traj if len(index) == len(traj) else traj.select(index)
            with adapters.folded(self.model, name):
                v = self.in_chunks(len(part), lambda i: torch.stack(
                    [self.policy_velocity(part.select(i), k) for k in steps], dim=1))
            if out is None:
                out = v.new_empty(len(traj), *v.shape[1:])
            out[index.to(out.device)] = v
        return out

    @torch.no_grad()
    def target_velocities(self, traj: rollout.Trajectories, steps: Sequence[int]) -> torch.Tensor:
        """The routed teachers' velocities [B, len(steps), ...] (soft routing: the weighted blend)."""
        if self.cfg.routing == "hard":
            return self.velocities_through(traj, steps, self.route(traj.prompts))
        weights = {t: self.cfg.soft_weights.get(t, 1.0) for t in self.cfg.teachers}
        total = sum(weights.values())
        return sum(w / total * self.velocities_through(traj, steps, [teacher_name(t)] * len(traj))
                   for t, w in weights.items())

    # -- labels: teacher/anchor velocities at the stored states, per-step KLs, advantages
    @property
    def objective(self) -> Objective:
        return OBJECTIVES[self.cfg.objective]

    @property
    def teacher_steps(self) -> int:
        """Steps that get teacher labels: all of them where the objective sums over the whole trajectory."""
        return self.cfg.sde_steps if self.objective.every_step else self.cfg.trained_steps

    @property
    def label_forwards_per_sample(self) -> int:
        return self.teacher_steps + (self.cfg.trained_steps if self.cfg.mar_lambda > 0 else 0)

    def label(self, traj: rollout.Trajectories, update: int):
        cfg = self.cfg
        steps = self.teacher_steps
        v_tgt = self.target_velocities(traj, range(steps))
        labels = {"v_target": v_tgt, "weight": torch.ones(len(traj), device=self.acc.device)}
        kls = torch.stack([step_kl(traj.velocities[:, k], v_tgt[:, k], traj.latents[:, k], traj.sigmas[k],
                                   traj.sigmas[k + 1], cfg.noise_level, cfg.kl_scaling) for k in range(steps)], dim=1)
        if self.objective.advantages is not None:
            labels["advantage"] = self.objective.advantages(kls, traj, v_tgt, cfg)
        if cfg.mar_lambda > 0:
            anchor = None if cfg.anchor == "base" else self.ANCHOR
            labels["v_anchor"] = self.velocities_through(traj, range(cfg.trained_steps), [anchor] * len(traj))
        return labels, self.kl_metrics(traj, kls[:, :cfg.trained_steps])

    def kl_metrics(self, traj: rollout.Trajectories, kls: torch.Tensor) -> dict[str, float]:
        """teacher_kl/<task>: mean per-step KL of the rollout policy to each task's teacher, over
        every process's samples. Iterates over the config's tasks (the same list on every process,
        whatever tasks this one holds) and reduces them all in one collective."""
        tasks = [p.task for p in traj.prompts]
        local = {}
        for task in self.cfg.datasets:
            mask = torch.tensor([t == task for t in tasks], dtype=torch.bool, device=kls.device)
            local[f"{task}/sum"] = kls[mask].sum()
            local[f"{task}/count"] = mask.sum() * kls.shape[1]
        totals = self.dist.sum_named(local, list(local))
        return {f"teacher_kl/{task}": (totals[f"{task}/sum"] / totals[f"{task}/count"]).item()
                for task in self.cfg.datasets if totals[f"{task}/count"] > 0}

    # -- the per-step objective
    def step_loss(self, traj, labels, k, v):
        cfg = self.cfg
        x, s, s_next = traj.latents[:, k], traj.sigmas[k], traj.sigmas[k + 1]
        kl = step_kl(v, labels["v_target"][:, k], x, s, s_next, cfg.noise_level, cfg.kl_scaling)
        metrics, inputs = {"kl": kl.detach()}, {}
        if self.objective.ppo_ratio:
            log_prob = flow.sde_step(v, x, s, s_next, cfg.noise_level, prev_sample=traj.latents[:, k + 1]).log_prob
            old = traj.log_probs[:, k]
            metrics["ratio_dev"] = (log_prob - old).detach().exp().sub(1).abs()
            inputs = {"log_prob": log_prob, "old_log_prob": old, "clip_range": cfg.clip_range}
        if self.objective.advantages is not None:
            inputs["advantage"] = labels["advantage"][:, k]
        loss = self.objective.loss(kl, **inputs)
        if cfg.mar_lambda > 0:
            mar = step_kl(v, labels["v_anchor"][:, k], x, s, s_next, cfg.noise_level, cfg.kl_scaling)
            loss = loss + cfg.mar_lambda * mar
            metrics["mar"] = mar.detach()
        return loss, metrics


def train_opd(cfg: OPDConfig, model: FlowModel | None = None, accelerator=None,
              eval_fn: Callable[[FlowModel], dict] | None = None, resume: bool = True) -> FlowModel:
    """Distil the routed teachers into the student adapter (cfg.adapter, initialised from
    cfg.init_adapter, e.g. a merge); saved to cfg.out_dir/adapter and left attached with its EMA weights."""
    from .models import load_base

    model = model if model is not None else load_base(cfg.base)
    trainer = OPDTrainer(model, cfg, accelerator=accelerator, eval_fn=eval_fn)
    trainer.train(resume=resume)
    trainer.keep_ema_weights()
    return model


__all__ = ["OBJECTIVES", "OPDConfig", "OPDTrainer", "Objective", "group_baseline", "kl_loss", "kl_rtg_advantages",
           "kl_rtg_labels", "logratio_advantages", "logratio_labels", "pg_advantage_loss", "pg_kl_loss", "reward_to_go",
           "step_kl", "train_opd"]
