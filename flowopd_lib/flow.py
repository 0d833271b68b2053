"""Rectified-flow maths: schedules, ODE/SDE steps, step log-probs, per-step KL, CFG, FM loss.

Pure functions on tensors, no models: everything else (rollouts, GRPO, OPD) is built on these.
Conventions (docs/method.md sections 1-2): `x_s = (1 - s) x_0 + s x_1`, x_0 data, x_1 ~ N(0, I),
velocity `v = x_1 - x_0`; sampling runs s = 1 -> 0, so `dt = sigma_next - sigma < 0`.
The SDE step is Flow-GRPO's Euler-Maruyama step of the marginal-preserving SDE

    mu  = x + [v + sig^2 / (2 s) (x + (1 - s) v)] dt,   std = sig * sqrt(|dt|),
    sig = noise_level * sqrt(s / (1 - s))   (at s = 1 the next grid point replaces s below the bar)

so each step is a Gaussian policy N(mu, std^2 I). Two such Gaussians that differ only in v have
the closed-form KL `w(s) ||v_a - v_b||^2` with `w(s) = |dt| / 2 * (1 / sig + sig (1 - s) / (2 s))^2`.
Math runs in float32 whatever the input dtype (bf16 models on GPU), results are cast back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Sigma = float | torch.Tensor  # a scalar, a 0-d tensor, or one value per sample [B]
NOISE_LEVEL = 0.7  # Flow-GRPO's SDE noise level a: the default of every sampler, trainer and explorer


# ----------------------------------------------------------------------------- schedules

def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift `shift * s / (1 + (shift - 1) * s)` (shift 3 for SD3.5)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sigma_schedule(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The sampling grid `[num_steps + 1]` from 1 down to 0, identical to diffusers'
    `FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps).sigmas`.

    diffusers spaces the timesteps linearly between its shifted training extremes (1 and
    shift(1/1000)) and then shifts again; we reproduce that, including its float32/float64 mix.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: need at least 1 sampling step")
    if shift <= 0:
        raise ValueError(f"shift={shift}: the timestep shift must be > 0 (1 = none, SD3.5 uses 3)")
    train_sigmas = shift_sigmas(torch.tensor([1.0, 1.0 / num_train_timesteps], dtype=torch.float32), shift)
    sigma_max, sigma_min = (float(s) for s in train_sigmas)
    t = torch.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps,
                       dtype=torch.float64)
    sigmas = shift_sigmas(t / num_train_timesteps, shift).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])


# ----------------------------------------------------------------------------- helpers

def _per_sample(value: Sigma, x: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample [B] value as a float32 tensor broadcastable against x [B, ...]."""
    t = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    if t.ndim == 0:
        return t
    if t.shape != (x.shape[0],):
        raise ValueError(f"sigma has shape {tuple(t.shape)}; expected a scalar or one value per sample "
                         f"({x.shape[0]},)")
    return t.view(-1, *([1] * (x.ndim - 1)))


