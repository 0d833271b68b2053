"""Sampling from a FlowModel: images for evaluation (ODE or SDE, with CFG).

The noise of sample i depends only on (seed, i), so results do not change with the batch size
and the same seed gives every model the same starting noise (fair side-by-side comparisons).
"""
from __future__ import annotations

import torch

from . import flow
from .models.base import FlowModel, PromptEmbeds


def initial_noise(model: FlowModel, n: int, seed: int) -> torch.Tensor:
    """[n, C, h, w] standard normal noise, drawn on the CPU so every device gives the same values."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *model.latent_shape, generator=g).to(model.device)


def guided_velocity(model: FlowModel, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds,
                    uncond: PromptEmbeds | None, cfg_scale: float) -> torch.Tensor:
    """v with classifier-free guidance; uncond and cond run in one batched forward."""
    if uncond is None or cfg_scale == 1.0:
        return model.velocity(x, sigma, cond)
    both = model.velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), PromptEmbeds.cat([uncond, cond]))
    v_uncond, v_cond = both.chunk(2)
    return flow.cfg(v_uncond, v_cond, cfg_scale)


@torch.no_grad()
def generate(model: FlowModel, prompts: list[str], steps: int = 20, cfg_scale: float = 1.0, seed: int = 0,
             noise_level: float = 0.0, shift: float = 1.0, batch_size: int = 128,
             return_latents: bool = False) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] for N prompts: ODE (noise_level 0, the evaluation protocol)
    or the Flow-GRPO SDE. CFG uses the empty prompt as the unconditional one, as SD3 does."""
    sigmas = flow.sigma_schedule(steps, shift).to(model.device)
    noise = initial_noise(model, len(prompts), seed)
    sde_generator = torch.Generator(device=model.device).manual_seed(seed + 1) if noise_level > 0 else None
    outputs = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        cond = model.encode_prompts(chunk)
        uncond = model.encode_prompts([""] * len(chunk)) if cfg_scale != 1.0 else None
        velocity_fn = lambda x, s: guided_velocity(model, x, s, cond, uncond, cfg_scale)  # noqa: E731
        latents = flow.sample(velocity_fn, noise[start:start + len(chunk)], sigmas, noise_level, sde_generator)
        outputs.append(latents if return_latents else model.decode(latents))
    return torch.cat(outputs)
