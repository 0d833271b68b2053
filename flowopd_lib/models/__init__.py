"""Models behind one wrapper (`FlowModel`): the toy MMDiT (`toy.py`) and SD3.5-Medium.

`load_base("toy")` returns the shipped toy base model (flowopd_lib/assets/base_toy);
`load_base("sd3.5-medium")` (or a diffusers SD3 folder / hub id) loads SD3.5-Medium on GPU nodes."""
from __future__ import annotations

from pathlib import Path

from .base import FlowModel, PromptEmbeds
from .sd3 import SD3FlowModel, tiny_sd3_pipeline
from .toy import SIZES, ToyFlowModel

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# "toy": the base of the shipped teachers; "toy_glyph": it, continued with glyph places (its context tokens
# encode glyph order: issue 36, docs/toy_world.md), the base of the conflict-dial world
BASES = {"toy": ASSETS / "base_toy", "toy_glyph": ASSETS / "base_toy_glyph"}
SD3_BASES = {"sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium"}


# T5 tokens of an SD3 prompt: Flow-GRPO, DiffusionNFT and the published teachers use 128 (diffusers'
# default is 256: twice the context memory, and a context the teachers were not trained with).
SD3_MAX_SEQUENCE_LENGTH = 128


def process_device():
    """This process's device as a launcher assigns it: GPU LOCAL_RANK (set by accelerate launch and
    torchrun; 0 alone), or the CPU. Read from the environment, not from accelerate's PartialState,
    which, made before the trainer's Accelerator, would fix the process group too early."""
    import os

    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def load_base(name: str = "toy", device=None) -> FlowModel:
    """The frozen base model every teacher, merge and student adapts (eval mode, no grads):
    a toy model ('toy' or a ToyFlowModel.save directory) or SD3 ('sd3.5-medium', a hub id, or a
    diffusers pipeline folder with model_index.json). SD3 goes to `device` (default: this process's
    own GPU under accelerate launch, `process_device`) in bf16 on GPUs, float32
    on the CPU (precision.py: trained LoRA weights are float32 either way)."""
    if name in SD3_BASES or (Path(name) / "model_index.json").exists() or name.startswith("stabilityai/"):
        import torch

        device = torch.device(device) if device is not None else process_device()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        return SD3FlowModel.from_pretrained(SD3_BASES.get(name, name), dtype=dtype, device=device,
                                            max_sequence_length=SD3_MAX_SEQUENCE_LENGTH).requires_grad_(False)
    if name in BASES:
        path = BASES[name]
    elif Path(name).is_dir():
        path = Path(name)
    else:
        raise ValueError(f"unknown base model {name!r}; known: {sorted(BASES) + sorted(SD3_BASES)}, a directory "
                         f"saved by ToyFlowModel.save, or an SD3 pipeline folder / hub id")
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path} has no model.safetensors; pretrain one with notebooks/01_base_model.ipynb")
    return ToyFlowModel.load(path)


__all__ = ["FlowModel", "PromptEmbeds", "ToyFlowModel", "SIZES", "load_base",
           "SD3FlowModel", "tiny_sd3_pipeline"]
