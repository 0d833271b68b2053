"""Sampling from a FlowModel: images for evaluation (ODE or SDE, with CFG).

The noise of sample i depends only on (seed, i) (for latents whose size is a multiple of 16, as
the toy's and SD3's are; see `initial_noise`), so it does not change with how the prompts are
batched, and the same seed gives every model the same starting noise (fair side-by-side
comparisons). `generate(..., indices=, total=)` makes any subset of a call's samples from the
noise they get in the whole call: what each process of a sharded evaluation does
(`distributed_eval`). Images match the whole call's bit for bit when the subset is made of the
whole call's batches; a batch of another size can round differently (CPU and GPU kernels pick
their blocking by batch size): by up to ~2e-4 on the shipped toy model, batch 1 against 128.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from . import flow
from .models.base import FlowModel, PromptEmbeds

# generate's default batch: at most this many latent values at once (16 SD3.5-M latents of a
# 512 px image, 16 x 64 x 64 each; with CFG the transformer sees twice as many) and at most
# MAX_BATCH samples (the fixed batch it had before: every toy model gets it, so the toy study's
# numbers are unchanged).
LATENT_VALUES_PER_BATCH = 16 * 16 * 64 * 64
MAX_BATCH = 128


def default_batch_size(model: FlowModel) -> int:
    """Samples `generate` makes at once when not told: 128 on the toy models, 16 for SD3.5-M at 512 px."""
    return max(1, min(MAX_BATCH, LATENT_VALUES_PER_BATCH // math.prod(model.latent_shape)))


def initial_noise(model: FlowModel, n: int, seed: int, indices: Sequence[int] | None = None) -> torch.Tensor:
    """[n, C, h, w] standard normal noise, drawn on the CPU so every device gives the same values.

    With `indices`, only those rows of that draw ([len(indices), C, h, w]), the noise those samples
    get in the whole draw. torch's CPU sampler fills 16 values at a time and redraws the last 16
    of a tensor whose size is not a multiple of 16, so a shorter draw is a prefix of a longer one
    only when a sample's size is a multiple of 16 (the toy's 8 x 8 x 8 and SD3's 16 x h x w
    latents): then only the rows up to the largest index are drawn, else all n."""
    shape = model.latent_shape
    if indices is None:
        rows = n
    else:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        if len(index) and (index.min() < 0 or index.max() >= n):
            raise ValueError(f"noise indices must lie in [0, {n}); got {index.min().item()}..{index.max().item()}")
        prefix_safe = math.prod(shape) % 16 == 0
        rows = (int(index.max()) + 1 if len(index) else 0) if prefix_safe else n
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(rows, *shape, generator=g)
    return (noise if indices is None else noise[index]).to(model.device)


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
             noise_level: float = 0.0, shift: float = 1.0, batch_size: int | None = None,
             return_latents: bool = False, indices: Sequence[int] | None = None,
             total: int | None = None) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] for N prompts: ODE (noise_level 0, the evaluation protocol)
    or the Flow-GRPO SDE. CFG uses the empty prompt as the unconditional one, as SD3 does.

    `batch_size` samples are made at once (None: `default_batch_size(model)`); another batch size
    gives the same noise, and images equal up to float rounding (module docstring).
    A subset of a bigger call: `indices` [N] says which of that call's `total` samples prompts[k]
    is, and each gets the noise it has there (ODE only: the SDE's noise runs on through the batches).
    Batches are then cut where the whole call cuts them (sample i in batch i // batch_size)."""
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    batch_size = batch_size or default_batch_size(model)
    sigmas = flow.sigma_schedule(steps, shift).to(model.device)
    if indices is None:
        noise = initial_noise(model, len(prompts), seed)
        batches = [range(start, min(start + batch_size, len(prompts))) for start in range(0, len(prompts), batch_size)]
    else:
        indices = [int(i) for i in indices]
        if total is None or len(indices) != len(prompts):
            raise ValueError(f"a subset needs one index per prompt ({len(indices)} for {len(prompts)}) and the "
                             f"size of the whole call (total={total})")
        if noise_level > 0:
            raise ValueError("the SDE noise is drawn batch after batch on one generator, so a subset cannot "
                             "reproduce it: generate subsets with the ODE (noise_level 0)")
        noise = initial_noise(model, total, seed, indices)
        batches = _batches_of_whole_call(indices, batch_size)
    sde_generator = torch.Generator(device=model.device).manual_seed(seed + 1) if noise_level > 0 else None
    outputs = []
    for rows in batches:
        chunk = [prompts[k] for k in rows]
        cond = model.encode_prompts(chunk)
        uncond = model.encode_prompts([""] * len(chunk)) if cfg_scale != 1.0 else None
        velocity_fn = lambda x, s: guided_velocity(model, x, s, cond, uncond, cfg_scale)  # noqa: E731
        latents = flow.sample(velocity_fn, noise[rows.start:rows.stop], sigmas, noise_level, sde_generator)
        outputs.append(latents if return_latents else model.decode(latents))
    return torch.cat(outputs)


