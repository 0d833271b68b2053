"""Stage 0 on the forward process: what DiffusionNFT (`nft.py`) and AWM (`awm.py`) share.

Flow-GRPO (`grpo.py`) scores SDE trajectories step by step. These trainers only need each
rollout's final sample: they re-noise it, `x_s = (1 - s) x_0 + s eps`, at fresh noise and fresh
noise levels, and train the velocity there with a reward-weighted flow-matching objective. So:

    rollout  any solver (Euler ODE by default, or the SDE), only x_0 kept (`rollout.FinalSamples`)
    label    group-normalised rewards (GRPO's `reward_labels`), J (sigma, eps) pairs per sample drawn
             from the sample's own seed, and the frozen velocities the loss compares with at those
             points: the sampling policy's (`v_old`) and, with a KL, the base's (`v_ref`)
    train    J terms per sample (`loss_terms`), each the subclass's `term_loss` at one (sigma, eps)

Everything else (prompt schedule, sharding, minibatches, clipping, EMA, checkpoints, the guidance
protocol `cfg_scale` for rollouts and training alike) is `trainer.py`'s loop.
"""
from __future__ import annotations

import dataclasses

import torch

from . import adapters, flow, rollout
from .config import ConfigError, param
from .grpo import GRPOConfig, GRPOTrainer


@dataclasses.dataclass
class ForwardRLConfig(GRPOConfig):
    solver: str = param("ode", "rollout sampler: 'ode' (Euler, deterministic: DiffusionNFT's CFG-free default) "
                        "or 'sde' (Flow-GRPO's SDE at noise_level)", choices=("ode", "sde"))
    train_timesteps: int = param(10, "training terms per sample: noise levels drawn stratified in (0, 1) "
                                 "(then shifted by `shift`), each with fresh noise", range=(1, None))
    minibatches: int = param(1, "optimizer steps per inner epoch (DiffusionNFT: 1 for GenEval, 2 for OCR)",
                             range=(1, None))
    beta: float = param(1e-4, "weight of the KL to the base, mean over dimensions of ||v - v_ref||^2 "
                        "(DiffusionNFT 1e-4, AWM 1e-3)", range=(0, None))
    lr: float = param(3e-4, "AdamW learning rate (both official repos: 3e-4 at LoRA rank 32 on SD3.5-M)",
                      range=(0, 1))

    @property
    def trained_steps(self) -> int:
        """Loss terms per sample (the trainer normalises by it): the training noise levels."""
        return self.train_timesteps


class ForwardRLTrainer(GRPOTrainer):
    """Subclasses set `frozen_adapters` and implement `term_loss`."""

    cfg: ForwardRLConfig

    def frozen_adapters(self) -> dict[str, str | None]:
        """Label name -> the adapter (None = base) whose velocity the loss needs at the training points."""
        return {"v_ref": None} if self.cfg.beta > 0 else {}

    def term_loss(self, part: rollout.FinalSamples, labels: dict[str, torch.Tensor], j: int, v: torch.Tensor,
                  x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Loss [b] and per-sample metrics [b] of training term j, given the trained velocity v
        (with grad) at x_s = (1 - sigma) x0 + sigma noise."""
        raise NotImplementedError

    # ------------------------------------------------------------------ rollout: final samples only
    def sample_chunk(self, prompts, seeds, initial_seeds):
        cfg = self.cfg
        return rollout.sample_final(self.model, prompts, seeds, cfg.sde_steps,
                                    cfg.noise_level if cfg.solver == "sde" else 0.0, cfg.cfg_scale, cfg.shift,
                                    decode=True, initial_seeds=initial_seeds)

    # ------------------------------------------------------------------ labels
    def training_points(self, samples: rollout.FinalSamples) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise levels [B, J] and noise [B, J, C, h, w], each sample's from its own seed (so they do
        not depend on the batch split): J levels stratified in (0, 1) in random order, shifted."""
        j, shape = self.cfg.train_timesteps, samples.latents.shape[1:]
        sigmas, noises = [], []
        for seed in samples.seeds.tolist():
            g = torch.Generator().manual_seed(int(seed) ^ 0x5EED)
            u = (torch.randperm(j, generator=g) + torch.rand(j, generator=g)) / j
            sigmas.append(flow.shift_sigmas(u, self.cfg.shift).clamp(1e-3, 1.0))
            noises.append(torch.randn(j, *shape, generator=g))
        device = samples.latents.device
        return torch.stack(sigmas).to(device), torch.stack(noises).to(device, samples.latents.dtype)

    def velocity_at(self, part: rollout.FinalSamples, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return rollout.guided_velocity(self.model, x, sigma, part.cond, part.uncond, self.cfg.cfg_scale)

    @staticmethod
    def noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.view(-1, *([1] * (x0.ndim - 1)))
        return (1 - s) * x0 + s * noise

    @torch.no_grad()
    def label(self, samples: rollout.FinalSamples, update: int):
        labels, metrics = self.reward_labels(samples)
        labels["sigma"], labels["noise"] = self.training_points(samples)
        sigma, noise = labels["sigma"], labels["noise"]

        def velocities(i: torch.Tensor) -> torch.Tensor:  # [b, J, ...] of the samples at index i
            part = samples.select(i)
            return torch.stack([self.velocity_at(part, self.noised(part.latents, noise[i, j], sigma[i, j]), sigma[i, j])
                                for j in range(self.cfg.train_timesteps)], dim=1)

        for key, adapter in self.frozen_adapters().items():
            with adapters.active(self.model, adapter):
                labels[key] = self.in_chunks(len(samples), velocities)
        return labels, metrics

    # ------------------------------------------------------------------ training terms
    def loss_terms(self, part, labels):
        x0 = part.latents
        for j in range(self.cfg.train_timesteps):
            sigma, noise = labels["sigma"][:, j], labels["noise"][:, j]
            v = self.velocity_at(part, self.noised(x0, noise, sigma), sigma)
            loss, metrics = self.term_loss(part, labels, j, v, x0, noise, sigma)
            if self.cfg.beta > 0:
                kl = (v.float() - labels["v_ref"][:, j].float()).pow(2).flatten(1).mean(dim=1)
                loss = loss + self.cfg.beta * kl
                metrics["kl_ref"] = kl.detach()
            yield loss, metrics

    def policy_velocity(self, traj, k):
        raise ConfigError("forward-process trainers train at fresh noise, not at stored SDE states")
