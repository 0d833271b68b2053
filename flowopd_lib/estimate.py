"""What an on-policy run will need, printed before its first update so users size their jobs.

Memory, per process:

    parameters     base model (its parameters and buffers, e.g. SD3's position-embedding grid) and the
                   trained adapter (count, memory), AdamW + EMA state of the adapter
    activations    of one backward pass: samples per forward/backward x tokens x width x layers x
                   34 bytes (Korthikanti et al. 2022, 16-bit, attention without stored scores;
                   doubled in float32, doubled again with CFG); with gradient checkpointing one block's
                   activations plus every block's input
    rollout        the stored trajectories of one update: states and velocities, and the prompt
                   embeddings every sample carries (cond, and uncond with CFG)
    labelling      the no-grad forwards of teachers / anchor / reference over the whole local batch,
                   in sub-batches of micro_batch samples (trainer.in_chunks; all at once without a
                   micro_batch), x2 with CFG: the transient is one such forward's widest moment inside
                   a block, NO_GRAD_WIDTHS_PER_TOKEN hidden-size vectors per token; plus the labels kept
                   for the update (one velocity per sample and labelled step, float32)
    VAE decode     of each rollout chunk where rewards need images (reward trainers: configs with
                   `rewards`; OPD labels from velocities and decodes nothing): VAE_DECODE_LIVE_TENSORS
                   full-resolution feature maps of the decoder's widest full-resolution stage, in the
                   VAE's dtype; plus the decoded images kept for the rewards (float32)
    reward models  those that load into the training process: PickScore (CLIP-H, float32). GenEval's
                   detector and DeQA run as servers, one worker per GPU of their own
                   (reward_server_bytes: reported, not added to this process)
    prompt cache   the model's cached prompt embeddings: `model.max_cached_prompts` of them where the
                   model bounds its cache, else every distinct prompt the process sees in the run
    peak           everything resident plus the largest of the three transients (training, labelling,
                   decode happen one after the other, never at once)

Time: one update, from a transformer forward timed at the batch of one backward pass (at most 64)
times the forwards an update makes. The time is measured on the machine and device the run uses, so
it is an estimate for that machine (a first forward on GPU includes warm-up; the estimate times the
second and third).

The transient constants are estimates from the layer structure, not measurements:
`python -m flowopd_lib.diagnostics.gpu_check` measures them on a GPU next to this module's numbers.
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch

from .models.base import FlowModel

ACTIVATION_BYTES_PER_TOKEN_WIDTH_LAYER = 34  # 16-bit; float32 doubles it
# The widest moment of a no-grad MMDiT block, in hidden-size vectors per token (model dtype): the
# residual stream and its norm (2), the feed-forward's 4x-wide projection and its GELU output (8),
# the LoRA branch's float32 copy of a projection input and its float32 output (2 + 2; peft runs a
# float32 LoRA on a bf16 layer in float32), plus slack for the attention's q/k/v concatenations.
NO_GRAD_WIDTHS_PER_TOKEN = 16
# A VAE decoder's peak: the last up-block's first ResNet holds its input, the GroupNorm output and
# the SiLU output at once, each with the channels of the upsampled feature map entering it.
VAE_DECODE_LIVE_TENSORS = 3
# Reward models that load into the training process (bytes of their weights). PickScore_v1 is a
# CLIP-ViT-H-14: 986,109,441 parameters (transformers' CLIPModel at ViT-H-14's config), float32 as
# rewards.real.PickScoreV1 loads it.
PICKSCORE_PARAMETERS = 986_109_441
IN_PROCESS_REWARD_BYTES = {"pickscore_v1": PICKSCORE_PARAMETERS * 4}
# Flow-GRPO's reward servers (github.com/yifan123/reward-server): one gunicorn worker per GPU, each
# with its own copy of the model. GenEval: Mask2Former Swin-S (~69M) + OpenAI CLIP ViT-L/14 (~428M)
# in float32; DeQA: DeQA-Score-Mix3 (mPLUG-Owl2, LLaMA-2-7B based, ~8.2B) in float16. Weights only;
# their activations come on top.
REWARD_SERVER_BYTES = {"geneval_server": (69_000_000 + 428_000_000) * 4, "deqa_server": 8_200_000_000 * 2}


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
    reward_model_bytes: int = 0      # reward models in this process (PickScore)
    reward_server_bytes: int = 0     # per GPU of each reward server the run calls (not this process)
    labelling_batch: int = 0         # transformer batch of one labelling forward
    labelling_bytes: int = 0         # its transient
    stored_labels_bytes: int = 0     # labels kept through the update
    decode_batch: int = 0            # images decoded at once (one rollout chunk; 0 = no decode)
    decode_bytes: int = 0            # the decode's transient
    images_bytes: int = 0            # decoded images kept for the rewards
    cached_prompts: int = 0
    prompt_cache_bytes: int = 0
    peak_bytes: int = 0              # resident + the largest transient
    forward_time_assumed: bool = False  # forward_seconds_per_sample given, not measured here

    @property
    def resident_bytes(self) -> int:
        """Held through the whole update: weights, optimizer, rollout, labels, images, reward models, cache."""
        return (self.base_bytes + self.adapter_bytes + self.optimizer_bytes + self.rollout_bytes
                + self.stored_labels_bytes + self.images_bytes + self.reward_model_bytes + self.prompt_cache_bytes)

    def __str__(self) -> str:
        gib = _size
        transients = {"training": self.activation_bytes, "labelling": self.labelling_bytes, "decode": self.decode_bytes}
        largest = max(transients, key=transients.get)
        decode = (f"{gib(self.decode_bytes)} transient for {self.decode_batch} images per rollout chunk "
                  f"(+ {gib(self.images_bytes)} of images kept for the rewards)" if self.decode_batch
                  else "none (labels need no images)")
        return "\n".join([
            "estimate per process, before the first update:",
            f"  base model        {self.base_params / 1e6:,.1f}M parameters, {gib(self.base_bytes)}",
            f"  trained adapter   {self.adapter_params / 1e6:,.2f}M parameters, {gib(self.adapter_bytes)} "
            f"(+ AdamW and EMA state {gib(self.optimizer_bytes)})",
            f"  activations       {gib(self.activation_bytes)} for {self.samples_per_backward} samples x "
            f"{self.tokens} tokens per backward (micro_batch sets the samples; gradient_checkpointing cuts it)",
            f"  rollout storage   {gib(self.rollout_bytes)} for {self.samples_per_process} trajectories "
            f"(states, velocities, prompt embeddings)",
            f"  labelling         {gib(self.labelling_bytes)} transient, no-grad forwards of {self.labelling_batch} "
            f"(micro_batch samples, x2 with CFG) (+ {gib(self.stored_labels_bytes)} of labels kept)",
            f"  VAE decode        {decode}",
            f"  reward models     {gib(self.reward_model_bytes)} in this process (PickScore); reward servers "
            f"{gib(self.reward_server_bytes)} per GPU of their own, not counted here",
            f"  prompt cache      {gib(self.prompt_cache_bytes)} for {self.cached_prompts} prompts",
            f"  peak              {gib(self.peak_bytes)} = {gib(self.resident_bytes)} resident + "
            f"{gib(transients[largest])} {largest} transient (the largest)",
            f"  time              ~{self.update_seconds:.1f} s per update ({self.forwards_per_update} sample-forwards "
            f"at {1e3 * self.forward_seconds_per_sample:.2f} ms each, "
            f"{'assumed' if self.forward_time_assumed else 'measured here'})",
        ])


def _size(b: int) -> str:
    return f"{b / 2 ** 30:.2f} GiB" if b >= 2 ** 28 else f"{b / 2 ** 20:.1f} MiB"


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


# ----------------------------------------------------------------------------- the terms

def reward_model_bytes(reward_names) -> int:
    """Weights of the named rewards that load into the training process (unknown names: none)."""
    return sum(IN_PROCESS_REWARD_BYTES.get(name, 0) for name in set(reward_names))


def reward_server_bytes(reward_names) -> int:
    """Weights per GPU of the reward servers the named rewards call (each server on GPUs of its own)."""
    return sum(REWARD_SERVER_BYTES.get(name, 0) for name in set(reward_names))


def no_grad_forward_bytes(batch: int, tokens: int, width: int, dtype_bytes: int) -> int:
    """Transient of one no-grad transformer forward of `batch` sequences (its widest block moment)."""
    return batch * tokens * width * dtype_bytes * NO_GRAD_WIDTHS_PER_TOKEN


def vae_decode_bytes(vae_config, height: int, width: int, batch: int, dtype_bytes: int) -> int:
    """Transient of decoding `batch` images of height x width: the decoder's last up-block works at full
    resolution on the upsampled output of the block before it (block_out_channels[1]; SD3: 256)."""
    channels = max(vae_config.block_out_channels[:2])
    return batch * height * width * channels * dtype_bytes * VAE_DECODE_LIVE_TENSORS


def prompt_embedding_bytes(embeds) -> int:
    """Bytes of one prompt's embeddings (tokens [L, D] + pooled [P]) from a batch of them."""
    return embeds.tokens[0].numel() * embeds.tokens.element_size() + embeds.pooled[0].numel() * embeds.pooled.element_size()


