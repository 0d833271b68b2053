"""Device and dtype policy of every trainer, in one place.

On GPU nodes the frozen base (SD3.5-M's MMDiT, text encoders) is bf16 to halve its memory, but what
is *trained* stays float32, as in the reference codebases (diffusers' `cast_training_params`,
Flow-GRPO, DiffusionNFT):

    frozen weights      bf16 (or whatever the base was loaded in); forwards run in that dtype
    LoRA parameters     float32: peft would otherwise cast a new adapter to its base layer's dtype,
                        and an Adam step of ~3e-4 on a weight of std ~1/32 is a few bf16 ulps
                        (NFT's `old` EMA at decay 0.999 would stop moving at all)
    gradients, AdamW    float32 (they follow the parameters)
    EMA shadow weights  float32 (copies of the parameters)

peft runs a float32 LoRA on a bf16 layer by casting the layer input to float32 for the LoRA branch
and the sum back to the layer's dtype, so no autocast is needed for correctness.

Devices: nothing here calls `.cuda()`; the device comes from the inputs or accelerate. TF32 matmuls
are enabled for the float32 LoRA branch and the VAE on Ampere+ GPUs (the references' `allow_tf32`).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

TRAINABLE_DTYPE = torch.float32


def float32_trainables(params) -> list[torch.nn.Parameter]:
    """Cast parameters to float32 in place (their `.data`, so optimizers and hooks built later see
    float32) and return them. Call before building the optimizer and EMA."""
    params = list(params)
    for p in params:
        if p.dtype != TRAINABLE_DTYPE:
            p.data = p.data.to(TRAINABLE_DTYPE)
    return params


def non_float32(named_params) -> list[str]:
    """Names of trainable tensors (parameters, their gradients) that are not float32: the policy's check."""
    bad = []
    for name, p in named_params:
        if p.dtype != TRAINABLE_DTYPE:
            bad.append(f"{name} ({p.dtype})")
        if p.grad is not None and p.grad.dtype != TRAINABLE_DTYPE:
            bad.append(f"{name}.grad ({p.grad.dtype})")
    return bad


def configure_backends(device: torch.device) -> None:
    """TF32 for float32 matmuls and convolutions on CUDA devices (what the references enable)."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@contextmanager
def rng_kept(device: torch.device | str | None = None):
    """Restore the global CPU RNG, and that of `device` if it is a GPU, afterwards.

    Only the process's own device: forking every visible GPU (torch's default) initialises a CUDA
    context on each of them from every rank (8 ranks x 8 contexts on a node)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        yield