def _batches_of_whole_call(indices: list[int], batch_size: int) -> list[range]:
    """Runs of positions k whose samples indices[k] are consecutive and in one batch of the whole call."""
    batches, start = [], 0
    for k in range(1, len(indices) + 1):
        last = indices[k - 1]
        if k == len(indices) or indices[k] != last + 1 or indices[k] // batch_size != last // batch_size:
            batches.append(range(start, k))
            start = k
    return batches


# ----------------------------------------------------------------------------- training rollouts

def _pick(values, index: torch.Tensor):
    """The samples at `index` of per-sample values: a tensor, PromptEmbeds, or None (absent)."""
    if values is None:
        return None
    if isinstance(values, PromptEmbeds):
        return PromptEmbeds(values.tokens[index], values.pooled[index])
    return values[index]


def _cat(parts: list):
    """Per-sample values of sub-batches in order: tensors, PromptEmbeds, or None (absent)."""
    if parts[0] is None:
        return None
    if isinstance(parts[0], PromptEmbeds):
        return PromptEmbeds(torch.cat([p.tokens for p in parts]), torch.cat([p.pooled for p in parts]))
    return torch.cat(parts)


@dataclass
class Trajectories:
    """SDE trajectories of a batch of samples (B = prompts x group size), what GRPO and OPD train on.

    latents[:, k] is the state at sigmas[k] (latents[:, 0] the initial noise, latents[:, -1] the
    sample); log_probs[:, k] scores the step latents[:, k] -> latents[:, k + 1] under the sampling
    policy (mean over dimensions, Flow-GRPO's convention)."""
    prompts: list               # [B] prompt objects (toy.Prompt) or strings
    latents: torch.Tensor       # [B, T + 1, C, h, w]
    log_probs: torch.Tensor     # [B, T]
    velocities: torch.Tensor    # [B, T, C, h, w] the (guided) velocity each step used
    sigmas: torch.Tensor        # [T + 1]
    cond: PromptEmbeds          # [B] prompt embeddings
    uncond: PromptEmbeds | None  # [B] empty-prompt embeddings (None without CFG)
    images: torch.Tensor | None  # [B, 3, H, W] decoded samples in [0, 1] (None when not decoded)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def select(self, index: torch.Tensor) -> "Trajectories":
        """The samples at `index` (a [b] long tensor), e.g. one minibatch."""
        return Trajectories([self.prompts[i] for i in index.tolist()], self.latents[index], self.log_probs[index],
                            self.velocities[index], self.sigmas, _pick(self.cond, index), _pick(self.uncond, index),
                            _pick(self.images, index))


@dataclass
class FinalSamples:
    """Only the final samples of a batch (B = prompts x group size), what the forward-process
    trainers (DiffusionNFT, AWM) train on: they re-noise the clean latents, so no trajectory,
    no log-probs and any solver. `seeds` [B] key each sample's training noise."""
    prompts: list                # [B] prompt objects (toy.Prompt) or strings
    latents: torch.Tensor        # [B, C, h, w] the clean samples x_0
    seeds: torch.Tensor          # [B] int64 per-sample seeds (the rollout's)
    cond: PromptEmbeds           # [B] prompt embeddings
    uncond: PromptEmbeds | None  # [B] empty-prompt embeddings (None without CFG)
    images: torch.Tensor | None  # [B, 3, H, W] decoded samples in [0, 1] (None when not decoded)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def select(self, index: torch.Tensor) -> "FinalSamples":
        return FinalSamples([self.prompts[i] for i in index.tolist()], self.latents[index], self.seeds[index],
                            _pick(self.cond, index), _pick(self.uncond, index), _pick(self.images, index))


