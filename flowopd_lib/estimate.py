"""What an on-policy run will need, printed before its first update so users size their jobs.

    parameters   base model and trained adapter (count, memory), AdamW + EMA state of the adapter
    activations  of one backward pass: samples per forward/backward x tokens x width x layers x
                 34 bytes (Korthikanti et al. 2022, 16-bit, attention without stored scores;
                 doubled in float32, doubled again with CFG); with gradient checkpointing one block's
                 activations plus every block's input
    rollout      the stored trajectories (states and velocities) of one update
    time         one update, from a transformer forward timed at the batch of one backward pass
                 (at most 64) times the forwards an update makes

The time is measured on the machine and device the run uses, so it is an estimate for that
machine (a first forward on GPU includes warm-up; the estimate times the second and third).
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch

from .models.base import FlowModel

ACTIVATION_BYTES_PER_TOKEN_WIDTH_LAYER = 34  # 16-bit; float32 doubles it


@dataclasses.dataclass
class Estimate:
    base_params: int
    base_bytes: int
    adapter_params: int
    adapter_bytes: int
    optimizer_bytes: int
    samples_per_process: int
    samples_per_backward: int
    tokens: int
    activation_bytes: int
    rollout_bytes: int
    forward_seconds_per_sample: float
    forwards_per_update: int
    update_seconds: float

    def __str__(self) -> str:
        gib = lambda b: f"{b / 2 ** 30:.2f} GiB" if b >= 2 ** 28 else f"{b / 2 ** 20:.1f} MiB"  # noqa: E731
        return "\n".join([
            "estimate per process, before the first update:",
            f"  base model        {self.base_params / 1e6:,.1f}M parameters, {gib(self.base_bytes)}",
            f"  trained adapter   {self.adapter_params / 1e6:,.2f}M parameters, {gib(self.adapter_bytes)} "
            f"(+ AdamW and EMA state {gib(self.optimizer_bytes)})",
            f"  activations       {gib(self.activation_bytes)} for {self.samples_per_backward} samples x "
            f"{self.tokens} tokens per backward (micro_batch sets the samples; gradient_checkpointing cuts it)",
            f"  rollout storage   {gib(self.rollout_bytes)} for {self.samples_per_process} trajectories",
            f"  time              ~{self.update_seconds:.1f} s per update ({self.forwards_per_update} sample-forwards "
            f"at {1e3 * self.forward_seconds_per_sample:.2f} ms each, measured here)",
        ])


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@torch.no_grad()
def time_forward(model: FlowModel, batch: int, repeats: int = 2) -> float:
    """Seconds per sample of one transformer forward at `batch` (after one warm-up forward)."""
    x = torch.randn(batch, *model.latent_shape, device=model.device, dtype=next(model.transformer.parameters()).dtype)
    embeds = model.encode_prompts([""] * batch)
    sigma = torch.full((batch,), 0.5, device=model.device)

    def forward():
        model.velocity(x, sigma, embeds)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)

    forward()
    start = time.perf_counter()
    for _ in range(repeats):
        forward()
    return (time.perf_counter() - start) / repeats / batch


def estimate(model: FlowModel, cfg, num_processes: int, trainable: list[torch.nn.Parameter],
             label_forwards_per_sample: int) -> Estimate:
    """The estimate for an `OnPolicyConfig` on `model` (its trained adapter's parameters
    `trainable`; `label_forwards_per_sample`: the labelling forwards one sample needs)."""
    transformer = model.transformer
    config = transformer.config
    dtype_bytes = next(transformer.parameters()).element_size()
    side_h, side_w = model.latent_shape[1] // config.patch_size, model.latent_shape[2] // config.patch_size
    text_tokens = model.encode_prompts([""]).tokens.shape[1]
    tokens = side_h * side_w + text_tokens
    width = config.num_attention_heads * config.attention_head_dim
    guidance = 2 if cfg.cfg_scale != 1.0 else 1
    samples = cfg.prompts_per_update * cfg.group_size // num_processes
    per_backward = cfg.micro_batch or math.ceil(samples / cfg.minibatches)
    # with checkpointing, each block keeps only its input, and one block at a time is recomputed
    stored_layers = 1 if cfg.gradient_checkpointing else config.num_layers
    activation = per_backward * guidance * tokens * width * dtype_bytes * (
        stored_layers * ACTIVATION_BYTES_PER_TOKEN_WIDTH_LAYER // 2
        + (config.num_layers if cfg.gradient_checkpointing else 0))
    latent = math.prod(model.latent_shape) * 4
    rollout = samples * (2 * cfg.sde_steps + 1) * latent
    all_params = list(model.parameters())
    adapter_params = sum(p.numel() for p in trainable)
    forwards = samples * guidance * (cfg.sde_steps + label_forwards_per_sample
                                     + 3 * cfg.trained_steps * cfg.inner_epochs)  # backward ~ 2 forwards
    # timed at the batch the update's forwards run at (capped: the timing itself must stay cheap);
    # per-sample cost falls with batch size until the device is full, so a small batch overestimates
    per_sample = time_forward(model, min(per_backward * guidance, 64))
    return Estimate(base_params=sum(p.numel() for p in all_params) - adapter_params,
                    base_bytes=_bytes(all_params) - _bytes(trainable), adapter_params=adapter_params,
                    adapter_bytes=_bytes(trainable), optimizer_bytes=3 * 4 * adapter_params,
                    samples_per_process=samples, samples_per_backward=per_backward, tokens=tokens,
                    activation_bytes=activation, rollout_bytes=rollout, forward_seconds_per_sample=per_sample,
                    forwards_per_update=forwards, update_seconds=forwards * per_sample)
