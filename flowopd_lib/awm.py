"""Stage 0 with Advantage Weighted Matching (AWM, Xue et al. 2025, arXiv 2509.25050): policy
gradient whose "log-likelihood" is the flow-matching loss itself, a teacher trainer beside Flow-GRPO.

At a re-noised point x_s = (1 - s) x0 + s eps of a rollout sample, AWM scores the policy by
`log p = -w(s) mean ||v_theta(x_s) - (eps - x0)||^2` and takes PPO's clipped surrogate of the ratio
`exp(log p - log p_old)` against the sample's group advantage, plus a KL to the base:

    L = max(-A rho, -A clip(rho, 1 - eps_clip, 1 + eps_clip)) + beta mean ||v_theta - v_ref||^2

On-policy (rho = 1) its gradient is the advantage-weighted flow-matching gradient
`A grad w(s) ||v - (eps - x0)||^2`: good samples are fitted, bad ones pushed away. The AWM code's
defaults: clip range 1 (so the clip rarely binds), beta 1e-3, 6 training noise levels, lr 3e-4.

    cfg = AWMConfig(rewards={"ocr": 1.0}, datasets={"ocr": 1.0}, adapter="ocr")
    model = train_awm(cfg)
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .config import param
from .forward_rl import ForwardRLConfig, ForwardRLTrainer
from .losses import ppo_clip_loss
from .models.base import FlowModel


def fm_log_prob(v: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                weighting: str = "uniform") -> torch.Tensor:
    """AWM's log-likelihood surrogate [B]: -w(s) mean ||v - (eps - x0)||^2; w = 1 ('uniform') or s ('sigma')."""
    log_p = -(v.float() - (noise.float() - x0.float())).pow(2).flatten(1).mean(dim=1)
    if weighting == "sigma":
        return log_p * sigma.float()
    if weighting != "uniform":
        raise ValueError(f"weighting={weighting!r}: use 'uniform' or 'sigma'")
    return log_p


def awm_loss(v: torch.Tensor, v_old: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
             advantage: torch.Tensor, clip_range: float = 1.0, weighting: str = "uniform"
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AWM's clipped surrogate per sample [B] and metrics [B] (module docstring).

    v (with grad), v_old (the sampling policy's, frozen), x0, noise: [B, ...]; sigma, advantage: [B]."""
    log_p = fm_log_prob(v, x0, noise, sigma, weighting)
    old_log_p = fm_log_prob(v_old.detach(), x0, noise, sigma, weighting)
    loss, clipped, approx_kl = ppo_clip_loss(log_p, old_log_p, advantage.float(), clip_range)
    return loss, {"clip_fraction": clipped, "approx_kl": approx_kl, "fm_error": -log_p.detach()}


@dataclasses.dataclass
class AWMConfig(ForwardRLConfig):
    clip_range: float = param(1.0, "PPO ratio clip of the flow-matching likelihood ratio (AWM: 1)", range=(0, None))
    train_timesteps: int = param(6, "training terms per sample (AWM: 6)", range=(1, None))
    beta: float = param(1e-3, "weight of the KL to the base, mean over dimensions of ||v - v_ref||^2 (AWM 1e-3)",
                        range=(0, None))
    weighting: str = param("uniform", "per-noise-level weight of the log-likelihood: 'uniform' or 'sigma'",
                           choices=("uniform", "sigma"))
    out_dir: str = param("runs/teacher_awm", "run directory (adapter/, checkpoints/, metrics.csv)")


class AWMTrainer(ForwardRLTrainer):
    """On-policy: rollouts from the trained adapter; `v_old` is its velocity before the update."""

    cfg: AWMConfig

    @property
    def label_forwards_per_sample(self) -> int:
        return self.cfg.train_timesteps * (2 if self.cfg.beta > 0 else 1)

    def frozen_adapters(self):
        return {"v_old": self.cfg.adapter, **super().frozen_adapters()}

    def term_loss(self, part, labels, j, v, x0, noise, sigma):
        return awm_loss(v, labels["v_old"][:, j], x0, noise, sigma, labels["advantage"], self.cfg.clip_range,
                        self.cfg.weighting)


def train_awm(cfg: AWMConfig, model: FlowModel | None = None, accelerator=None,
              eval_fn: Callable[[FlowModel], dict] | None = None, resume: bool = True) -> FlowModel:
    """Train one AWM adapter into cfg.out_dir (as `grpo.train_grpo`)."""
    from .models import load_base

    model = model if model is not None else load_base(cfg.base)
    trainer = AWMTrainer(model, cfg, accelerator=accelerator, eval_fn=eval_fn)
    trainer.train(resume=resume)
    trainer.keep_ema_weights()
    return model
