"""Stage 0: Flow-GRPO teachers (one reward each) and the GRPO-Mix baseline (several rewards).

docs/method.md section 3. Per update: G SDE trajectories per prompt, a terminal reward per trajectory
(weighted sum of the named rewards that can judge the prompt's task), group-normalised advantages
(groups without spread carry no signal and are dropped), then a PPO-clipped surrogate on each
trained step's likelihood ratio plus beta * KL to the reference (the base: adapters disabled).

    cfg = GRPOConfig(rewards={"geneval": 1.0}, datasets={"geneval": 1.0}, adapter="geneval")
    model = train_grpo(cfg)            # the trained adapter is saved to cfg.out_dir/adapter

The loss pieces are pure functions, tested on hand-made cases (`losses.py`: group advantages and
the PPO surrogate, shared with AWM and Flow-OPD; here: the multi-reward sum); the loop is `trainer.py`'s.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from . import adapters, flow, rewards, rollout
from .config import ConfigError, param
from .losses import group_advantages, ppo_clip_loss
from .models.base import FlowModel
from .trainer import NonFiniteError, OnPolicyConfig, OnPolicyTrainer, describe_sample


# ----------------------------------------------------------------------------- pure pieces

@dataclasses.dataclass
class RewardValues:
    """One reward's values on a batch: `values` [B] (0 where it does not judge the sample) and
    `judged` [B] bool. 'Not judged' is this mask, never a NaN: a NaN is a reward's (bad) value."""
    values: torch.Tensor
    judged: torch.Tensor

    def mean(self) -> float:
        """Mean over the judged samples (NaN when none is judged: a metric, not a training value)."""
        return self.values[self.judged].float().mean().item() if self.judged.any() else float("nan")

    @staticmethod
    def cat(parts: list["RewardValues"]) -> "RewardValues":
        return RewardValues(torch.cat([p.values for p in parts]), torch.cat([p.judged for p in parts]))


def combined_rewards(images: torch.Tensor, prompts: list, weights: dict[str, float],
                     task_rewards: dict[str, str] | None = None) -> tuple[torch.Tensor, dict[str, RewardValues]]:
    """Total reward [B] = sum of weight * reward over the rewards that judge each prompt's task
    (with `task_rewards`, a map task -> reward name, only the prompt's own task's reward), and each
    reward's values and judged mask. Values are passed on as the rewards return them (a NaN stays a
    NaN in the total: the trainer stops on it, naming the reward)."""
    total = torch.zeros(len(prompts))
    per_name = {}
    for name, weight in weights.items():
        values, judged = torch.zeros(len(prompts)), torch.zeros(len(prompts), dtype=torch.bool)
        index = [i for i, p in enumerate(prompts)
                 if (task_rewards.get(p.task) == name if task_rewards else rewards.judges(name, p.task))]
        if index:
            scored = rewards.score(name, images[index], [prompts[i] for i in index])["reward"].float().cpu()
            values[index], judged[index] = scored, True
            total[index] += weight * scored
        per_name[name] = RewardValues(values, judged)
    judged_any = torch.stack([r.judged for r in per_name.values()]).any(dim=0)
    if not judged_any.all():
        task = prompts[int((~judged_any).nonzero()[0])].task
        raise ValueError(f"no reward in {list(weights)} judges prompts of task {task!r}; add one that does")
    return total, per_name


# ----------------------------------------------------------------------------- trainer

