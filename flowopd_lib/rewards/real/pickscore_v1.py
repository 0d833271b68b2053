"""`pickscore_v1`: PickScore (a CLIP-H fine-tuned on human preferences) as Flow-GRPO scores it.

    reward = exp(logit_scale) * cos(text embedding, image embedding) / 26

with the CLIP-ViT-H-14 processor (resize, centre crop, CLIP normalisation; text padded and
truncated to 77 tokens) and the PickScore_v1 weights, loaded through transformers. Dividing by
26 is Flow-GRPO's normalisation (PickScore logits sit near 20-23). Images are converted to 8-bit
PIL images first, as Flow-GRPO does.

`PickScoreV1()` loads the two hub ids (or local paths) on its first call and keeps them; the
environment variables FLOWOPD_PICKSCORE_MODEL and FLOWOPD_PICKSCORE_PROCESSOR, when set, replace
the default ids (local copies on an offline node; the dry run's tiny stand-ins);
`PickScoreV1(model=..., processor=...)` uses an already-built `CLIPModel` and `CLIPProcessor`
(tests use a tiny random CLIP built in code). The model runs on the images' device in `dtype`.
To score with other weights, register another instance:
`rewards.register("pickscore_v1", PickScoreV1(model_id="/path/to/PickScore_v1"))`.
"""
from __future__ import annotations

import os

import torch

from .inputs import prompt_text, to_pil

PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
MODEL_ID = "yuvalkirstain/PickScore_v1"
MODEL_ENV, PROCESSOR_ENV = "FLOWOPD_PICKSCORE_MODEL", "FLOWOPD_PICKSCORE_PROCESSOR"
LOGIT_SCALE_NORM = 26.0
MAX_TOKENS = 77


class PickScoreV1:
    """Callable scorer `(images, prompts) -> {"reward": [B]}`; loads its model lazily, once."""

    def __init__(self, model=None, processor=None, model_id: str | None = None, processor_id: str | None = None,
                 dtype: torch.dtype = torch.float32):
        if (model is None) != (processor is None):
            raise ValueError("pass both an already-built model and its processor, or neither")
        self.model, self.processor = model, processor
        self.model_id, self.processor_id, self.dtype = model_id, processor_id, dtype

    def load(self) -> tuple:
        """(model, processor), loading them from `model_id` / `processor_id` on first use."""
        if self.model is None:
            from transformers import CLIPModel, CLIPProcessor

            self.processor = CLIPProcessor.from_pretrained(
                self.processor_id or os.environ.get(PROCESSOR_ENV) or PROCESSOR_ID)
            self.model = CLIPModel.from_pretrained(self.model_id or os.environ.get(MODEL_ENV) or MODEL_ID)
        return self.model, self.processor

    def model_on(self, device: torch.device) -> torch.nn.Module:
        model, _ = self.load()
        self.model = model.to(device=device, dtype=self.dtype).eval().requires_grad_(False)
        return self.model

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list) -> dict[str, torch.Tensor]:
        model = self.model_on(images.device)
        pixels = self.processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        tokens = self.processor(text=[prompt_text(p) for p in prompts], padding=True, truncation=True,
                                max_length=MAX_TOKENS, return_tensors="pt")
        image_embeds = model.get_image_features(pixel_values=pixels.to(images.device, self.dtype)).pooler_output
        text_embeds = model.get_text_features(input_ids=tokens["input_ids"].to(images.device),
                                              attention_mask=tokens["attention_mask"].to(images.device)).pooler_output
        cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
        return {"reward": (model.logit_scale.exp() * cosine / LOGIT_SCALE_NORM).float()}


def tiny_clip(seed: int = 0) -> tuple:
    """A random CLIPModel (32 px images, 16-dim embeddings) and its CLIPProcessor, built offline:
    PickScore's stand-in in the tests and in the dry run (`save_pretrained` both to get folders)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from ...models.sd3 import _tiny_clip_tokenizer

    tokenizer = _tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_attention_heads=2,
                         num_hidden_layers=2, max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                           num_attention_heads=2, num_hidden_layers=2),
        projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
