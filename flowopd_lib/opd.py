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
    mean_match     DiffusionOPD (arXiv 2605.15055): 0.5 ||mu_student - mu_teacher||^2, the squared gap
                   of the two step means with the variance factored out (= std^2 x the KL: the
                   KL's gradient direction at each step, steps re-weighted by std^2); on ODE rollouts
                   (`rollout: ode`) the means are the Euler steps, 0.5 dt^2 ||v_student - v_teacher||^2
    no_teacher     the no-teacher control ("Does On-Policy Distillation Really Distill?", arXiv
                   2608.31046): clipped PG with one fixed negative advantage for every sampled action
                   in place of the teacher's signal; no teacher forward at all, so what it gains is
                   not the teacher's

plus MAR: lambda * w(s) ||v_student - v_anchor||^2 on every sample (anchor = the base or an adapter).
Two settings apply to the objectives that label only the trained steps: `rollout` ('sde', or 'ode':
deterministic student trajectories, for the objectives without a PPO ratio) and `supervised_steps`
(DanceOPD, arXiv 2606.27377: teacher labels and loss terms at a subset of the trained steps, e.g. one
low-noise step, 'last:1'; default 'all').
Every objective is a pure function below, shape-documented and unit-tested, and one entry of the
registry `OBJECTIVES` (name -> `Objective`: that loss and what the trainer must compute for it: teacher
labels at every SDE step, only the supervised ones, or none; the sampled action's PPO ratio; the
step-mean gap; per-step advantages at labelling). The trainer consults the registry; it never compares
objective names.
"""
from __future__ import annotations

import dataclasses
import functools
import re
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


def mean_weight(sigma, sigma_next, noise_level: float) -> torch.Tensor:
    """`m(s)` such that 0.5 ||mu_a - mu_b||^2 = m(s) ||v_a - v_b||^2 for the step means of two velocities
    at one state: the means differ by (1 + sig^2 (1 - s) / (2 s)) dt (v_a - v_b), so

        m(s) = dt^2 / 2 * (1 + sig^2 (1 - s) / (2 s))^2        (noise_level 0, the ODE's Euler step: dt^2 / 2)

    Both steps have the variance std^2 = sig^2 |dt|, so m(s) = std^2 * flow.kl_weight. Below s = 1,
    sig^2 (1 - s) / (2 s) = a^2 / 2 whatever s: m(s) = dt^2 (1 + a^2/2)^2 / 2. Shaped like sigma."""
    s = torch.as_tensor(sigma, dtype=torch.float32)
    s_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=s.device)
    sig = flow.sde_sigma(s, s_next, noise_level)
    return (s_next - s) ** 2 / 2 * (1 + sig ** 2 * (1 - s) / (2 * s)) ** 2


def mean_matching(v: torch.Tensor, v_target: torch.Tensor, x: torch.Tensor, sigma, sigma_next,
                  noise_level: float) -> torch.Tensor:
    """DiffusionOPD's per-step mean matching [B] at states x [B, ...] (velocities shaped like x, sigma a
    scalar or [B]): 0.5 ||mu(v) - mu(v_target)||^2 summed over dimensions, mu the mean of the step at
    `noise_level` (0: the ODE's Euler step x + dt v) = `mean_weight` * ||v - v_target||^2."""
    if v.shape != x.shape or v_target.shape != x.shape:
        raise ValueError(f"velocity shapes {tuple(v.shape)}, {tuple(v_target.shape)} must equal x's {tuple(x.shape)}")
    m = mean_weight(sigma, sigma_next, noise_level).to(x.device)
    m = m.view(-1, *([1] * (x.ndim - 1))) if m.ndim else m
    return (m * (v.float() - v_target.float()) ** 2).flatten(1).sum(1)


def mean_match_loss(kl: torch.Tensor, mean_gap: torch.Tensor) -> torch.Tensor:
    """`mean_match`: minimise the step-mean gap [B] (`mean_matching`) directly; the KL [B] is only reported."""
    return mean_gap


def fixed_advantages(batch: int, steps: int, value: float) -> torch.Tensor:
    """Advantages [B, T] of `no_teacher`: `value` (< 0) for every sample and step, whatever the teacher."""
    return torch.full((batch, steps), float(value))


def no_teacher_loss(kl: torch.Tensor | None, log_prob: torch.Tensor, old_log_prob: torch.Tensor, clip_range: float,
                    advantage: torch.Tensor) -> torch.Tensor:
    """`no_teacher`: PPO-clipped ratio [B] of the sampled action with the fixed advantage [B]
    (`fixed_advantages`); `kl` is None (no teacher labels) and unused either way."""
    return ppo_clip_loss(log_prob, old_log_prob, advantage, clip_range)[0]


SUPERVISED_STEPS = re.compile(r"(first|last|one):(-?[0-9]+)")


def supervised_step_indices(spec: str, trained_steps: int) -> list[int]:
    """The trained steps (indices < trained_steps) that get teacher labels and a loss term:
    'all'; 'first:k' / 'last:k', the k highest- / lowest-noise ones; 'one:i', step i alone (a negative
    i counts from the last). A ValueError names the value and the forms."""
    n = trained_steps
    forms = (f"use 'all', 'first:k', 'last:k' (1 <= k <= {n}, the trained steps) or 'one:i' "
             f"(0 <= i < {n}; a negative i counts from the last)")
    if spec == "all":
        return list(range(n))
    match = SUPERVISED_STEPS.fullmatch(spec)
    if match is None:
        raise ValueError(f"supervised_steps={spec!r} is none of the forms: {forms}")
    kind, k = match.group(1), int(match.group(2))
    if kind == "first" and 1 <= k <= n:
        return list(range(k))
    if kind == "last" and 1 <= k <= n:
        return list(range(n - k, n))
    if kind == "one" and -n <= k < n:
        return [k % n]
    raise ValueError(f"supervised_steps={spec!r} is out of range for {n} trained steps: {forms}")


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


def fixed_advantage_labels(kls: None, traj: rollout.Trajectories, v_target: None, cfg) -> torch.Tensor:
    """`no_teacher`'s advantages [B, T], T the supervised steps: cfg.fixed_advantage everywhere (no
    teacher labels: kls and v_target are None)."""
    steps = len(supervised_step_indices(cfg.supervised_steps, cfg.trained_steps))
    return fixed_advantages(len(traj), steps, cfg.fixed_advantage).to(traj.latents.device)


@dataclasses.dataclass(frozen=True)
class Objective:
    """One OPD objective: the pure per-step loss [B] it minimises and what the trainer computes for it.

    `loss(kl, **inputs)` gets the step KL [B] (None where not `teacher`) and, where `ppo_ratio`,
    log_prob, old_log_prob (the sampled action's log-prob now and at rollout) and clip_range; where
    `mean_gap`, mean_gap [B] (`mean_matching` at the rollout's noise level); where `advantages`, also
    the step's advantage [B] from labels["advantage"], which `advantages(kls, traj, v_target, cfg)`
    computes once per update from the labelled steps' KLs [B, T] and teacher velocities (both None
    where not `teacher`)."""
    loss: Callable[..., torch.Tensor]
    every_step: bool = False  # teacher labels at every SDE step, not only the trained ones (scores the
                              # whole trajectory, so it needs SDE steps throughout)
    ppo_ratio: bool = False   # uses the PPO likelihood ratio of the sampled action
    advantages: Callable[..., torch.Tensor] | None = None  # per-step advantages [B, T] at labelling
    mean_gap: bool = False    # uses the squared gap of the student's and the teacher's step means
    teacher: bool = True      # uses the teachers' velocities; False: a no-teacher control (no teacher forward)

    def __post_init__(self):
        if self.advantages is not None and not self.ppo_ratio:
            raise ValueError("an objective with advantages needs ppo_ratio: advantages weigh the PPO ratio")
        if not self.teacher and (self.every_step or self.mean_gap):
            raise ValueError("an objective without teacher labels can neither label every step nor match the "
                             "teacher's step means")


OBJECTIVES: dict[str, Objective] = {
    "kl": Objective(kl_loss),
    "kl_rtg": Objective(functools.partial(pg_advantage_loss, add_kl=True), every_step=True, ppo_ratio=True,
                        advantages=kl_rtg_labels),
    "pg_undetached": Objective(functools.partial(pg_kl_loss, detach=False), ppo_ratio=True),
    "pg_detached": Objective(functools.partial(pg_kl_loss, detach=True), ppo_ratio=True),
    "pg_logratio": Objective(functools.partial(pg_advantage_loss, add_kl=False), every_step=True, ppo_ratio=True,
                             advantages=logratio_labels),
    "mean_match": Objective(mean_match_loss, mean_gap=True),
    "no_teacher": Objective(no_teacher_loss, ppo_ratio=True, advantages=fixed_advantage_labels, teacher=False),
}


# The on-policy distillation methods side by side (docs/method.md section 8), each a set of OPDConfig
# settings on this one loop: notebook 04's `method` and papermill_runs/dial_opd_methods.yaml name them.
METHODS: dict[str, dict] = {
    "flow_opd": {"objective": "kl"},                            # the direct per-step KL (what the released code trains)
    "flow_opd_paper": {"objective": "pg_detached"},             # the paper's text: PG on the detached KL
    "flow_opd_released": {"objective": "pg_undetached"},        # the released code's loss, as written
    "diffusion_opd_sde": {"objective": "mean_match", "rollout": "sde"},  # DiffusionOPD: step-mean matching
    "diffusion_opd_ode": {"objective": "mean_match", "rollout": "ode"},  # ... on deterministic rollouts
    "dance_opd": {"objective": "kl", "supervised_steps": "last:1"},     # DanceOPD: one low-noise step
    "no_teacher": {"objective": "no_teacher"},                  # the control: a fixed negative advantage
}


def method_settings(method: str | None, settings: dict, extra: dict | None = None) -> dict:
    """`settings` (field -> value, None: the default) with a named method's fields (METHODS) set; a
    field the settings or `extra` also give with another value is a ConfigError naming both."""
    if method is None:
        return settings
    if method not in METHODS:
        raise ConfigError(f"method={method!r}: the methods are {sorted(METHODS)} (None: objective, rollout and "
                          f"supervised_steps as given)")
    given = {**{k: v for k, v in settings.items() if v is not None}, **(extra or {})}
    clash = {k: (given[k], v) for k, v in METHODS[method].items() if k in given and given[k] != v}
    if clash:
        raise ConfigError(f"method={method!r} sets " + ", ".join(f"{k}={v!r}" for k, (_, v) in clash.items())
                          + " but the parameters give " + ", ".join(f"{k}={g!r}" for k, (g, _) in clash.items())
                          + ": drop one of the two")
    return {**settings, **METHODS[method]}


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
    rollout: str = param("sde", "trajectories the student samples: 'sde' (Flow-OPD) or 'ode', deterministic Euler "
                         "steps (DiffusionOPD's default), which have no log-probability: only for objectives "
                         "without a PPO ratio ('kl', 'mean_match')", choices=("sde", "ode"))
    supervised_steps: str = param("all", "the trained steps that get teacher labels and a loss term: 'all', "
                                  "'first:k', 'last:k' or 'one:i' (DanceOPD supervises one low-noise step: 'last:1')")
    fixed_advantage: float = param(-1.0, "objective 'no_teacher': the advantage of every sampled action (the "
                                   "no-teacher control; negative pushes the sampled actions down)", range=(None, 0))
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
        objective = OBJECTIVES[self.objective]
        try:
            supervised = supervised_step_indices(self.supervised_steps, self.trained_steps)
        except ValueError as e:
            raise ConfigError(f"{type(self).__name__}.{e}") from None
        if objective.every_step and supervised != list(range(self.trained_steps)):
            raise ConfigError(f"objective={self.objective!r} scores every step of the trajectory, so it supervises "
                              f"every trained step: set supervised_steps='all' (not {self.supervised_steps!r}) or use "
                              "objective 'kl' or 'mean_match'")
        if self.rollout == "ode" and (objective.ppo_ratio or objective.every_step):
            raise ConfigError(f"rollout='ode' samples deterministic steps, which have no log-probability, and "
                              f"objective={self.objective!r} needs the PPO ratio of sampled SDE steps: use objective "
                              "'kl' or 'mean_match', or rollout='sde'")

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

    # -- rollout: SDE trajectories (the shared loop's), or deterministic ones
    def sample_chunk(self, prompts: list, seeds: list[int], initial_seeds: list[int] | None):
        """`rollout: sde`: the shared loop's SDE trajectories; `ode`: every step the Euler step of the
        student's velocity (log-probs NaN: a deterministic step has no density)."""
        cfg = self.cfg
        if cfg.rollout == "sde":
            return super().sample_chunk(prompts, seeds, initial_seeds)
        return rollout.sample_trajectories(self.model, prompts, seeds, cfg.sde_steps, cfg.noise_level, cfg.cfg_scale,
                                           cfg.shift, self.decode_rollouts, initial_seeds, sde_until=0)

    # -- labels: teacher/anchor velocities at the stored states, per-step KLs, advantages
    @property
    def objective(self) -> Objective:
        return OBJECTIVES[self.cfg.objective]

    @property
    def loss_steps(self) -> list[int]:
        """The trained steps with a loss term, MAR's included (`supervised_steps`; all by default): the
        shared loop averages the update's loss and metrics over them."""
        return supervised_step_indices(self.cfg.supervised_steps, self.cfg.trained_steps)

    @property
    def labelled_steps(self) -> list[int]:
        """Steps that get teacher labels: every SDE step where the objective sums over the whole
        trajectory (which supervises every trained step), else the supervised ones. Column j of the
        labels is step labelled_steps[j]; a supervised step k is column loss_steps.index(k) in both cases."""
        return list(range(self.cfg.sde_steps)) if self.objective.every_step else self.loss_steps

    @property
    def teacher_steps(self) -> int:
        """How many steps get teacher labels (none for a no-teacher control)."""
        return len(self.labelled_steps) if self.objective.teacher else 0

    @property
    def label_forwards_per_sample(self) -> int:
        return self.teacher_steps + (len(self.loss_steps) if self.cfg.mar_lambda > 0 else 0)

    def label(self, traj: rollout.Trajectories, update: int):
        cfg = self.cfg
        steps = self.labelled_steps
        labels, kls, v_tgt = {}, None, None
        if self.objective.teacher:
            v_tgt = labels["v_target"] = self.target_velocities(traj, steps)
            kls = torch.stack([step_kl(traj.velocities[:, k], v_tgt[:, j], traj.latents[:, k], traj.sigmas[k],
                                       traj.sigmas[k + 1], cfg.noise_level, cfg.kl_scaling)
                               for j, k in enumerate(steps)], dim=1)
        labels["weight"] = torch.ones(len(traj), device=self.acc.device)
        if self.objective.advantages is not None:
            labels["advantage"] = self.objective.advantages(kls, traj, v_tgt, cfg)
        if cfg.mar_lambda > 0:
            anchor = None if cfg.anchor == "base" else self.ANCHOR
            labels["v_anchor"] = self.velocities_through(traj, self.loss_steps, [anchor] * len(traj))
        return labels, ({} if kls is None else self.kl_metrics(traj, kls[:, :len(self.loss_steps)]))

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
        j = self.loss_steps.index(k)  # the column of step k in the labels
        metrics, inputs, kl = {}, {}, None
        if self.objective.teacher:
            kl = step_kl(v, labels["v_target"][:, j], x, s, s_next, cfg.noise_level, cfg.kl_scaling)
            metrics["kl"] = kl.detach()
        if self.objective.mean_gap:
            level = 0.0 if cfg.rollout == "ode" else cfg.noise_level  # the step the rollout took
            inputs["mean_gap"] = mean_matching(v, labels["v_target"][:, j], x, s, s_next, level)
            metrics["mean_gap"] = inputs["mean_gap"].detach()
        if self.objective.ppo_ratio:
            log_prob = flow.sde_step(v, x, s, s_next, cfg.noise_level, prev_sample=traj.latents[:, k + 1]).log_prob
            old = traj.log_probs[:, k]
            metrics["ratio_dev"] = (log_prob - old).detach().exp().sub(1).abs()
            inputs = {"log_prob": log_prob, "old_log_prob": old, "clip_range": cfg.clip_range}
        if self.objective.advantages is not None:
            inputs["advantage"] = labels["advantage"][:, j]
        loss = self.objective.loss(kl, **inputs)
        if cfg.mar_lambda > 0:
            mar = step_kl(v, labels["v_anchor"][:, j], x, s, s_next, cfg.noise_level, cfg.kl_scaling)
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


__all__ = ["OBJECTIVES", "OPDConfig", "OPDTrainer", "Objective", "fixed_advantage_labels", "fixed_advantages",
           "group_baseline", "kl_loss", "kl_rtg_advantages", "kl_rtg_labels", "logratio_advantages", "logratio_labels",
           "mean_match_loss", "mean_matching", "mean_weight", "METHODS", "method_settings", "no_teacher_loss", "pg_advantage_loss", "pg_kl_loss",
           "reward_to_go", "step_kl", "supervised_step_indices", "train_opd"]