@dataclasses.dataclass
class GRPOConfig(OnPolicyConfig):
    adapter: str = param("teacher", "name of the trained LoRA adapter")
    rewards: dict[str, float] = param(None, "reward name -> weight (one name for a teacher, several for GRPO-Mix)",
                          default_factory=lambda: {"geneval": 1.0})
    reward_routing: str = param("all", "'all': each prompt gets the weighted sum of every reward that can judge it "
                                "(Flow-GRPO's multi-reward); 'task': only its task's reward (task_rewards) "
                                "(with dataset_mode='alternate': Flow-OPD's GRPO-Mix schedule)", choices=("all", "task"))
    std_mode: str = param("global", "advantage std over the whole batch (Flow-GRPO) or per group",
                          choices=("global", "group"))
    advantage_clip: float = param(5.0, "advantages are clipped to +-this", range=(0, None))
    clip_range: float = param(1e-4, "PPO ratio clip (tiny: log-probs are averaged over dimensions)", range=(0, 1))
    beta: float = param(0.04, "weight of the KL to the reference (the base, adapters off)", range=(0, None))
    out_dir: str = param("runs/teacher", "run directory (adapter/, checkpoints/, metrics.csv)")

    def check(self) -> None:
        super().check()
        unknown = [r for r in self.rewards if r not in rewards.available()]
        if unknown:
            raise ConfigError(f"rewards has unknown name(s) {unknown}; available: {rewards.available()}")
        unjudged = [task for task in self.datasets if not self.judging_rewards(task)]
        if unjudged:
            how = (f"task_rewards names {[self.task_rewards.get(t) for t in unjudged]} for them"
                   if self.reward_routing == "task" else "none of them can judge those prompts")
            raise ConfigError(f"{type(self).__name__}: no reward in rewards={self.rewards} judges the prompts of "
                              f"task(s) {unjudged} in datasets ({how}); add a reward that does, or drop the task "
                              "from datasets")

    def judging_rewards(self, task: str) -> list[str]:
        """The rewards that judge the prompts of `task` (with reward_routing 'task': its task_rewards entry)."""
        if self.reward_routing == "task":
            return [r for r in self.rewards if r == self.task_rewards.get(task)]
        return [r for r in self.rewards if rewards.judges(r, task)]


