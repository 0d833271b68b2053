"""The toy world's text-to-image model: SD3's architecture in miniature, built in code.

  prompt --word tokenizer--> tiny T5 encoder   --> tokens [B, L, D]  (MMDiT context)
                         `-> tiny CLIP encoder --> pooled [B, P]    (AdaLN conditioning)
  latent [B, C, 8, 8] --SD3Transformer2DModel (MMDiT)--> velocity
  latent --tiny conv decoder--> image [B, 3, 32, 32]

As SD3 does with its VAE, the MMDiT works on a small latent of a tiny autoencoder trained on the
toy renders: the decoder draws crisp edges and glyphs, so the flow model only has to learn layout
(a pixel-space MMDiT of the same cost drew blobs; see notebooks/01_base_model.ipynb). Sizes are
named in `SIZES`; `save`/`load` keep everything (weights, vocabulary, latent statistics) in one
safetensors file plus a JSON config.

As in SD3, the token sequence comes from a T5 encoder (bidirectional, relative positions) and the
pooled vector from CLIP. With CLIP's causal, absolute-position tokens as the context instead, the
base learned to bind quoted glyphs to their places on the sign half as fast (OCR 0.092 against 0.205
on 48 test prompts after the same 14 minutes of OCR-only pretraining; notebooks/01_base_model.ipynb).

T5's relative positions hardly tell a glyph where it stands in the quoted text (a glyph's token moved
1.7% between first and second place in the first base; `diagnostics.ocr_errors.order_signal`), yet the
sign is drawn left to right around its centre. `GlyphPlaces` adds a learned embedding of each quoted
glyph's place to its context token: the place is counted from the text's centre (2k - n + 1 for glyph
k of n), the column the renderer puts it in. A model saved without it (`glyph_places: false` in its
config) loads as it was saved.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from .base import FlowModel, PromptEmbeds

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")


@dataclasses.dataclass(frozen=True)
class ToySize:
    """Architecture of one named size (the image is image_size^2, the latent image_size/4)."""
    layers: int
    heads: int
    head_dim: int
    latent_channels: int = 8
    ae_downsamples: int = 2  # the latent is image_size / 2^ae_downsamples on a side
    ae_width: int = 64
    text_dim: int = 64
    text_layers: int = 2
    max_tokens: int = 16
    qk_norm: str | None = None  # "rms_norm" normalises queries/keys (SD3.5's choice; allows a higher lr)
    patch_size: int = 1  # 2: a token per 2x2 latent patch, 4x fewer tokens (SD3 uses 2 on its latent)


SIZES = {
    "tiny": ToySize(layers=2, heads=2, head_dim=16, ae_width=16, text_dim=32, text_layers=1),
    "small": ToySize(layers=6, heads=4, head_dim=16, qk_norm="rms_norm"),
    "base": ToySize(layers=6, heads=4, head_dim=32),
    "small_l4": ToySize(layers=6, heads=4, head_dim=16, latent_channels=32, ae_downsamples=3),
    "wide_p2": ToySize(layers=6, heads=6, head_dim=16, qk_norm="rms_norm", patch_size=2),
}


class WordTokenizer:
    """Word-level tokenizer over the toy grammar (`toy.words` splits prompts; quoted text becomes
    one token per glyph). Pads/truncates to max_tokens with <bos> ... <eos> like CLIP."""

    def __init__(self, vocab: list[str], max_tokens: int):
        self.vocab = list(SPECIALS) + [w for w in vocab if w not in SPECIALS]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_tokens = max_tokens

    def __len__(self) -> int:
        return len(self.vocab)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        from ..toy.grammar import words

        ids = torch.full((len(texts), self.max_tokens), self.index["<pad>"], dtype=torch.long)
        unk = self.index["<unk>"]
        for row, text in enumerate(texts):
            body = [self.index.get(w, unk) for w in words(text)][: self.max_tokens - 2]
            seq = [self.index["<bos>"], *body, self.index["<eos>"]]
            ids[row, : len(seq)] = torch.tensor(seq)
        return ids


def glyph_place_ids(tokenizer: WordTokenizer, ids: torch.Tensor) -> torch.Tensor:
    """[B, L] token ids -> [B, L] place ids: 0 outside quotes, else 1 + (2k - n + 1) + (L - 1) for glyph
    k (0-based) of the n glyphs between a pair of quote tokens; centred texts put equal ids in equal columns."""
    quote = tokenizer.index['"']
    places = torch.zeros_like(ids)
    length = ids.shape[1]
    for row in range(ids.shape[0]):
        marks = (ids[row] == quote).nonzero().flatten().tolist()
        for start, end in zip(marks[0::2], marks[1::2]):
            n = end - start - 1
            for k in range(n):
                places[row, start + 1 + k] = 1 + (2 * k - n + 1) + (length - 1)
    return places


class GlyphPlaces(nn.Module):
    """A learned vector per glyph place, added to the context tokens. Initialised at std 0.25, about a
    third of a context token's per-dimension scale (0.8 in the first base): order is in the tokens from
    the start (a zero start grew `order_signal` from 1.7% to only 1.8% in 100 pretraining steps)."""

    def __init__(self, max_tokens: int, dim: int, init_std: float = 0.25):
        super().__init__()
        # Drawn from its own generator: building it leaves the global RNG where it was (a model's other
        # random draws, e.g. the tests' tiny models, are those of a model without glyph places).
        weight = torch.randn(2 * max_tokens, dim, generator=torch.Generator().manual_seed(0)) * init_std
        self.embedding = nn.Embedding(2 * max_tokens, dim, _weight=weight)

    def forward(self, places: torch.Tensor) -> torch.Tensor:
        return self.embedding(places) * (places > 0).unsqueeze(-1)


class TinyAutoencoder(nn.Module):
    """Deterministic conv autoencoder: [B, 3, H, W] in [0, 1] <-> [B, C, H/d, W/d], d = 2^downsamples."""

    def __init__(self, latent_channels: int, width: int, downsamples: int = 2):
        super().__init__()
        w = width
        # Full resolution only at the very first and last layer: convs at 32x32 dominate CPU time.
        encoder = [nn.Conv2d(3, w, 4, stride=2, padding=1), nn.SiLU()]
        for _ in range(downsamples - 1):
            encoder += [nn.Conv2d(w, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, w, 4, stride=2, padding=1), nn.SiLU()]
        self.encoder = nn.Sequential(*encoder, nn.Conv2d(w, latent_channels, 1))
        decoder = [nn.Conv2d(latent_channels, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, w, 3, padding=1), nn.SiLU()]
        for _ in range(downsamples - 1):
            decoder += [nn.ConvTranspose2d(w, w, 4, stride=2, padding=1), nn.SiLU(), nn.Conv2d(w, w, 3, padding=1), nn.SiLU()]
        self.decoder = nn.Sequential(*decoder, nn.ConvTranspose2d(w, 3, 4, stride=2, padding=1))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images * 2 - 1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unclamped reconstruction in roughly [0, 1] (clamp for display and rewards)."""
        return (self.decoder(latents) + 1) / 2