def cached_prompt_count(model, cfg, num_processes: int) -> int:
    """Prompts the model's cache holds by the end of the run: its bound `max_cached_prompts` where it
    has one, else every distinct prompt this process encodes (its prompt groups of every update, plus
    the empty prompt of CFG; an upper bound: a prompt file smaller than that repeats prompts)."""
    distinct = cfg.updates * math.ceil(cfg.prompts_per_update / num_processes) + 1
    bound = getattr(model, "max_cached_prompts", None)
    return distinct if bound is None else min(bound, distinct)


def _image_side(model) -> int | None:
    """Pixels per side of a decoded image, for models with a diffusers VAE (SD3); None otherwise."""
    if getattr(model, "vae", None) is None or not hasattr(model, "vae_scale_factor"):
        return None
    return model.latent_shape[1] * model.vae_scale_factor


# ----------------------------------------------------------------------------- time

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


# ----------------------------------------------------------------------------- the estimate

def _off_device_bytes(model: FlowModel, cfg) -> int:
    """Bytes of the text encoders where `text_encoders_on_cpu` keeps them off the GPU."""
    if not getattr(cfg, "text_encoders_on_cpu", False):
        return 0
    encoders = [getattr(model, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    return sum(_bytes(e.parameters()) + _bytes(e.buffers()) for e in encoders if e is not None)


def estimate(model: FlowModel, cfg, num_processes: int, trainable: list[torch.nn.Parameter],
             label_forwards_per_sample: int, seconds_per_sample_forward: float | None = None) -> Estimate:
    """The estimate for an `OnPolicyConfig` on `model` (its trained adapter's parameters
    `trainable`; `label_forwards_per_sample`: the labelling forwards one sample needs).
    `seconds_per_sample_forward`: an assumed forward time instead of timing one here (a cost table
    for a device this machine does not have, on a model built without weights)."""
    transformer = model.transformer
    config = transformer.config
    dtype_bytes = next(transformer.parameters()).element_size()
    side_h, side_w = model.latent_shape[1] // config.patch_size, model.latent_shape[2] // config.patch_size
    empty = model.encode_prompts([""])
    text_tokens = empty.tokens.shape[1]
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
    per_prompt = prompt_embedding_bytes(empty)
    rollout = samples * (2 * cfg.sde_steps + 1) * latent + samples * guidance * per_prompt
    all_params = list(model.parameters())
    adapter_params = sum(p.numel() for p in trainable)
    forwards = samples * guidance * (cfg.sde_steps + label_forwards_per_sample
                                     + 3 * cfg.trained_steps * cfg.inner_epochs)  # backward ~ 2 forwards
    # timed at the batch the update's forwards run at (capped: the timing itself must stay cheap);
    # per-sample cost falls with batch size until the device is full, so a small batch overestimates
    per_sample = seconds_per_sample_forward or time_forward(model, min(per_backward * guidance, 64))
    reward_names = list(getattr(cfg, "rewards", None) or {})
    # labels are computed micro_batch samples at a time (trainer.in_chunks), all at once without one
    labelling_batch = min(cfg.micro_batch or samples, samples) * guidance if label_forwards_per_sample else 0
    side = _image_side(model)
    decode_batch = math.ceil(samples / cfg.rollout_chunks) if reward_names and side else 0
    cached = cached_prompt_count(model, cfg, num_processes)
    result = Estimate(
        base_params=sum(p.numel() for p in all_params) - adapter_params,
        base_bytes=_bytes(all_params) + _bytes(model.buffers()) - _bytes(trainable) - _off_device_bytes(model, cfg),
        adapter_params=adapter_params,
        adapter_bytes=_bytes(trainable), optimizer_bytes=3 * 4 * adapter_params,
        samples_per_process=samples, samples_per_backward=per_backward, tokens=tokens,
        activation_bytes=activation, rollout_bytes=rollout, forward_seconds_per_sample=per_sample,
        forwards_per_update=forwards, update_seconds=forwards * per_sample,
        reward_model_bytes=reward_model_bytes(reward_names), reward_server_bytes=reward_server_bytes(reward_names),
        labelling_batch=labelling_batch,
        labelling_bytes=no_grad_forward_bytes(labelling_batch, tokens, width, dtype_bytes),
        stored_labels_bytes=samples * label_forwards_per_sample * latent,
        decode_batch=decode_batch,
        decode_bytes=vae_decode_bytes(model.vae.config, side, side, decode_batch, model.vae.dtype.itemsize)
        if decode_batch else 0,
        images_bytes=samples * 3 * side * side * 4 if decode_batch else 0,
        cached_prompts=cached, prompt_cache_bytes=cached * per_prompt,
        forward_time_assumed=seconds_per_sample_forward is not None)
    result.peak_bytes = result.resident_bytes + max(result.activation_bytes, result.labelling_bytes,
                                                    result.decode_bytes)
    return result
