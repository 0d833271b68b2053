"""The model wrapper every trainer talks to, the same for the toy MMDiT and SD3.5-Medium.

A `FlowModel` owns a diffusers `SD3Transformer2DModel` (`.transformer`, where LoRA adapters
attach), turns prompts into cached embeddings, predicts velocities on latents, and decodes
latents to images in [0, 1] for the rewards. Trainers never see tokenizers, text encoders or
VAEs: rollouts, GRPO and OPD are written once against this interface.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class PromptEmbeds:
    """Per-token embeddings [B, L, D] (MMDiT context) and pooled embeddings [B, P] (AdaLN)."""
    tokens: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @staticmethod
    def cat(parts: list["PromptEmbeds"]) -> "PromptEmbeds":
        return PromptEmbeds(torch.cat([p.tokens for p in parts]), torch.cat([p.pooled for p in parts]))


class FlowModel(torch.nn.Module):
    """Interface of a text-to-image flow model. Subclasses set `self.transformer` and implement
    `_encode_uncached`, `decode` and `latent_shape`; `encode_images` where SFT/pretraining needs it."""

    transformer: torch.nn.Module
    # Prompt embeddings kept on the model's device, least recently used dropped first (None: all).
    # SD3.5-M's are ~2.7 MB a prompt at 256 T5 tokens: an unbounded cache grows by GBs per epoch.
    max_cached_prompts: int | None = None

    def __init__(self):
        super().__init__()
        self._embed_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    # -- prompts
    def _encode_uncached(self, texts: list[str]) -> PromptEmbeds:
        raise NotImplementedError

    @torch.no_grad()
    def encode_prompts(self, texts: list[str]) -> PromptEmbeds:
        """Embeddings of frozen text encoders, computed once per distinct prompt and cached up to
        `max_cached_prompts` (the empty string is the unconditional prompt for CFG, as in SD3)."""
        missing = sorted({t for t in texts if t not in self._embed_cache})
        fresh = self._encode_uncached(missing) if missing else None
        found = {t: (fresh.tokens[i], fresh.pooled[i]) for i, t in enumerate(missing)}
        for t in dict.fromkeys(texts):
            if t in self._embed_cache:
                self._embed_cache.move_to_end(t)
                found[t] = self._embed_cache[t]
            else:
                self._embed_cache[t] = found[t]
        while self.max_cached_prompts is not None and len(self._embed_cache) > self.max_cached_prompts:
            self._embed_cache.popitem(last=False)
        return PromptEmbeds(torch.stack([found[t][0] for t in texts]), torch.stack([found[t][1] for t in texts]))

    def text_encoders_to(self, device) -> None:
        """Keep the frozen text encoders on `device` (e.g. the CPU, to free GPU memory: SD3's T5-XXL
        is ~9 GiB in bf16); their embeddings still come back on the transformer's device. A no-op
        for models whose text encoding is negligible (the toy)."""

    def clear_prompt_cache(self) -> None:
        self._embed_cache.clear()

    # -- velocity
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        """v_theta(x_s, s, c): one transformer forward. sigma: [B] or a scalar; SD3 takes 1000 s."""
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).expand(x.shape[0])
        return self.transformer(hidden_states=x, encoder_hidden_states=embeds.tokens.to(x.dtype),
                                pooled_projections=embeds.pooled.to(x.dtype), timestep=1000 * sigma,
                                return_dict=False)[0]

    # -- latents <-> images
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1] (float32)."""
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> latents (the x_0 of the flow)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device