def build_text_encoder(vocab_size: int, size: ToySize):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=size.text_dim, intermediate_size=2 * size.text_dim,
                         num_hidden_layers=size.text_layers, num_attention_heads=4,
                         max_position_embeddings=size.max_tokens, projection_dim=size.text_dim,
                         pad_token_id=SPECIALS.index("<pad>"), bos_token_id=SPECIALS.index("<bos>"),
                         eos_token_id=SPECIALS.index("<eos>"), hidden_act="gelu")
    return CLIPTextModelWithProjection(cfg)


def build_t5_encoder(vocab_size: int, size: ToySize):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab_size, d_model=size.text_dim, d_kv=size.text_dim // 4, d_ff=2 * size.text_dim,
                   num_layers=size.text_layers, num_heads=4, relative_attention_num_buckets=16,
                   relative_attention_max_distance=size.max_tokens, dropout_rate=0.0,
                   feed_forward_proj="gated-gelu", pad_token_id=SPECIALS.index("<pad>"))
    return T5EncoderModel(cfg)


def build_transformer(size: ToySize, latent_size: int):
    from diffusers import SD3Transformer2DModel

    inner = size.heads * size.head_dim
    return SD3Transformer2DModel(sample_size=latent_size, patch_size=size.patch_size, in_channels=size.latent_channels,
                                 out_channels=size.latent_channels, num_layers=size.layers,
                                 attention_head_dim=size.head_dim, num_attention_heads=size.heads,
                                 joint_attention_dim=size.text_dim, caption_projection_dim=inner,
                                 pooled_projection_dim=size.text_dim, pos_embed_max_size=latent_size // size.patch_size,
                                 qk_norm=size.qk_norm)