def _flat_sum(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(dim=1)


def _flat_mean(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).mean(dim=1)


def sde_sigma(sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    """Diffusion coefficient `sig_s = a sqrt(s / (1 - s))`; at s = 1 the next grid point is used
    under the bar (Flow-GRPO's guard against 1/0)."""
    below = torch.where(sigma >= 1.0, sigma_next, sigma)
    return noise_level * torch.sqrt(sigma / (1 - below))


# ----------------------------------------------------------------------------- steps

def ode_step(v: torch.Tensor, x: torch.Tensor, sigma: Sigma, sigma_next: Sigma) -> torch.Tensor:
    """One Euler step of the probability-flow ODE: `x + (sigma_next - sigma) v`."""
    dt = _per_sample(sigma_next, x) - _per_sample(sigma, x)
    return (x.float() + dt * v.float()).to(x.dtype)


@dataclass
class SDEStep:
    """One stochastic step. prev_sample, mean: like x; std: broadcastable to x; log_prob: [B]."""
    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor


def sde_mean_std(v: torch.Tensor, x: torch.Tensor, sigma: Sigma, sigma_next: Sigma,
                 noise_level: float = NOISE_LEVEL) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the Gaussian step policy (float32)."""
    s, s_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    dt = s_next - s
    sig = sde_sigma(s, s_next, noise_level)
    x32, v32 = x.float(), v.float()
    mean = x32 + (v32 + sig ** 2 / (2 * s) * (x32 + (1 - s) * v32)) * dt
    return mean, sig * torch.sqrt(-dt)


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                      reduce: str = "mean") -> torch.Tensor:
    """Per-sample log N(sample; mean, std^2 I): `reduce="mean"` averages over non-batch dimensions
    (Flow-GRPO's convention, what its PPO clip range 1e-4 assumes), `"sum"` is the exact density."""
    std = std.expand_as(mean)
    log_density = (-((sample.float() - mean) ** 2) / (2 * std ** 2) - torch.log(std)
                   - 0.5 * math.log(2 * math.pi))
    if reduce == "mean":
        return _flat_mean(log_density)
    if reduce == "sum":
        return _flat_sum(log_density)
    raise ValueError(f"reduce={reduce!r}: use 'mean' (Flow-GRPO) or 'sum' (exact)")


def sde_step(v: torch.Tensor, x: torch.Tensor, sigma: Sigma, sigma_next: Sigma, noise_level: float = NOISE_LEVEL,
             noise: torch.Tensor | None = None, prev_sample: torch.Tensor | None = None,
             generator: torch.Generator | None = None, reduce: str = "mean") -> SDEStep:
    """Flow-GRPO's SDE step. Draws `prev_sample = mean + std * noise` (noise from `generator` when not
    given), or scores the given `prev_sample`. With noise_level=0 the step is the ODE step and
    log_prob is undefined (NaN): a deterministic step has no density."""
    mean, std = sde_mean_std(v, x, sigma, sigma_next, noise_level)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        prev_sample = mean + std * noise.float()
    if noise_level == 0:
        log_prob = torch.full((x.shape[0],), float("nan"), device=x.device)
    else:
        log_prob = gaussian_log_prob(prev_sample.detach(), mean, std, reduce)
    return SDEStep(prev_sample.to(x.dtype), mean, std, log_prob)


# ----------------------------------------------------------------------------- KL between step policies

def kl_weight(sigma: Sigma, sigma_next: Sigma, noise_level: float = NOISE_LEVEL) -> torch.Tensor:
    """`w(s)` such that KL(N(mu_a, std^2) || N(mu_b, std^2)) = w(s) ||v_a - v_b||^2 (sum over dims).

    Returns a tensor shaped like sigma (scalar or [B])."""
    s = torch.as_tensor(sigma, dtype=torch.float32)
    s_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=s.device)
    dt = (s_next - s).abs()
    sig = sde_sigma(s, s_next, noise_level)
    return dt / 2 * (1 / sig + sig * (1 - s) / (2 * s)) ** 2


def step_kl(v_a: torch.Tensor, v_b: torch.Tensor, x: torch.Tensor, sigma: Sigma, sigma_next: Sigma,
            noise_level: float = NOISE_LEVEL) -> torch.Tensor:
    """Exact KL [B] between the SDE step Gaussians of two velocities at the same state x.

    Both steps share x and the std, so the KL depends on x only through v_a, v_b (x fixes the
    shape and device). Equal to `||mean_a - mean_b||^2 / (2 std^2)` summed over dimensions."""
    if v_a.shape != x.shape or v_b.shape != x.shape:
        raise ValueError(f"velocity shapes {tuple(v_a.shape)}, {tuple(v_b.shape)} must equal x's {tuple(x.shape)}")
    w = _per_sample(kl_weight(sigma, sigma_next, noise_level).to(x.device), x)
    return _flat_sum(w * (v_a.float() - v_b.float()) ** 2)


# ----------------------------------------------------------------------------- guidance, sampling, training loss

def cfg(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: `v_uncond + scale (v_cond - v_uncond)`; scale 1 = no guidance."""
    return v_uncond + scale * (v_cond - v_uncond)


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B, ...], sigma [B]) -> v


@torch.no_grad()
def sample(velocity_fn: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor, noise_level: float = 0.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Integrate from noise (s = sigmas[0]) to data (s = sigmas[-1]): ODE when noise_level = 0,
    else the Flow-GRPO SDE. For trajectories with log-probs use the rollout module."""
    x = noise
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        s = sigma.expand(x.shape[0]).to(x.device)
        v = velocity_fn(x, s)
        x = ode_step(v, x, sigma, sigma_next) if noise_level == 0 else \
            sde_step(v, x, sigma, sigma_next, noise_level, generator=generator).prev_sample
    return x


def sample_training_sigmas(batch: int, mode: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
                           generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Noise levels [B] for the FM loss: SD3's logit-normal (sigmoid of N(mean, std)) or uniform."""
    if mode == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device))
    if mode == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    raise ValueError(f"sigma sampling mode={mode!r}: use 'logit_normal' or 'uniform'")


@dataclass
class FMLoss:
    loss: torch.Tensor        # scalar, what to backpropagate
    per_sample: torch.Tensor  # [B] detached, for logging per noise bin
    sigma: torch.Tensor       # [B] the noise levels used


def fm_loss(velocity_fn: VelocityFn, x0: torch.Tensor, sigma: torch.Tensor | None = None,
            noise: torch.Tensor | None = None, sigma_sampling: str = "logit_normal",
            generator: torch.Generator | None = None) -> FMLoss:
    """Rectified-flow loss `E || v(x_s, s) - (x_1 - x_0) ||^2` (mean over dimensions)."""
    b = x0.shape[0]
    if sigma is None:
        sigma = sample_training_sigmas(b, sigma_sampling, generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    s = _per_sample(sigma, x0)
    x_s = (1 - s) * x0 + s * noise
    per_sample = _flat_mean((velocity_fn(x_s, sigma).float() - (noise - x0).float()) ** 2)
    return FMLoss(per_sample.mean(), per_sample.detach(), sigma)


def loss_per_noise_bin(sigma: torch.Tensor, per_sample_loss: torch.Tensor, num_bins: int = 5) -> dict[str, float]:
    """Mean loss per equal-width sigma bin, keyed like `loss_bin/0.0-0.2` (empty bins omitted)."""
    bins = torch.clamp((sigma * num_bins).long(), max=num_bins - 1)
    out = {}
    for k in range(num_bins):
        mask = bins == k
        if mask.any():
            out[f"loss_bin/{k / num_bins:.1f}-{(k + 1) / num_bins:.1f}"] = per_sample_loss[mask].mean().item()
    return out