@torch.no_grad()
def sample_final(model: FlowModel, prompts: list, seeds: list[int], steps: int = 10, noise_level: float = 0.0,
                 cfg_scale: float = 1.0, shift: float = 1.0, decode: bool = True,
                 initial_seeds: list[int] | None = None) -> FinalSamples:
    """One sample per (prompt, seed) from the model's current policy, keeping only the result:
    Euler ODE (noise_level 0, the default) or the Flow-GRPO SDE; noise drawn per sample as in
    `sample_trajectories`, so a sample does not depend on how the batch is split."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: one seed per sample")
    sigmas = flow.sigma_schedule(steps, shift).to(model.device)
    noise = sample_noise(model, seeds, steps, initial_seeds)
    cond = model.encode_prompts([text_of(p) for p in prompts])
    uncond = model.encode_prompts([""] * len(prompts)) if cfg_scale != 1.0 else None
    x = noise[:, 0]
    for k in range(steps):
        v = guided_velocity(model, x, sigmas[k].expand(len(prompts)), cond, uncond, cfg_scale)
        x = flow.ode_step(v, x, sigmas[k], sigmas[k + 1]) if noise_level == 0 else \
            flow.sde_step(v, x, sigmas[k], sigmas[k + 1], noise_level, noise=noise[:, k + 1]).prev_sample
    return FinalSamples(list(prompts), x, torch.as_tensor(seeds, dtype=torch.int64), cond, uncond,
                        model.decode(x) if decode else None)


def concat(parts: list):
    """Sub-batches sampled one after the other (same sigmas) as one batch, in order."""
    if len(parts) == 1:
        return parts[0]
    prompts = [p for t in parts for p in t.prompts]
    field = lambda name: _cat([getattr(t, name) for t in parts])  # noqa: E731
    if isinstance(parts[0], FinalSamples):
        return FinalSamples(prompts, field("latents"), field("seeds"), field("cond"), field("uncond"), field("images"))
    return Trajectories(prompts, field("latents"), field("log_probs"), field("velocities"), parts[0].sigmas,
                        field("cond"), field("uncond"), field("images"))


def text_of(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt.text


def sample_noise(model: FlowModel, seeds: list[int], steps: int,
                 initial_seeds: list[int] | None = None) -> torch.Tensor:
    """[B, steps + 1, C, h, w]: initial noise and every step's SDE noise of each sample, drawn on the
    CPU from its own seed, so a sample's trajectory does not depend on how the batch is split
    (across minibatches or across processes). With `initial_seeds`, the initial noise comes from
    those instead (equal seeds = samples that start from the same noise)."""
    draws = [torch.randn(steps + 1, *model.latent_shape, generator=torch.Generator().manual_seed(int(s)))
             for s in seeds]
    noise = torch.stack(draws)
    if initial_seeds is not None:
        noise[:, 0] = torch.stack([torch.randn(*model.latent_shape, generator=torch.Generator().manual_seed(int(s)))
                                   for s in initial_seeds])
    return noise.to(model.device)


@torch.no_grad()
def sample_trajectories(model: FlowModel, prompts: list, seeds: list[int], steps: int = 10,
                        noise_level: float = flow.NOISE_LEVEL, cfg_scale: float = 1.0, shift: float = 1.0,
                        decode: bool = True, initial_seeds: list[int] | None = None,
                        sde_until: int | None = None) -> Trajectories:
    """Sample one SDE trajectory per (prompt, seed) from the model's current policy (its active
    adapter), storing states and step log-probs. CFG runs uncond + cond in one batched forward.
    `initial_seeds` (one per sample) set the initial noise apart from the SDE noise (`sample_noise`).
    With `sde_until`, steps from that index on are deterministic ODE steps (log-prob NaN): the
    randomness, and so a group's spread of rewards, comes only from the earlier steps."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: one seed per sample")
    sigmas = flow.sigma_schedule(steps, shift).to(model.device)
    noise = sample_noise(model, seeds, steps, initial_seeds)
    cond = model.encode_prompts([text_of(p) for p in prompts])
    uncond = model.encode_prompts([""] * len(prompts)) if cfg_scale != 1.0 else None
    x = noise[:, 0]
    states, log_probs, velocities = [x], [], []
    for k in range(steps):
        s = sigmas[k].expand(len(prompts))
        v = guided_velocity(model, x, s, cond, uncond, cfg_scale)
        level = 0.0 if sde_until is not None and k >= sde_until else noise_level
        step = flow.sde_step(v, x, sigmas[k], sigmas[k + 1], level, noise=noise[:, k + 1])
        x = step.prev_sample
        states.append(x)
        log_probs.append(step.log_prob)
        velocities.append(v)
    latents = torch.stack(states, dim=1)
    images = model.decode(x) if decode else None
    return Trajectories(list(prompts), latents, torch.stack(log_probs, dim=1), torch.stack(velocities, dim=1),
                        sigmas, cond, uncond, images)