class ToyFlowModel(FlowModel):
    """Tokenizer + tiny CLIP (pooled) and T5 (tokens) + MMDiT on the latent of a tiny autoencoder."""

    def __init__(self, size: str = "small", vocab: list[str] | None = None, image_size: int = 32,
                 glyph_places: bool = True):
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"unknown toy model size {size!r}; known sizes: {sorted(SIZES)}")
        self.downscale = 2 ** SIZES[size].ae_downsamples
        if image_size % self.downscale:
            raise ValueError(f"image_size={image_size} must be a multiple of {self.downscale} (the autoencoder's downscale)")
        if vocab is None:
            from .. import toy
            vocab = toy.vocabulary() + list(toy.GLYPHS)
        self.size_name, self.spec, self.image_size = size, SIZES[size], image_size
        self.tokenizer = WordTokenizer(vocab, self.spec.max_tokens)
        self.text_encoder = build_text_encoder(len(self.tokenizer), self.spec)
        self.t5_encoder = build_t5_encoder(len(self.tokenizer), self.spec)
        self.autoencoder = TinyAutoencoder(self.spec.latent_channels, self.spec.ae_width, self.spec.ae_downsamples)
        self.transformer = build_transformer(self.spec, image_size // self.downscale)
        # Built last, so every other module's initial weights are those of a model without it.
        self.glyph_places = GlyphPlaces(self.spec.max_tokens, self.spec.text_dim) if glyph_places else None
        # Per-channel latent statistics (SD3's shift/scaling factor): the flow sees N(0, 1)-ish latents.
        self.register_buffer("latent_mean", torch.zeros(self.spec.latent_channels))
        self.register_buffer("latent_std", torch.ones(self.spec.latent_channels))
        self.eval()

    # -- prompts
    @property
    def text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder, self.t5_encoder] + ([self.glyph_places] if self.glyph_places is not None else [])

    def add_glyph_places(self) -> None:
        """Give a model saved without glyph places a fresh `GlyphPlaces` (to be trained by continued pretraining)."""
        if self.glyph_places is None:
            self.glyph_places = GlyphPlaces(self.spec.max_tokens, self.spec.text_dim).to(self.device)
            self.clear_prompt_cache()

    def text_embeddings(self, texts: list[str]) -> PromptEmbeds:
        """Differentiable text encoding (pretraining trains the encoders jointly)."""
        ids = self.tokenizer(texts).to(self.device)
        mask = (ids != SPECIALS.index("<pad>")).long()
        tokens = self.t5_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.glyph_places is not None:
            tokens = tokens + self.glyph_places(glyph_place_ids(self.tokenizer, ids).to(self.device))
        return PromptEmbeds(tokens, self.text_encoder(input_ids=ids, attention_mask=mask).text_embeds)

    def _encode_uncached(self, texts: list[str]) -> PromptEmbeds:
        return self.text_embeddings(texts)

    # -- latents <-> images
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size // self.downscale
        return (self.spec.latent_channels, side, side)

    def _stats(self):
        return self.latent_mean.view(1, -1, 1, 1), self.latent_std.view(1, -1, 1, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats()
        return (self.autoencoder.encode(images.to(self.device)) - mean) / std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats()
        return self.autoencoder.decode(latents.float() * std + mean).clamp(0, 1)

    # -- persistence
    def config(self) -> dict:
        return {"size": self.size_name, "image_size": self.image_size, "glyph_places": self.glyph_places is not None,
                "vocab": self.tokenizer.vocab[len(SPECIALS):]}

    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        """Write `model.safetensors` + `config.json` (plus `extra`, e.g. measured metrics)."""
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self, str(directory / "model.safetensors"))  # drops T5's tied embedding copy
        (directory / "config.json").write_text(json.dumps({**self.config(), **(extra or {})}, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "ToyFlowModel":
        from safetensors.torch import load_model

        directory = Path(directory)
        cfg = json.loads((directory / "config.json").read_text())
        model = cls(cfg["size"], vocab=cfg["vocab"], image_size=cfg["image_size"],
                    glyph_places=cfg.get("glyph_places", False))  # bases saved before glyph places had none
        load_model(model, str(directory / "model.safetensors"))
        return model.eval().requires_grad_(False)