class GRPOTrainer(OnPolicyTrainer):
    cfg: GRPOConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reward_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")  # in order, one at a time
        self.pending: list[Future] = []

    @property
    def label_forwards_per_sample(self) -> int:
        return self.cfg.trained_steps if self.cfg.beta > 0 else 0  # reference velocities for the KL

    def score(self, part: rollout.Trajectories) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        routing = self.cfg.task_rewards if self.cfg.reward_routing == "task" else None
        return combined_rewards(part.images.detach(), part.prompts, self.cfg.rewards, routing)

    def sampled(self, part: rollout.Trajectories) -> None:
        self.pending.append(self.reward_worker.submit(self.score, part))

    def rewards_of(self, traj: rollout.Trajectories) -> tuple[torch.Tensor, dict[str, RewardValues]]:
        """Rewards [B] of `traj`: the sub-batches scored on the worker thread while `rollout`
        sampled it, in order (or scored now, for trajectories that did not come from `rollout`)."""
        if not self.pending:
            return self.score(traj)
        results, self.pending = [f.result() for f in self.pending], []
        total = torch.cat([t for t, _ in results])
        if len(total) != len(traj):
            raise RuntimeError(f"{len(total)} scored samples for a rollout of {len(traj)}: label() must follow rollout()")
        return total, {name: RewardValues.cat([per_name[name] for _, per_name in results]) for name in results[0][1]}

    def label(self, traj: rollout.Trajectories, update: int):
        labels, metrics = self.reward_labels(traj, update)
        if self.cfg.beta > 0:
            labels["v_ref"] = self.reference_velocities(traj)
        return labels, metrics

    def reward_labels(self, traj, update: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Group advantages [B] and keep weights [B] of the local samples, and reward metrics
        (shared by every reward-driven trainer: GRPO here, DiffusionNFT and AWM in forward_rl.py).
        A non-finite reward raises NonFiniteError (trainer.py) naming the reward and the prompt."""
        cfg, acc = self.cfg, self.acc
        total, per_name = self.rewards_of(traj)
        all_rewards = self.gathered(total)
        per_name = {name: RewardValues(self.gathered(r.values), self.gathered(r.judged.to(torch.uint8)).bool())
                    for name, r in per_name.items()}
        self.check_rewards(traj, all_rewards, per_name, update)
        adv, keep = group_advantages(all_rewards.cpu(), cfg.group_size, cfg.std_mode, cfg.advantage_clip)
        block = self.local_block(len(all_rewards))
        labels = {"advantage": adv[block].to(acc.device), "weight": keep[block].float().to(acc.device)}
        metrics = {"reward": all_rewards.float().mean().item(), "reward_std": all_rewards.float().std().item(),
                   "zero_spread_fraction": 1 - keep.float().mean().item(),
                   "advantage_abs": adv[keep].abs().mean().item() if keep.any() else 0.0}
        metrics.update({f"reward/{name}": r.mean() for name, r in per_name.items()})
        return labels, metrics

    def gathered(self, local: torch.Tensor) -> torch.Tensor:
        """Every process's [B] values, in process order, on the CPU (the local ones alone on one)."""
        return self.dist.gather(local).cpu()

    def check_rewards(self, traj, total: torch.Tensor, per_name: dict[str, RewardValues], update: int | None) -> None:
        """Stop before any training on a NaN or inf reward of a judged sample (all processes hold the
        gathered rewards, so all decide alike). Naming the prompt needs the other processes' prompts."""
        named = [(f"reward {name!r}", r.values, r.judged & ~torch.isfinite(r.values)) for name, r in per_name.items()]
        named.append(("the weighted total reward", total, ~torch.isfinite(total)))  # e.g. an overflowing sum
        found = next(((what, values, bad) for what, values, bad in named if bad.any()), None)
        if found is None:
            return
        what, values, bad = found
        i = int(bad.nonzero()[0])
        # every process gets here (same gathered rewards): a collective all of them join
        prompts = self.dist.gather_objects(list(traj.prompts))
        value = values[i].item()
        raise NonFiniteError(f"{what} is {value} for sample {i} of the update, {describe_sample(prompts[i])}, "
                             f"at {self.where(update)}; a reward must return finite values for every prompt "
                             "it judges")

    @torch.no_grad()
    def reference_velocities(self, traj: rollout.Trajectories) -> torch.Tensor:
        """[B, K, C, h, w] velocities of the base (adapters off) at the trained steps' states; fixed
        during the update, so computed once and reused by every minibatch and inner epoch."""
        with adapters.active(self.model, None):
            return self.in_chunks(len(traj), lambda i: torch.stack(
                [self.policy_velocity(traj.select(i), k) for k in range(self.cfg.trained_steps)], dim=1))

    def step_loss(self, traj, labels, k, v):
        cfg = self.cfg
        x, x_next = traj.latents[:, k], traj.latents[:, k + 1]
        s, s_next = traj.sigmas[k], traj.sigmas[k + 1]
        step = flow.sde_step(v, x, s, s_next, cfg.noise_level, prev_sample=x_next)
        loss, clipped, approx_kl = ppo_clip_loss(step.log_prob, traj.log_probs[:, k], labels["advantage"],
                                                 cfg.clip_range)
        metrics = {"clip_fraction": clipped, "approx_kl": approx_kl,
                   "ratio_dev": (step.log_prob - traj.log_probs[:, k]).detach().exp().sub(1).abs()}
        if cfg.beta > 0:
            # Flow-GRPO's scale: the step KL averaged over dimensions (what beta = 0.04 assumes).
            kl = flow.step_kl(v, labels["v_ref"][:, k], x, s, s_next, cfg.noise_level) / x[0].numel()
            loss = loss + cfg.beta * kl
            metrics["kl_ref"] = kl.detach()
        return loss, metrics


def train_grpo(cfg: GRPOConfig, model: FlowModel | None = None, accelerator=None,
               eval_fn: Callable[[FlowModel], dict] | None = None, resume: bool = True) -> FlowModel:
    """Train one GRPO adapter on `model` (default: the base named by cfg.base) into cfg.out_dir;
    the EMA adapter is saved to out_dir/adapter and left attached (active) on the returned model."""
    from .models import load_base

    model = model if model is not None else load_base(cfg.base)
    trainer = GRPOTrainer(model, cfg, accelerator=accelerator, eval_fn=eval_fn)
    trainer.train(resume=resume)
    trainer.keep_ema_weights()
    return model
