"""The explorer's data: trajectories and what Flow-OPD sees along them, as numpy arrays.

`trace` samples one trajectory (SDE or ODE) from a model (the base or one adapter) and computes,
at every state it visits, the student's and the routed teacher's velocities as predicted clean
images `decode(x_s - s v)`, the per-pixel distance ||v_student - v_teacher||, the per-step KL to
the teacher (minus the dense reward, `opd.step_kl`) and the MAR term (the same KL form against the
anchor, the base by default). `compare` runs several models from the same noise; `group` draws G
SDE samples of one prompt with their rewards (what GRPO sees) and their per-step KLs to the
teacher (what OPD sees). These are the explorer's only model calls (without gradients); the
figures and the widget only read the arrays they return.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import adapters, flow, grpo, losses, opd, rollout, toy
from ..models.base import FlowModel


MODES = ("sde", "ode")
BASE_LABEL = "base"  # how the base model (adapter None) is named in figures and menus


def label(adapter: str | None) -> str:
    return BASE_LABEL if adapter is None else adapter


def as_prompt(text: str, task: str) -> toy.Prompt:
    """A typed prompt of a task: its spec parsed from the text, or empty when the toy grammar
    cannot parse it (it still samples and routes; only the rewards need the spec)."""
    try:
        return toy.parse_prompt(text, task)
    except ValueError:
        return toy.Prompt(text, task, {})


def routed_teacher(model: FlowModel, prompt) -> str | None:
    """The adapter OPD routes the prompt to (`opd.teacher_name(task)`), None when the model lacks it."""
    task = getattr(prompt, "task", None)
    name = opd.teacher_name(task) if task else None
    return name if name in adapters.names(model) else None


def to_images(model: FlowModel, latents: torch.Tensor) -> np.ndarray:
    """Latents [N, C, h, w] -> images [N, H, W, 3] float32 in [0, 1]."""
    return model.decode(latents).permute(0, 2, 3, 1).float().cpu().numpy()


# ----------------------------------------------------------------------------- one trajectory

@dataclass
class Trace:
    """One trajectory and what OPD sees along it; step k goes from states[k] (at sigmas[k]) to states[k + 1]."""
    prompt: object                 # toy.Prompt (or a plain string)
    adapter: str | None            # the sampled model (None = the base)
    teacher: str | None            # the adapter it is compared with (None: the model has no teacher for the task)
    anchor: str | None             # the MAR anchor (None = the base)
    mode: str                      # "sde" or "ode"
    seed: int
    noise_level: float             # of the SDE, and of the step Gaussians the KLs compare
    sigmas: np.ndarray             # [T + 1]
    latents: np.ndarray            # [T + 1, C, h, w] the states x_s
    states: np.ndarray             # [T + 1, H, W, 3] decoded states; states[-1] is the sample
    student_x0: np.ndarray         # [T, H, W, 3] decode(x_s - s v_student)
    teacher_x0: np.ndarray | None  # [T, H, W, 3] decode(x_s - s v_teacher), None without a teacher
    distance: np.ndarray | None    # [T, H, W] ||v_student - v_teacher|| per latent pixel, upsampled
    kl: np.ndarray                 # [T] per-step KL to the teacher (NaN without a teacher)
    mar: np.ndarray                # [T] per-step KL-form distance to the anchor

    @property
    def steps(self) -> int:
        return len(self.kl)

    @property
    def text(self) -> str:
        return rollout.text_of(self.prompt)


def _embeddings(model: FlowModel, text: str, n: int, cfg_scale: float):
    cond = model.encode_prompts([text] * n)
    return cond, (model.encode_prompts([""] * n) if cfg_scale != 1.0 else None)


def _next_state(v, x, sigma, sigma_next, mode: str, noise_level: float, noise: torch.Tensor) -> torch.Tensor:
    if mode == "ode":
        return flow.ode_step(v, x, sigma, sigma_next)
    return flow.sde_step(v, x, sigma, sigma_next, noise_level, noise=noise).prev_sample


def _check(mode: str, noise_level: float) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {MODES}")
    if noise_level <= 0:
        raise ValueError(f"noise_level={noise_level}: the step KLs compare SDE Gaussians, so it must be > 0 "
                         "(mode='ode' samples without noise)")


@torch.no_grad()
def trace(model: FlowModel, prompt, adapter: str | None = None, seed: int = 0, steps: int = 10, mode: str = "sde",
          noise_level: float = flow.NOISE_LEVEL, cfg_scale: float = 1.0, teacher: str | None = None, anchor: str | None = None,
          shift: float = 1.0) -> Trace:
    """Sample one trajectory from `adapter` (None = the base) and compute, at its states, the
    teacher's and the anchor's velocities (teacher None = the prompt's routed teacher).

    The SDE trajectory equals `rollout.sample_trajectories` for the same seed (what OPD trains on);
    the ODE one starts from the same noise."""
    _check(mode, noise_level)
    teacher = routed_teacher(model, prompt) if teacher is None else teacher
    sigmas = flow.sigma_schedule(steps, shift).to(model.device)
    noise = rollout.sample_noise(model, [seed], steps)[0]
    cond, uncond = _embeddings(model, rollout.text_of(prompt), 1, cfg_scale)
    names = list(dict.fromkeys([adapter, anchor] + ([teacher] if teacher else [])))
    x, states, velocities = noise[:1], [noise[:1]], {n: [] for n in names}
    for k in range(steps):
        for name in names:
            velocities[name].append(rollout.guided_velocity(adapters.view(model, name), x, sigmas[k].expand(1),
                                                            cond, uncond, cfg_scale))
        x = _next_state(velocities[adapter][-1], x, sigmas[k], sigmas[k + 1], mode, noise_level, noise[k + 1:k + 2])
        states.append(x)
    latents = torch.cat(states)
    v = {n: torch.cat(vs).float() for n, vs in velocities.items()}
    return _trace_from(model, prompt, adapter, teacher, anchor, mode, seed, noise_level, sigmas, latents, v)


def _trace_from(model, prompt, adapter, teacher, anchor, mode, seed, noise_level, sigmas, latents, v) -> Trace:
    """The arrays of a Trace from its states [T + 1, ...] and each model's velocities [T, ...]."""
    x, s, s_next = latents[:-1].float(), sigmas[:-1], sigmas[1:]
    predict_x0 = lambda velocity: to_images(model, (x - s.view(-1, 1, 1, 1) * velocity).to(latents.dtype))  # noqa: E731
    kl_to = lambda name: opd.step_kl(v[adapter], v[name], x, s, s_next, noise_level).cpu().numpy()  # noqa: E731
    states = to_images(model, latents)
    teacher_x0 = distance = None
    kl = np.full(len(x), np.nan, dtype=np.float32)
    if teacher:
        teacher_x0, kl = predict_x0(v[teacher]), kl_to(teacher)
        per_latent_pixel = (v[adapter] - v[teacher]).norm(dim=1, keepdim=True)
        distance = torch.nn.functional.interpolate(per_latent_pixel, size=states.shape[1:3], mode="nearest")[:, 0]
        distance = distance.cpu().numpy()
    return Trace(prompt, adapter, teacher, anchor, mode, seed, noise_level, sigmas.cpu().numpy(),
                 latents.float().cpu().numpy(), states, predict_x0(v[adapter]), teacher_x0, distance, kl,
                 kl_to(anchor))


def compare(model: FlowModel, prompt, adapters_list: list[str | None], seed: int = 0, steps: int = 10,
            mode: str = "ode", **trace_kwargs) -> dict[str, Trace]:
    """One trace per model (None = the base), all from the same noise: label -> Trace."""
    return {label(name): trace(model, prompt, name, seed, steps, mode, **trace_kwargs) for name in adapters_list}


# ----------------------------------------------------------------------------- a group of samples

@dataclass
class Group:
    """G SDE samples of one prompt: the terminal rewards GRPO learns from, the dense KLs OPD learns from."""
    prompt: object
    adapter: str | None
    teacher: str | None
    reward_weights: dict
    images: np.ndarray      # [G, H, W, 3]
    rewards: np.ndarray     # [G] weighted reward (grpo.combined_rewards)
    advantages: np.ndarray  # [G] group-normalised advantages (losses.group_advantages)
    kl: np.ndarray          # [G, T] per-step KL to the teacher at each sample's own states (NaN without one)


@torch.no_grad()
def group(model: FlowModel, prompt: toy.Prompt, adapter: str | None = None, G: int = 8, seed: int = 0,
          steps: int = 10, noise_level: float = flow.NOISE_LEVEL, cfg_scale: float = 1.0, rewards: dict | None = None,
          teacher: str | None = None, shift: float = 1.0) -> Group:
    """G SDE samples (seeds seed .. seed + G - 1; sample 0 is `trace(..., seed=seed)`), their rewards
    (default: the reward named like the prompt's task) and per-step KLs to the (routed) teacher."""
    _check("sde", noise_level)
    teacher = routed_teacher(model, prompt) if teacher is None else teacher
    weights = rewards or {prompt.task: 1.0}
    traj = rollout.sample_trajectories(adapters.view(model, adapter), [prompt] * G, [seed + i for i in range(G)],
                                       steps, noise_level, cfg_scale, shift)
    total, _ = grpo.combined_rewards(traj.images, traj.prompts, weights)
    advantages, _ = losses.group_advantages(total, G)
    kl = torch.full((G, steps), float("nan"))
    if teacher:
        teacher_view = adapters.view(model, teacher)
        for k in range(steps):
            v_teacher = rollout.guided_velocity(teacher_view, traj.latents[:, k], traj.sigmas[k].expand(G),
                                                traj.cond, traj.uncond, cfg_scale)
            kl[:, k] = opd.step_kl(traj.velocities[:, k], v_teacher, traj.latents[:, k], traj.sigmas[k],
                                   traj.sigmas[k + 1], noise_level).cpu()
    return Group(prompt, adapter, teacher, weights, traj.images.permute(0, 2, 3, 1).cpu().numpy(),
                 total.numpy(), advantages.numpy(), kl.numpy())


__all__ = ["BASE_LABEL", "Group", "MODES", "Trace", "as_prompt", "compare", "group", "label", "routed_teacher",
           "to_images", "trace"]
