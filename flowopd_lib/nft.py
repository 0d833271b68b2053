"""Stage 0 with DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117): negative-aware fine-tuning on
the forward process, a sample-efficient teacher trainer beside Flow-GRPO.

The trained velocity v_theta and the sampling policy's v_old define two implicit policies,

    v+ = b v_theta + (1 - b) v_old          (pulled towards the good samples)
    v- = (1 + b) v_old - b v_theta          (its mirror image, pulled towards the bad ones)

and each sample's reward, as r = clip(A) / (2 A_max) + 1/2 in [0, 1], weighs the two
flow-matching losses on x0-predictions `x0_hat = x_s - s v`:

    L = A_max / b * [ r ||x0_hat(v+) - x0||^2 / w+  +  (1 - r) ||x0_hat(v-) - x0||^2 / w- ]

w = mean |x0_hat - x0| (detached) is the adaptive per-sample normaliser. At v_theta = v_old the
gradient of L is exactly the gradient of the advantage-weighted flow-matching loss
`clip(A) s^2 ||v - (eps - x0)||^2 / w` (the test checks it). Rollouts come from `old`, an EMA of the
trained adapter kept as a second adapter on the same base, whose decay rises with the updates
(DiffusionNFT's schedule: min(rate * (update - start), max), 0 before `start`).

    cfg = NFTConfig(rewards={"geneval": 1.0}, datasets={"geneval": 1.0}, adapter="geneval")
    model = train_nft(cfg)
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from . import adapters, precision
from .config import param
from .forward_rl import ForwardRLConfig, ForwardRLTrainer
from .models.base import FlowModel


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, x0: torch.Tensor, x_s: torch.Tensor, sigma: torch.Tensor,
             advantage: torch.Tensor, beta: float = 1.0, adv_clip: float = 5.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT's loss per sample [B] (module docstring) and metrics [B].

    v, v_old, x0, x_s: [B, ...] (v with grad; v_old frozen); sigma, advantage: [B]."""
    s = sigma.float().view(-1, *([1] * (x0.ndim - 1)))
    v32, old, x0 = v.float(), v_old.float().detach(), x0.float()
    r = (advantage.float().clamp(-adv_clip, adv_clip) / adv_clip / 2 + 0.5).view(-1)

    def normalised_error(velocity: torch.Tensor) -> torch.Tensor:
        error = x_s.float() - s * velocity - x0
        w = error.detach().abs().flatten(1).mean(dim=1).clamp_min(1e-5)
        return error.pow(2).flatten(1).mean(dim=1) / w

    positive = normalised_error(beta * v32 + (1 - beta) * old)
    negative = normalised_error((1 + beta) * old - beta * v32)
    loss = adv_clip * (r * positive + (1 - r) * negative) / beta
    return loss, {"nft_positive": positive.detach(), "nft_negative": negative.detach(),
                  "old_deviation": (v32 - old).detach().pow(2).flatten(1).mean(dim=1)}


def old_decay(update: int, rate: float, maximum: float, start: int = 0) -> float:
    """DiffusionNFT's EMA decay of the sampling policy after `update` (0 = old follows the trained one)."""
    return 0.0 if update < start else min(rate * (update - start), maximum)


@dataclasses.dataclass
class NFTConfig(ForwardRLConfig):
    nft_beta: float = param(1.0, "strength b of the implicit policies (DiffusionNFT: 1.0; 0.1 for OCR)",
                            range=(1e-6, None))
    old_decay_rate: float = param(0.001, "the old policy's EMA decay grows by this per update "
                                  "(DiffusionNFT decay_type 1: 0.001; type 2, OCR: 0.0075)", range=(0, 1))
    old_decay_max: float = param(0.5, "... up to this (type 1: 0.5; type 2: 0.999)", range=(0, 1))
    old_decay_start: int = param(0, "... from this update on, 0 before (type 1: 0; type 2: 75)", range=(0, None))
    out_dir: str = param("runs/teacher_nft", "run directory (adapter/, checkpoints/, metrics.csv)")


class NFTTrainer(ForwardRLTrainer):
    cfg: NFTConfig

    def __init__(self, model: FlowModel, cfg: NFTConfig, *args, **kwargs):
        super().__init__(model, cfg, *args, **kwargs)
        trained = self.model.transformer.peft_config[cfg.adapter]  # same shape (also for an init_adapter)
        adapters.add(self.model, self.old_name, rank=trained.r, alpha=trained.lora_alpha,
                     targets=sorted(trained.target_modules))
        self.model.transformer.set_adapter(cfg.adapter)  # the trained adapter stays the active, trainable one
        # float32 like the trained adapter: at decay 0.999 a bf16 `old` would stop moving
        self.old_params = precision.float32_trainables(adapters.parameters(self.model, self.old_name, trainable=False))
        self.copy_to_old(decay=0.0)  # old starts as the trained adapter

    @property
    def old_name(self) -> str:
        return f"{self.cfg.adapter}_old"

    @property
    def sampling_adapter(self) -> str:
        return self.old_name

    @property
    def label_forwards_per_sample(self) -> int:
        return self.cfg.train_timesteps * (2 if self.cfg.beta > 0 else 1)

    @torch.no_grad()
    def copy_to_old(self, decay: float) -> None:
        for old, new in zip(self.old_params, self.params, strict=True):
            old.mul_(decay).add_(new.detach(), alpha=1 - decay)

    def frozen_adapters(self):
        return {"v_old": self.old_name, **super().frozen_adapters()}

    def term_loss(self, part, labels, j, v, x0, noise, sigma):
        x_s = self.noised(x0, noise, sigma)
        return nft_loss(v, labels["v_old"][:, j], x0, x_s, sigma, labels["advantage"], self.cfg.nft_beta,
                        self.cfg.advantage_clip)

    def after_update(self, update: int) -> dict[str, float]:
        decay = old_decay(update, self.cfg.old_decay_rate, self.cfg.old_decay_max, self.cfg.old_decay_start)
        self.copy_to_old(decay)
        return {"old_decay": decay}

    def state(self) -> dict:
        return {**super().state(), "old": adapters.state_dict(self.model, self.old_name)}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        adapters.load_state_dict(self.model, self.old_name, state["old"])


def train_nft(cfg: NFTConfig, model: FlowModel | None = None, accelerator=None,
              eval_fn: Callable[[FlowModel], dict] | None = None, resume: bool = True) -> FlowModel:
    """Train one DiffusionNFT adapter into cfg.out_dir (as `grpo.train_grpo`); the EMA adapter is
    saved to out_dir/adapter and left attached on the returned model (the `old` adapter is removed)."""
    from .models import load_base

    model = model if model is not None else load_base(cfg.base)
    trainer = NFTTrainer(model, cfg, accelerator=accelerator, eval_fn=eval_fn)
    trainer.train(resume=resume)
    trainer.keep_ema_weights()
    adapters.delete(model, trainer.old_name)
    return model
